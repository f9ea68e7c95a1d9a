"""pytest-benchmark timings of the bounds on the IWAE paper's one-layer model (784-200-200-50).

    python -m pytest tests/benchmarks -m bench

Random binary data of MNIST shape, or the real test images when ELBO_BENCH_DATA holds
binarized_mnist.npz. The matmul reference is the machine's ceiling for the decoder's work.
"""
from __future__ import annotations

import pytest

from bench.speed import matmul_ceiling
from estimators import elbo, iwae

pytestmark = pytest.mark.bench

KS = [1, 50, 5000]


@pytest.mark.parametrize("k", KS)
def test_elbo(benchmark, model, x, k):
    benchmark.extra_info.update(k=k, n_examples=len(x), samples=k * len(x))
    benchmark.pedantic(lambda: elbo(model, x, samples=k), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("k", KS)
def test_iwae(benchmark, model, x, k):
    benchmark.extra_info.update(k=k, n_examples=len(x), samples=k * len(x))
    benchmark.pedantic(lambda: iwae(model, x, k=k), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("k", KS)
def test_decoder_matmul_ceiling(benchmark, model, x, k):
    benchmark.extra_info.update(k=k, n_examples=len(x), samples=k * len(x))
    benchmark.pedantic(matmul_ceiling(model, k * len(x)), rounds=3, warmup_rounds=1)
