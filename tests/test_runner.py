"""The smoke suite end to end through `python -m bench`, checked against the estimators called directly,
and a run killed with SIGKILL then resumed to the same rows as an uninterrupted run."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

import estimators
from bench.cli import main
from bench.data import load_dataset
from bench.plan.suite import SUITES_DIR
from bench.run.evaluators import DEFAULT_REPLICATES
from bench.store import CELLS_FILE
from bench.train import TrainConfig, train_model
from reports.schema import MANIFEST_FILE, RESULTS_FILE, read_jsonl, read_rows

SMOKE = tomllib.loads((SUITES_DIR / "smoke.toml").read_text())
TIMING_METRICS = {"throughput", "examples_per_s", "wall_median_s", "peak_memory"}


def _bench(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, Path]:
    """One uninterrupted smoke run (run directory, checkpoint cache)."""
    root = tmp_path_factory.mktemp("smoke")
    run_dir, cache = root / "run", root / "cache"
    process = _bench("run", "--all", "--suite", "smoke", "--out", str(run_dir), "--cache-dir", str(cache),
                     "--no-report", "--quiet", cwd=root)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return run_dir, cache


def test_smoke_run_writes_a_complete_table(smoke_run):
    run_dir, _ = smoke_run
    rows = read_rows(run_dir)[0]
    manifest = json.loads((run_dir / MANIFEST_FILE).read_text())
    assert manifest["summary"] == {"cells": 28, "ok": 27, "skipped": 1, "failed": 0}
    assert manifest["suite"]["contents"] == SMOKE and manifest["finished"] >= manifest["started"]
    assert manifest["command"][:4] == ["python", "-m", "bench", "run"]
    assert all(r["run_id"] == run_dir.name for r in rows)
    # PPCA has no amortised posterior means: its active-units cell is skipped, not failed.
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert [(r["model"], r["estimator"]) for r in skipped] == [("linear-gaussian", "active_units")]
    # Every estimator cell that ran carries the four timing rows.
    evaluated = {r["cell_id"] for r in rows if r["estimator"] != "train" and r["status"] == "ok"}
    for metric in TIMING_METRICS:
        assert {r["cell_id"] for r in rows if r["metric"] == metric} == evaluated
    assert all(r["value"] > 0 for r in rows if r["metric"] == "throughput")


def _recompute(model, x: torch.Tensor, seed: int, batch: int, fn) -> list:
    """The runner's protocol: seed once per cell, then batches of `batch` examples in order."""
    torch.manual_seed(seed)
    return [fn(model, part) for part in x.split(batch)]


DIRECT = {  # estimator -> (metric, per-batch call returning an Estimate)
    "elbo": ("elbo", lambda k: lambda m, x: estimators.elbo(m, x, samples=k)),
    "iwae": ("iwae", lambda k: lambda m, x: estimators.iwae(m, x, k=k, replicates=DEFAULT_REPLICATES)),
    "kl_terms": ("kl/z", lambda k: lambda m, x: estimators.kl_terms(m, x, samples=k)["z"]),
    "log_marginal": ("log_marginal",
                     lambda k: lambda m, x: estimators.log_marginal(m, x, k=k, replicates=DEFAULT_REPLICATES)),
}


def test_smoke_values_match_the_estimators_called_directly(smoke_run):
    run_dir, cache = smoke_run
    rows = [r for r in read_rows(run_dir)[0] if r["status"] == "ok"]
    n, batch = SMOKE["eval"]["n_examples"], SMOKE["eval"]["batch_size"]
    checked = 0
    for fit in {(r["dataset"], r["model"], json.dumps(r["model_config"]), r["seed"]) for r in rows}:
        dataset_name, model_name, config, seed = fit
        dataset = load_dataset(dataset_name)
        result = train_model(model_name, json.loads(config), dataset, TrainConfig(**SMOKE["train"], seed=seed),
                             device=torch.device("cpu"), cache_dir=cache, progress=False)
        assert result.from_cache  # the runner cached exactly this checkpoint
        x = dataset.test[:n]
        fit_rows = [r for r in rows if (r["dataset"], r["model"], r["seed"]) == (dataset_name, model_name, seed)]
        assert {r["config_hash"] for r in fit_rows} == {result.model.config_hash()}
        for row in fit_rows:
            if row["estimator"] not in DIRECT or row["metric"] != DIRECT[row["estimator"]][0]:
                continue
            k = row["k"] if row["k"] is not None else 5000  # exact log p(x) ignores k
            parts = _recompute(result.model, x, seed, batch, DIRECT[row["estimator"]][1](k))
            values = torch.cat([p.value.double() for p in parts])
            # The same draws in the same order: agreement to rounding, not to a Monte Carlo tolerance.
            assert row["value"] == pytest.approx(float(values.mean()), rel=1e-12, abs=1e-12)
            assert row["stderr"] == pytest.approx(float(values.std() / math.sqrt(n)), rel=1e-9)
            if parts[0].stderr is not None:
                mc = torch.cat([p.stderr.double() for p in parts])
                assert row["mc_stderr"] == pytest.approx(float(mc.pow(2).sum().sqrt() / n), rel=1e-9)
            assert row["n_examples"] == n and row["unit"] == "nats"
            checked += 1
        units = [r for r in fit_rows if r["metric"] == "active_units"]
        for row in units:
            assert row["value"] == sum(estimators.active_units(result.model, x).values())
    # 3 fits with 5 estimator metrics each, 1 (PPCA) with the same 5: elbo, iwae x2, kl/z, log_marginal.
    assert checked == 4 * 5
    exact = [r for r in rows if r["metric"] == "log_marginal" and r["model"] == "linear-gaussian"]
    assert [(r["method"], r["k"], r["mc_stderr"]) for r in exact] == [("exact", None, 0.0)]


@pytest.mark.slow  # 7 s: a SIGKILLed subprocess run and its resume
def test_killed_run_resumes_to_the_same_rows(smoke_run, tmp_path):
    reference_dir, cache = smoke_run
    run_dir = tmp_path / "run"
    process = _bench("run", "--all", "--suite", "smoke", "--out", str(run_dir), "--cache-dir", str(cache),
                     "--no-report", "--quiet", cwd=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        done, _ = read_jsonl(run_dir / CELLS_FILE)
        if len(done) >= 8:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    done, _ = read_jsonl(run_dir / CELLS_FILE)
    assert 8 <= len(done) < 28, "the kill must land mid-run"
    with open(run_dir / RESULTS_FILE, "a") as f:  # as if the kill had landed inside a write
        f.write('{"run_id": "torn", "cell_id": "abc", "met')

    assert main(["run", "--resume", str(run_dir), "--cache-dir", str(cache), "--no-report", "--quiet"]) == 0
    resumed, torn = read_jsonl(run_dir / RESULTS_FILE)
    reference = read_rows(reference_dir)[0]
    assert not torn
    keys = [(r["cell_id"], r["metric"]) for r in resumed]
    assert len(keys) == len(set(keys))  # nothing recorded twice
    assert set(keys) == {(r["cell_id"], r["metric"]) for r in reference}
    # Same seeds and the same checkpoints: every measured value (timings aside) is reproduced exactly.
    value = {(r["cell_id"], r["metric"]): r["value"] for r in reference}
    for row in resumed:
        if row["metric"] not in TIMING_METRICS:
            assert row["value"] == value[(row["cell_id"], row["metric"])], row
    manifest = json.loads((run_dir / MANIFEST_FILE).read_text())
    assert manifest["summary"]["ok"] == 27 and len(manifest["resumed"]) == 1 and manifest["finished"]
