"""The Ray executor on a local instance of 2 CPUs: the serial values bit for bit (smoke and regression), and a
worker killed with SIGKILL fails only its fit, which --resume completes.

One instance serves the module (started once, no dashboard, shut down at the end); its start-up
took about 5 s on 2 shared cores (printed by the fixture). Without ray installed the module skips
with a reason, except under CI (CI set), where a missing ray is a failure: CI installs [ray].
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from test_executors import finished_cells, run_suite, value_rows

from bench.cli import main
from reports.schema import read_rows

if os.environ.get("CI"):
    import ray  # under CI a missing ray fails here, loudly
else:
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e \".[ray]\"); CI installs it")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    print(f"\nRay local instance (2 CPUs) started in {time.perf_counter() - started:.1f} s")
    yield
    ray.shutdown()


@pytest.mark.parametrize("suite", ["smoke", "regression"])
def test_ray_gives_the_serial_values_bit_for_bit(local_ray, serial_reference, tmp_path, suite):
    # A fresh cache: the Ray workers train the models too.
    assert run_suite(tmp_path / "run", tmp_path / "cache", suite, "--executor", "ray") == 0
    assert value_rows(tmp_path / "run") == value_rows(serial_reference(suite))
    assert ray.is_initialized()  # an instance the caller started is the caller's to shut down


def _running_fit_workers() -> list[int]:
    """Ray worker processes executing a fit now (Ray titles a busy worker ray::<task>, an idle one ray::IDLE)."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::_fit"):
                pids.append(int(proc.name))
    return pids


def test_a_killed_ray_worker_fails_its_fit_and_resume_completes(local_ray, serial_reference, slow_smoke, tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = ["--cache-dir", str(cache), "--no-report", "--quiet", "--executor", "ray"]
    codes = []
    driver = threading.Thread(target=lambda: codes.append(main(["run", "--all", "--suite", slow_smoke, "--out",
                                                                str(run_dir), *args])))
    driver.start()
    deadline = time.monotonic() + 120
    while not (finished_cells(run_dir) and _running_fit_workers()):
        assert time.monotonic() < deadline and driver.is_alive()
        time.sleep(0.005)
    os.kill(_running_fit_workers()[0], signal.SIGKILL)
    driver.join(300)
    assert codes == [1]  # the killed fit's unfinished cells failed; every other cell finished
    failed = [r for r in read_rows(run_dir)[0] if r["status"] == "failed"]
    assert failed and all("Ray task lost (WorkerCrashedError" in r["error"] for r in failed)
    assert len({(r["dataset"], r["label"], r["seed"]) for r in failed}) == 1  # one fit lost, no other
    assert main(["run", "--resume", str(run_dir), *args]) == 0
    assert value_rows(run_dir) == value_rows(serial_reference(slow_smoke))
