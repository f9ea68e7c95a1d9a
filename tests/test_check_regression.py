"""`bench check` on real rows of the regression suite (slow: one run of the suite, ~1-2 min on 2 cores).

- An injected 0.5-nat loosening of any single compared bound cell, VDM cells included, fails, and only that cell
  fails: built from the run's own rows (value and per-example values lowered by 0.5), so the loosened run shares
  the baseline's draws, as a code change that loosens a bound without touching the draws does.
- New draws of the same trained models (evaluation seeds 1..N) give no false failure: the check's tolerance is
  4 paired standard errors, and a cell whose k-hat marks it unreliable is listed, never failed.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from bench import check
from bench.check.baseline import baseline_from_run, read_run_manifest
from bench.check.rules import compare_bound, policy_of
from bench.plan.fits import prepare
from bench.plan.suite import load_suite
from bench.run.evaluate import evaluate_cell
from bench.run.fit_task import _evaluated_model, _evaluation_examples, _train_or_build
from bench.run.rows import FitRows

pytestmark = pytest.mark.slow

DRAW_SEEDS = range(1, 21)  # 20 evaluations with new draws


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    """A fresh run of the regression suite, its checkpoint cache and the baseline written from it."""
    from bench import cli

    root = tmp_path_factory.mktemp("regression")
    run_dir, cache = root / "run", root / "cache"
    assert cli.main(["run", "--all", "--suite", "regression", "--out", str(run_dir), "--cache-dir", str(cache),
                     "--device", "cpu", "--no-report", "--quiet"]) == 0
    rows = check.read_run_rows(run_dir)
    baseline = baseline_from_run(rows, read_run_manifest(run_dir))
    cells = {check.cell_key(cell): cell for cell in baseline["cells"]}
    return rows, cells, cache


def _loosened(rows: list[dict], key: tuple) -> list[dict]:
    out = []
    for row in rows:
        if check.cell_key(row) == key:
            row = {**row, "value": row["value"] - 0.5, "per_example": [v - 0.5 for v in row["per_example"]]}
        out.append(row)
    return out


def test_a_half_nat_loosening_of_any_single_cell_fails(regression):
    rows, baseline, _ = regression
    bounds = [check.cell_key(row) for row in rows
              if row["status"] == "ok" and policy_of(row["metric"]) is compare_bound]
    assert {key[2] for key in bounds} >= {"vdm", "vdm-oracle", "vae", "hvae", "linear-gaussian"}
    assert len(bounds) == 36  # 9 models x (ELBO, IWAE-5, IWAE-50, log p(x))
    for key in bounds:
        result = check.compare(baseline, _loosened(rows, key), check.Settings())
        failing = [finding for finding in result.findings if finding.kind == "regression"]
        assert [finding.key for finding in failing] == [key], check.describe_key(key)
        assert result.failed


def _redrawn_rows(cache: Path, draw_seed: int) -> list[dict]:
    """Every estimator cell of the regression suite on the trained models (from the cache), drawn from draw_seed."""
    suite = load_suite("regression")
    suite = dataclasses.replace(suite, timing={**suite.timing, "enabled": False})
    plan = prepare(suite)
    device = torch.device("cpu")
    out = []
    for fit in plan.fits:
        dataset = plan.datasets[fit.dataset]
        model, *_ = _train_or_build(fit, dataset, device=device, cache_dir=cache, progress=False)
        rows = FitRows("redrawn", fit, device)
        for cell in fit.cells[1:]:  # the training cell first
            evaluated = _evaluated_model(fit, cell.evaluation, model, dataset, device)
            x = _evaluation_examples(suite, dataset, cell.spec, device)
            cell_rows, status, error = evaluate_cell(suite, evaluated, x, cell, fit, rows, device, False,
                                                     draw_seed=draw_seed)
            assert status == "ok", error
            out += [row.to_record() for row in cell_rows]
    return out


def test_new_draws_give_no_false_failure(regression):
    _, baseline, cache = regression
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        unreliable, compared = 0, 0
        for seed in DRAW_SEEDS:
            result = check.compare(baseline, _redrawn_rows(cache, seed), check.Settings())
            failing = [f for f in result.findings if f.kind in ("regression", "improvement", "missing in run")]
            assert not failing, (seed, [(check.describe_key(f.key), f.change, f.tolerance) for f in failing])
            unreliable += result.count("unreliable")
            compared += result.compared
        print(f"{len(DRAW_SEEDS)} draw seeds: {compared} cell comparisons, 0 failures, {unreliable} unreliable")
    finally:
        torch.set_num_threads(threads)
