"""pytest-benchmark timings of gradient estimators (never asserted: compare the entries' medians).

    python -m pytest tests/benchmarks/test_gradient_speed.py -m bench

- One training step (surrogate, backward) of the IWAE paper's one-layer model on 100 examples at K = 64:
  the reparameterized IWAE step as training runs it (``log_weights``) against DReG's (q's draws, log p(x, z),
  log q with detached parameters, one gradient hook). Target: DReG at most 1.3x the reparameterized step.
- gradient_snr with 1,000 repetitions on the Gaussian toy (one example, K = 64): vmapped, seconds.
"""
from __future__ import annotations

import pytest
import torch

import estimators as E
from vaes import create_model
from vaes.base import Objective

pytestmark = pytest.mark.bench

STEP_K = 64


@pytest.mark.parametrize("estimator", ["reparam", "stl", "dreg"])
def test_training_step(benchmark, x, estimator):
    torch.set_num_threads(1)
    model = create_model("vae").train()
    objective = Objective("iwae", k=STEP_K, estimator=estimator)

    def step():
        model.zero_grad(set_to_none=True)
        (-E.training_objective(model, x, objective).mean()).backward()

    benchmark.extra_info.update(k=STEP_K, n_examples=len(x), estimator=estimator)
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)


def test_gradient_snr_on_the_toy(benchmark):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("gaussian-toy")
    x = torch.randn(1, 20)
    benchmark.extra_info.update(k=STEP_K, reps=1000)
    benchmark.pedantic(lambda: E.gradient_snr(model, x, estimator="dreg", k=STEP_K, reps=1000), rounds=3,
                       warmup_rounds=1)
