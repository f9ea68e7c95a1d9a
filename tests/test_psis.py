"""Pareto k-hat recovers known tails, whatever the chunking, and says where it cannot."""
from __future__ import annotations

import math

import pytest
import torch

from estimators.psis import MIN_DRAWS, RunningParetoKhat, pareto_khat, tail_size

SHAPES = (0.2, 0.5, 0.9)


def _pareto_log_draws(shape: float, k: int, batch: int, seed: int) -> torch.Tensor:
    """log of [K, B] draws from a generalized Pareto (scale 1) with the given shape, by inversion."""
    u = torch.rand(k, batch, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return torch.log(torch.expm1(-shape * torch.log1p(-u)) / shape)


def test_tail_size_follows_psis():
    assert [tail_size(k) for k in (100, 1000, 10_000)] == [20, 95, 300]  # ceil(min(K/5, 3 sqrt K))


def test_khat_recovers_the_shape_of_generalized_pareto_weights():
    # One example per shape with K = 10^6 draws, so M = 3000 weights in the tail. Above a threshold
    # a generalized Pareto is again one with the same shape, so k-hat estimates it without model
    # error; its standard deviation is about (1 + k)/sqrt(M) <= 1.9/sqrt(3000) = 0.035, and 0.1 is
    # 2.9 of them at the heaviest shape (more at the others).
    log_w = torch.cat([_pareto_log_draws(shape, 10**6, 1, seed) for seed, shape in enumerate(SHAPES)], dim=1)
    khat = pareto_khat(log_w)
    torch.testing.assert_close(khat, torch.tensor(SHAPES, dtype=torch.float64), atol=0.1, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_khat_is_nearly_unbiased_and_as_precise_as_theory_at_k_10_000(shape):
    # 200 examples of K = 10^4 draws (M = 300). The fit's standard deviation should be the
    # large-sample (1 + k)/sqrt(M) (0.069-0.110): the sample sd of 200 values has a relative
    # error of about 1/sqrt(2 * 199) = 5%, so within 20% is 4 of them. The mean should be within
    # 0.03: its own error is at most 0.110/sqrt(200) = 0.008, and PSIS's prior (10 pseudo-draws at
    # 0.5) moves it by 10/310 |0.5 - k| <= 0.013.
    khat = pareto_khat(_pareto_log_draws(shape, 10_000, 200, seed=int(10 * shape)))
    expected_sd = (1 + shape) / math.sqrt(tail_size(10_000))
    assert abs(float(khat.mean()) - shape) < 0.03, float(khat.mean())
    assert abs(float(khat.std()) / expected_sd - 1) < 0.2, (float(khat.std()), expected_sd)


@pytest.mark.parametrize("chunk", [1, 7, 300, 5000])
def test_streaming_khat_equals_one_shot_whatever_the_chunk(chunk):
    log_w = _pareto_log_draws(0.5, 5000, 4, seed=3)
    running = RunningParetoKhat(5000)
    for part in log_w.split(chunk):
        running.update(part)
    torch.testing.assert_close(running.khat(), pareto_khat(log_w), rtol=0, atol=1e-12)


def test_khat_is_nan_below_min_draws_and_flags_degenerate_tails():
    assert torch.isnan(pareto_khat(torch.randn(MIN_DRAWS - 1, 3, dtype=torch.float64))).all()
    log_w = torch.randn(MIN_DRAWS, 3, dtype=torch.float64)
    log_w[:, 1] = 2.0  # every weight equal: no tail at all
    log_w[tail_size(MIN_DRAWS):, 2] = -torch.inf  # only M weights positive: they are the estimate
    khat = pareto_khat(log_w)
    assert torch.isfinite(khat[0]) and khat[1] == -torch.inf and khat[2] == torch.inf


def test_running_khat_rejects_a_stream_of_the_wrong_length():
    running = RunningParetoKhat(200)
    running.update(torch.randn(150, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="promised 200 draws"):
        running.khat()
