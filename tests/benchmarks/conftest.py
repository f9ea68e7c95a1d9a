"""The timed model and data: the IWAE paper's one-layer model (784-200-200-50) on 100 examples, the real
MNIST test images when ELBO_BENCH_DATA holds binarized_mnist.npz, else random binary data of that shape."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bench.speed import load_mnist_test, random_binary
from vaes import create_model

N_EXAMPLES = 100


@pytest.fixture(scope="module")
def model():
    return create_model("vae").eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    root = os.environ.get("ELBO_BENCH_DATA")
    if root and (Path(root) / "binarized_mnist.npz").is_file():
        return load_mnist_test(Path(root))[:N_EXAMPLES]
    return random_binary(N_EXAMPLES, 784, seed=0)
