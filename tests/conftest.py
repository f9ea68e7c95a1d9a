"""Shared fixtures: every test starts from fixed seeds and one torch thread.

One thread: the tests' tensors are small, and on a shared machine torch's default thread
count made the suite several times slower (threads spinning against other processes).
A test about threads sets its own count; the fixture restores one thread after it.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the same for the bench and report subprocesses tests start
torch.set_num_threads(1)
with contextlib.suppress(RuntimeError):  # allowed only before any inter-op work has started
    torch.set_num_interop_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(1)
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


@pytest.fixture(scope="session")
def serial_reference(tmp_path_factory):
    """suite (a shipped name or a file) -> an uninterrupted serial run of it, made on first use and shared:
    the reference the other executors must reproduce bit for bit (tests/test_executors.py, tests/test_ray.py)."""
    from bench.cli import main

    root = tmp_path_factory.mktemp("serial-reference")
    made: dict[str, Path] = {}

    def reference(suite: str) -> Path:
        if suite not in made:
            out = root / f"run-{len(made)}"
            assert main(["run", "--all", "--suite", suite, "--out", str(out), "--cache-dir", str(root / "cache"),
                         "--no-report", "--quiet", "--executor", "serial"]) == 0
            made[suite] = out
        return made[suite]

    return reference


# The smoke suite with one expensive cell per fit (IWAE-20000 log p(x), about a second), so a signal sent
# right after a fit's training cell lands while that fit still has cells to run.
SLOW_SMOKE_K = 20000


@pytest.fixture(scope="session")
def slow_smoke(tmp_path_factory) -> str:
    """The file of the smoke suite with an expensive cell per fit (for runs interrupted mid-fit)."""
    from bench.plan.suite import SUITES_DIR

    text = (SUITES_DIR / "smoke.toml").read_text()
    slow = text.replace('name = "smoke"', 'name = "slow-smoke"').replace(
        'method = "auto"\nk = 100\n', f'method = "auto"\nk = {SLOW_SMOKE_K}\n')
    assert slow.count(f"k = {SLOW_SMOKE_K}") == 1
    path = tmp_path_factory.mktemp("slow-smoke") / "slow-smoke.toml"
    path.write_text(slow)
    return str(path)
