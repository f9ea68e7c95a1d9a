"""bench.run.timing.measure: medians against known durations, exact throughput arithmetic, peak memory."""
from __future__ import annotations

import math
import time

import pytest
import torch
from torch.nn import functional as F

from bench.run.timing import measure, peak_memory

SLEEP_S = 0.02


def test_median_of_a_sleep_and_throughput_arithmetic():
    timing = measure(lambda: time.sleep(SLEEP_S), device="cpu", n_examples=7, k=11, warmup=1, repeats=5)
    # sleep returns no earlier than asked; the scheduler may add a few ms on a loaded machine.
    assert SLEEP_S <= timing.median_s < SLEEP_S + 0.015
    assert len(timing.times_s) == 5
    assert 0 <= timing.iqr_s < 0.015
    assert timing.samples_per_s == 7 * 11 / timing.median_s
    assert timing.examples_per_s == 7 / timing.median_s
    assert timing.threads == torch.get_num_threads() and timing.torch_version == torch.__version__


def test_warmup_calls_are_not_timed():
    calls = []

    def slow_first() -> None:
        time.sleep(0.2 if not calls else 0.005)
        calls.append(1)

    timing = measure(slow_first, device="cpu", n_examples=1, k=1, warmup=1, repeats=3)
    assert len(calls) == 1 + 3 + 1  # warm-up, repeats, the memory call
    assert timing.median_s < 0.1


@pytest.mark.parametrize("megabytes", [64, 256])
def test_peak_memory_of_a_known_allocation(megabytes):
    n_bytes = megabytes * 2**20

    def allocate() -> float:
        block = torch.ones(n_bytes // 4)  # float32, every page written
        return float(block[-1])

    timing = measure(allocate, device="cpu", n_examples=1, k=1, warmup=0, repeats=1)
    # The tensor dominates; the interpreter's own transient use is a few MB at most.
    assert n_bytes * 0.97 <= timing.peak_memory_bytes <= n_bytes + 8 * 2**20
    peak, how = peak_memory(allocate, "cpu")  # the same probe on its own
    assert n_bytes * 0.97 <= peak <= n_bytes + 8 * 2**20 and how == timing.memory_measure
    calls = []
    untouched = measure(lambda: calls.append(allocate()), device="cpu", n_examples=1, k=1, warmup=0, repeats=2,
                        memory=False)
    assert len(calls) == 2 and untouched.peak_memory_bytes == 0 and untouched.memory_measure == "not measured"


def test_freed_memory_before_the_call_is_not_counted():
    leftover = torch.ones(64 * 2**20 // 4)
    del leftover  # freed, but the allocator may keep it; measure() hands it back first
    timing = measure(lambda: float(torch.ones(2**20).sum()), device="cpu", n_examples=1, k=1, warmup=0, repeats=1)
    assert timing.peak_memory_bytes <= 8 * 2**20


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="choices: cpu, cuda"):
        measure(lambda: None, device="meta", n_examples=1, k=1)
    with pytest.raises(ValueError, match="n_examples"):
        measure(lambda: None, device="cpu", n_examples=0, k=1)


# --- the fast (blocked, folded) Bernoulli decoder gives the plain decoder's values ---------------

@pytest.mark.parametrize("name, config", [
    ("vae", {"hidden": (30, 20), "latent_dim": 5}),
    ("hvae", {"hidden": ((30, 20), (12,)), "latent_dims": (5, 3)}),  # the same decoder path in the hierarchy
])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
@pytest.mark.parametrize("data_dim", [40, 301])  # float32: one group of sigmoids, or two of 101 and one of 99
def test_fast_bernoulli_log_likelihood_matches_the_plain_decoder(name, config, dtype, tolerance, data_dim):
    from vaes import create_model
    from vaes.layers import prepare_decoder_log_prob

    model = create_model(name, data_dim=data_dim, **config).to(dtype).eval()
    with torch.no_grad():  # larger weights and biases: logits well past softplus's linear range
        for parameter in model.decoder.parameters():
            parameter.normal_(0.0, 2.0)
    x = (torch.rand(33, data_dim) < 0.4).to(dtype)
    z = torch.randn(7, 33, 5, dtype=dtype)
    with torch.inference_mode():
        fast = prepare_decoder_log_prob(model.decoder, model.likelihood, x, max_k=7)(z)
        torch.manual_seed(1)
        fast_weights = model.log_weights(x, 3)  # the model's own route to the fast path
    plain = model.likelihood.log_prob(x, model.decoder(z)).detach()  # autograd on: the plain path
    torch.manual_seed(1)
    plain_weights = model.log_weights(x, 3)
    # Only rounding differs (sigmoid form of tanh, x-term folded into the last layer): float64
    # agrees to ~1e-12 of values of a few hundred nats, float32 to ~1e-6 relative.
    assert fast.shape == plain.shape == (7, 33)
    # The same draws (one noise stream, block by block or at once) and the same log densities of them.
    fast_parts = [fast_weights.log_likelihood, *fast_weights.log_prior.values(), *fast_weights.log_posterior.values()]
    plain_parts = [plain_weights.log_likelihood, *plain_weights.log_prior.values(),
                   *plain_weights.log_posterior.values()]
    for fast_part, plain_part in zip(fast_parts, plain_parts, strict=True):
        plain_part = plain_part.detach()
        assert torch.allclose(fast_part, plain_part, rtol=0, atol=tolerance * plain_part.abs().max().item() / 100)
    assert torch.allclose(fast, plain, rtol=0, atol=tolerance * plain.abs().max().item() / 100)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-15), (torch.float32, 2e-7)])  # per element: a few ulps
@pytest.mark.parametrize("width", [1, 40, 126, 127, 784, 1023, 1025])
def test_grouped_log_sigmoid_sum_matches_the_sum_of_logs(dtype, tolerance, width):
    from vaes.layers import _log_sigmoid_sum_

    generator = torch.Generator().manual_seed(width)
    # |logits| from 0 (sigmoid 1/2: the products' smallest factors) to 60 (sigmoid rounds to 1).
    a = torch.cat([torch.zeros(1, width), 60 * torch.rand(7, width, generator=generator),
                   torch.rand(4, width, generator=generator)]).to(dtype)
    expected = F.logsigmoid(a.double()).sum(-1)
    got = _log_sigmoid_sum_(a.clone())
    assert got.dtype == dtype and got.shape == (12,)
    # All-zero row: width * log(1/2), the case that would underflow an ungrouped product.
    assert abs(got[0].item() - width * math.log(0.5)) <= tolerance * width
    assert torch.allclose(got.double(), expected, rtol=0, atol=tolerance * width)
