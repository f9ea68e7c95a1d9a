"""pytest-benchmark timings of AIS's inner work on the IWAE paper's one-layer model (784-200-200-50).

    python -m pytest tests/benchmarks/test_ais_speed.py -m bench

One HMC gradient evaluation is log p0(z) + log p(x, z) and their gradients in z for every chain of
every example: 100 examples x 16 chains = 1,600 decoder rows, forward and backward. The reference
is the machine's ceiling for that work: the decoder's three matmuls forward and the three that
carry the gradient back to z, into preallocated outputs. Evaluations per second of each, and
their ratio, in the same run. Random weights and random binary data of MNIST shape (or the real
test images when ELBO_BENCH_DATA holds binarized_mnist.npz): speed does not depend on training.
"""
from __future__ import annotations

import os

import pytest
import torch

from estimators.ais import GeometricPath

pytestmark = pytest.mark.bench

CHAINS = 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("ELBO_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


def forward_backward_ceiling(model, rows: int):
    """The decoder's matmuls for ``rows`` rows: z -> logits, then d/dlogits -> d/dz (no bias, no activation)."""
    weights = [m.weight.detach() for m in model.decoder if isinstance(m, torch.nn.Linear)]  # [out, in]
    transposed = [w.t().contiguous() for w in weights]
    start = torch.randn(rows, weights[0].shape[1])
    forward = [torch.empty(rows, w.shape[0]) for w in weights]
    backward = [torch.empty(rows, w.shape[1]) for w in weights]

    def run() -> None:
        h = start
        for w_t, out in zip(transposed, forward):
            h = torch.mm(h, w_t, out=out)
        for w, out in zip(reversed(weights), reversed(backward)):
            h = torch.mm(h, w, out=out)

    return run


def test_hmc_gradient_evaluation(benchmark, model, x):
    path = GeometricPath(model, x, "prior", CHAINS, tuning=False, chunk=len(x))
    z = path.draw_start(torch.Generator().manual_seed(1))
    benchmark.extra_info.update(rows=CHAINS * len(x), unit="gradient evaluations", threads=torch.get_num_threads())
    benchmark.pedantic(lambda: path(z), rounds=30, warmup_rounds=3)


def test_decoder_forward_backward_matmul_ceiling(benchmark, model, x):
    benchmark.extra_info.update(rows=CHAINS * len(x), unit="gradient evaluations", threads=torch.get_num_threads())
    benchmark.pedantic(forward_backward_ceiling(model, CHAINS * len(x)), rounds=30, warmup_rounds=3)
