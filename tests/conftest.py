"""Shared fixtures: every test starts from fixed seeds and float64 where oracles are compared."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def mnist_dir() -> Path:
    """The directory holding binarized_mnist.npz (ELBO_BENCH_DATA); skips the test when absent."""
    root = os.environ.get("ELBO_BENCH_DATA")
    if not root or not (Path(root) / "binarized_mnist.npz").is_file():
        pytest.skip("binarized MNIST not found: set ELBO_BENCH_DATA to a folder holding binarized_mnist.npz")
    return Path(root)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not fight other test processes for cores.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
