"""pytest-benchmark timings of the bounds on the IWAE paper's one-layer model (784-200-200-50).

    python -m pytest tests/benchmarks -m bench

Random binary data of MNIST shape, or the real test images when ELBO_BENCH_DATA holds
binarized_mnist.npz. The matmul reference is the machine's ceiling for the decoder's work.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.speed import load_mnist_test, matmul_ceiling, random_binary
from estimators import elbo, iwae
from vaes import create_model

pytestmark = pytest.mark.bench

N_EXAMPLES = 100
KS = [1, 50, 5000]


@pytest.fixture(scope="module")
def model():
    return create_model("vae").eval()


@pytest.fixture(scope="module")
def x():
    root = os.environ.get("ELBO_BENCH_DATA")
    if root and (Path(root) / "binarized_mnist.npz").is_file():
        return load_mnist_test(Path(root))[:N_EXAMPLES]
    return random_binary(N_EXAMPLES, 784, seed=0)


@pytest.mark.parametrize("k", KS)
def test_elbo(benchmark, model, x, k):
    benchmark.extra_info.update(k=k, n_examples=N_EXAMPLES, samples=k * N_EXAMPLES)
    benchmark.pedantic(lambda: elbo(model, x, samples=k), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("k", KS)
def test_iwae(benchmark, model, x, k):
    benchmark.extra_info.update(k=k, n_examples=N_EXAMPLES, samples=k * N_EXAMPLES)
    benchmark.pedantic(lambda: iwae(model, x, k=k), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("k", KS)
def test_decoder_matmul_ceiling(benchmark, model, k):
    benchmark.extra_info.update(k=k, n_examples=N_EXAMPLES, samples=k * N_EXAMPLES)
    benchmark.pedantic(matmul_ceiling(model, k * N_EXAMPLES), rounds=3, warmup_rounds=1)
