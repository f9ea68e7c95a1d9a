"""The Ray executor on a local instance of 2 CPUs gives the serial values bit for bit (smoke and regression).

One instance serves the module (started once, no dashboard, shut down at the end); its start-up
took about 5 s on 2 shared cores (printed by the fixture). Without ray installed the module skips
with a reason, except under CI (CI set), where a missing ray is a failure: CI installs [ray].
"""
from __future__ import annotations

import os
import time

import pytest
from test_executors import run_suite, value_rows

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
