"""The bound-tightness regression check (bench/check.py) on hand-written run directories.

Rows follow the results schema: one JSON object per line in results.jsonl, with a
manifest.json beside it. Tolerances are floor + z * hypot(se_baseline, se_run); the
tests place changes on either side of that number, computed from the same formula.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from bench import check

MANIFEST = {
    "run_id": "run-a", "git_commit": "0123abcd", "device": "cpu", "device_name": "test cpu", "threads": 2,
    "versions": {"python": "3.11", "torch": "2.13.0", "numpy": "2", "pandas": "2"},
    "command": "python -m bench run --all --suite regression", "suite": {"name": "regression"},
    "started": "2025-01-01T00:00:00", "finished": "2025-01-01T00:01:00",
}


def make_row(metric: str = "elbo", value: float = -30.0, **columns) -> dict:
    row = {
        "run_id": "run-a", "cell_id": "c", "dataset": "digits", "split": "test", "model": "vae",
        "config_hash": "aaaa1111", "model_config": {"latent_dim": 4}, "seed": 0, "estimator": "elbo", "k": 10,
        "metric": metric, "method": None, "value": value, "stderr": 0.3, "mc_stderr": 0.02, "unit": "nats",
        "n_examples": 360, "device": "cpu", "wall_s": 0.1, "status": "ok", "error": None,
    }
    row.update(columns)
    return row


def base_rows() -> list[dict]:
    """A small run: ELBO and its KL, IWAE at two K, exact log p(x) (MC stderr 0), and a throughput."""
    return [
        make_row("elbo", -30.0),
        make_row("kl", 5.0),
        make_row("kl/z", 5.0),
        make_row("reconstruction", -25.0),
        make_row("iwae", -29.0, estimator="iwae", k=5, mc_stderr=0.03),
        make_row("iwae", -28.5, estimator="iwae", k=50, mc_stderr=0.01),
        make_row("ess", 3.0, estimator="iwae", k=50, unit="samples"),
        make_row("log_marginal", -20.0, model="linear-gaussian", config_hash="bbbb2222", estimator="log_marginal",
                 k=None, method="exact", mc_stderr=0.0, stderr=0.4),
        make_row("throughput", 1000.0, estimator="iwae", k=50, unit="samples/s", stderr=None, mc_stderr=None),
    ]


def write_run(directory: Path, rows: list[dict], manifest: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / "manifest.json").write_text(json.dumps(manifest or MANIFEST))
    return directory


def run_cli(*argv: str) -> int:
    return check.main(check.build_parser().parse_args([str(arg) for arg in argv]))


@pytest.fixture
def baseline(tmp_path: Path) -> Path:
    path = tmp_path / "baseline.json"
    assert run_cli(write_run(tmp_path / "base", base_rows()), "--write-baseline", path) == 0
    return path


def edited(rows: list[dict], metric: str, estimator: str | None = None, **changes) -> list[dict]:
    """A copy of rows with ``changes`` applied to the row(s) of that metric (and estimator)."""
    out = []
    for row in rows:
        row = dict(row)
        if row["metric"] == metric and estimator in (None, row["estimator"]):
            for column, change in changes.items():
                row[column] = change(row[column]) if callable(change) else change
        out.append(row)
    return out


def test_unchanged_rerun_passes(tmp_path, baseline, capsys):
    assert run_cli(write_run(tmp_path / "rerun", base_rows()), "--baseline", baseline) == 0
    out = capsys.readouterr().out
    # elbo, kl, kl/z, iwae x2, log_marginal: 6 compared (throughput only with --throughput-ratio).
    assert "PASS: 6 cells compared; 0 regression, 0 improvement, 0 missing in run" in out


def test_loosened_bound_fails_and_names_the_cell(tmp_path, baseline, capsys):
    # IWAE K=50 down by 0.5 nats; tolerance 0.05 + 4 * hypot(0.01, 0.01) = 0.107 nats.
    rows = edited(base_rows(), "iwae", "iwae", value=lambda v: v - 0.5)
    assert run_cli(write_run(tmp_path / "loose", rows), "--baseline", baseline) == 1
    out = capsys.readouterr().out
    assert "REGRESSION (2)" in out
    assert "digits/test vae[aaaa1111] iwae k=50 seed=0 iwae" in out
    assert "digits/test vae[aaaa1111] iwae k=5 seed=0 iwae" in out
    assert "-0.5000" in out
    assert out.rstrip().splitlines()[-2].startswith("FAIL:")
    assert out.rstrip().splitlines()[-1] == "check: 4 passed, 2 failed"


def test_exact_log_marginal_drop_fails_on_floor_alone(tmp_path, baseline, capsys):
    # Exact log p(x) has MC stderr 0, so the tolerance is the 0.05-nat floor, not the 0.4 over-examples stderr.
    rows = edited(base_rows(), "log_marginal", value=lambda v: v - 0.06)
    assert run_cli(write_run(tmp_path / "exact", rows), "--baseline", baseline) == 1
    assert "linear-gaussian[bbbb2222] log_marginal k=- seed=0 log_marginal" in capsys.readouterr().out


@pytest.mark.parametrize("inside, expected", [(True, 0), (False, 1)])
def test_tolerance_edge(tmp_path, baseline, inside, expected):
    # ELBO: floor 0.05 + z 4 * hypot(0.02, 0.02); a drop a hair inside passes, a hair outside fails.
    tolerance = 0.05 + 4 * math.hypot(0.02, 0.02)
    drop = tolerance - 1e-6 if inside else tolerance + 1e-6
    rows = edited(base_rows(), "elbo", value=lambda v: v - drop)
    assert run_cli(write_run(tmp_path / "edge", rows), "--baseline", baseline) == expected


def test_flags_change_the_tolerance(tmp_path, baseline):
    # A 0.3-nat drop: beyond the default 0.163-nat tolerance, within floor 0.2 + 4 * 0.028 = 0.313.
    run_dir = write_run(tmp_path / "drop", edited(base_rows(), "elbo", value=lambda v: v - 0.3))
    assert run_cli(run_dir, "--baseline", baseline) == 1
    assert run_cli(run_dir, "--baseline", baseline, "--floor", "0.2") == 0
    assert run_cli(run_dir, "--baseline", baseline, "--z", "10") == 0  # 0.05 + 10 * 0.028 = 0.333


def test_falls_back_to_over_examples_stderr_without_mc_stderr(tmp_path):
    # Single-draw ELBO has no MC stderr: the tolerance is 0.05 + 4 * hypot(0.3, 0.3) = 1.75 nats.
    base = [make_row("elbo", -30.0, mc_stderr=None)]
    path = tmp_path / "b.json"
    assert run_cli(write_run(tmp_path / "base", base), "--write-baseline", path) == 0
    assert run_cli(write_run(tmp_path / "small", [make_row("elbo", -31.7, mc_stderr=None)]), "--baseline", path) == 0
    assert run_cli(write_run(tmp_path / "large", [make_row("elbo", -31.8, mc_stderr=None)]), "--baseline", path) == 1


def test_monte_carlo_noise_passes_and_a_half_nat_shift_fails(tmp_path):
    """200 cells whose baseline and run are independent MC estimates of the same mean (seeded draws).

    With z = 4 the chance that any of 200 cells fails by noise alone is 200 * 3.2e-5 = 0.6%;
    shifted down by 0.5 nats (12.5 combined standard errors) every cell must fail.
    """
    rng = random.Random(0)
    se = 0.02

    def noisy_rows(shift: float) -> list[dict]:
        return [make_row("iwae", -30.0 + shift + rng.gauss(0, se), estimator="iwae", k=5, seed=seed, mc_stderr=se)
                for seed in range(200)]

    path = tmp_path / "b.json"
    assert run_cli(write_run(tmp_path / "base", noisy_rows(0.0)), "--write-baseline", path) == 0
    assert run_cli(write_run(tmp_path / "same", noisy_rows(0.0)), "--baseline", path) == 0
    assert run_cli(write_run(tmp_path / "shifted", noisy_rows(-0.5)), "--baseline", path) == 1
    result, _ = check.run_check(tmp_path / "shifted", path, check.Settings())
    assert result.count("regression") == 200


def test_improvement_fails_as_a_stale_baseline(tmp_path, baseline, capsys):
    # A significant rise is listed as an improvement and fails: the baseline no longer describes the code.
    rows = edited(base_rows(), "elbo", value=lambda v: v + 0.5)
    assert run_cli(write_run(tmp_path / "better", rows), "--baseline", baseline) == 1
    out = capsys.readouterr().out
    assert "IMPROVEMENT (1)" in out and "+0.5000" in out
    assert "FAIL: 6 cells compared; 0 regression, 1 improvement" in out
    assert "the baseline is stale (1 improvement): if the change is intended, rewrite the baseline" in out
    assert f"--write-baseline {baseline}" in out
    assert out.rstrip().splitlines()[-1] == "check: 5 passed, 1 failed"


def test_missing_cells_fail_new_cells_only_when_asked(tmp_path, baseline, capsys):
    rows = [row for row in base_rows() if not (row["metric"] == "iwae" and row["k"] == 5)]
    rows.append(make_row("iwae", -28.0, estimator="iwae", k=500, mc_stderr=0.01))
    assert run_cli(write_run(tmp_path / "partial", rows), "--baseline", baseline) == 1
    out = capsys.readouterr().out
    assert "MISSING IN RUN (1)" in out and "vae[aaaa1111] iwae k=5 seed=0 iwae" in out
    assert "NEW IN RUN (1)" in out and "iwae k=500 seed=0 iwae" in out
    assert "the baseline is stale (1 missing in run)" in out
    grown = write_run(tmp_path / "grown", [*base_rows(), make_row("iwae", -28.0, estimator="iwae", k=500)])
    assert run_cli(grown, "--baseline", baseline) == 0
    assert run_cli(grown, "--baseline", baseline, "--fail-on-new") == 1


def test_config_change_is_named(tmp_path, baseline, capsys):
    rows = [dict(row, config_hash="cccc3333") if row["model"] == "vae" else row for row in base_rows()]
    assert run_cli(write_run(tmp_path / "config", rows), "--baseline", baseline) == 1
    out = capsys.readouterr().out
    assert "model config changed: digits/test vae: baseline aaaa1111 -> run cccc3333" in out
    # elbo, kl, kl/z, iwae x2 of vae (the throughput is off by default) show as missing on both sides.
    assert "MISSING IN RUN (5)" in out and "NEW IN RUN (5)" in out


def test_failed_cell_is_a_regression(tmp_path, baseline, capsys):
    rows = edited(base_rows(), "iwae", "iwae", status="failed", value=None, error="RuntimeError: NaN in log weights")
    assert run_cli(write_run(tmp_path / "failed", rows), "--baseline", baseline) == 1
    out = capsys.readouterr().out
    assert "REGRESSION (2)" in out and "failed: RuntimeError: NaN in log weights" in out
    assert "MISSING IN RUN" not in out


def test_failed_cell_without_metric_covers_its_baseline_metrics(tmp_path, baseline, capsys):
    rows = [row for row in base_rows() if row["estimator"] != "log_marginal"]
    rows.append(make_row(None, None, model="linear-gaussian", config_hash="bbbb2222", estimator="log_marginal",
                         k=None, status="failed", error="ValueError: boom"))
    assert run_cli(write_run(tmp_path / "failed", rows), "--baseline", baseline) == 1
    out = capsys.readouterr().out
    assert "REGRESSION (1)" in out and "ValueError: boom" in out and "MISSING IN RUN" not in out


def test_non_finite_bound_is_a_regression(tmp_path, baseline, capsys):
    rows = edited(base_rows(), "elbo", value=float("nan"))
    assert run_cli(write_run(tmp_path / "nan", rows), "--baseline", baseline) == 1
    assert "value nan is not finite" in capsys.readouterr().out


def test_kl_change_is_information_only(tmp_path, baseline, capsys):
    rows = edited(base_rows(), "kl/z", value=lambda v: v + 2.0)
    rows = edited(rows, "kl", value=lambda v: v - 2.0)
    assert run_cli(write_run(tmp_path / "kl", rows), "--baseline", baseline) == 0
    out = capsys.readouterr().out
    assert "INFORMATION (2)" in out and "+2.0000" in out and "-2.0000" in out


def test_throughput_is_off_by_default_and_a_ratio_when_asked(tmp_path, baseline, capsys):
    slow = write_run(tmp_path / "slow", edited(base_rows(), "throughput", value=400.0))
    assert run_cli(slow, "--baseline", baseline) == 0
    assert run_cli(slow, "--baseline", baseline, "--throughput-ratio", "0.5") == 1
    assert "throughput fell to 0.40x of the baseline (threshold 0.50x)" in capsys.readouterr().out
    fine = write_run(tmp_path / "fine", edited(base_rows(), "throughput", value=600.0))
    assert run_cli(fine, "--baseline", baseline, "--throughput-ratio", "0.5") == 0


def test_write_baseline_is_deterministic_and_carries_provenance(tmp_path, baseline):
    shuffled = base_rows()
    random.Random(1).shuffle(shuffled)
    again = tmp_path / "again.json"
    assert run_cli(write_run(tmp_path / "shuffled", shuffled), "--write-baseline", again) == 0
    assert again.read_bytes() == baseline.read_bytes()
    document = json.loads(baseline.read_text())
    assert document["format_version"] == check.BASELINE_FORMAT_VERSION
    assert document["provenance"]["git_commit"] == "0123abcd"
    assert document["suite"] == {"name": "regression", "hash": None}  # the hand-written manifest holds no contents
    assert document["provenance"]["versions"]["torch"] == "2.13.0"
    # Diagnostics (reconstruction, ess) are not bounds and stay out; the eight compared rows stay in.
    assert sorted(cell["metric"] for cell in document["cells"]) == sorted(
        ["elbo", "kl", "kl/z", "iwae", "iwae", "log_marginal", "throughput"])
    first = document["cells"][0]
    assert list(first) == sorted(first)
    assert {"value", "stderr", "mc_stderr", "config_hash"} <= set(first)


def test_write_baseline_refuses_a_run_with_failures(tmp_path, capsys):
    run_dir = write_run(tmp_path / "failed", [make_row(status="failed", value=None, error="boom")])
    assert run_cli(run_dir, "--write-baseline", tmp_path / "b.json") == 2
    assert "failed cell" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def _document(**fields) -> str:
    return json.dumps({"format": "elbo-bench-baseline", "format_version": check.BASELINE_FORMAT_VERSION,
                       "suite": {"name": "regression", "hash": None}, **fields})


@pytest.mark.parametrize("content, message", [
    (None, "baseline not found"),
    ("{not json", "is not valid JSON"),
    ("[]", "is not an elbo-bench baseline"),
    (json.dumps({"format": "elbo-bench-baseline", "format_version": 99, "cells": []}), "format version 99"),
    (json.dumps({"format": "elbo-bench-baseline", "format_version": 1, "cells": []}), "format version 1"),
    (json.dumps({"format": "elbo-bench-baseline", "format_version": check.BASELINE_FORMAT_VERSION, "cells": []}),
     "does not say which suite it belongs to"),
    (_document(cells=[]), "has no cells"),
    (_document(cells=[{"value": 1.0}]), "lacks dataset"),
    (_document(cells=[dict(make_row(), value="high")]), "non-numeric value"),
])
def test_malformed_baseline_exits_2(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    assert run_cli(write_run(tmp_path / "run", base_rows()), "--baseline", path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("results, message", [
    (None, "has no results.jsonl"),
    ("", "holds no results"),
    ('{"dataset": "digits"}\n', "lacks the columns"),
    (json.dumps(make_row()) + "\n{truncated", "ends in a torn line: the run was interrupted"),
    ("{corrupt\n" + json.dumps(make_row()) + "\n", "line 1 is not JSON"),
    (json.dumps(make_row(label="a")) + "\n" + json.dumps(make_row(label="b")) + "\n", "twice (labels a, b)"),
])
def test_bad_run_directory_exits_2(tmp_path, baseline, capsys, results, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if results is not None:
        (run_dir / "results.jsonl").write_text(results)
    assert run_cli(run_dir, "--baseline", baseline) == 2
    assert message in capsys.readouterr().err
    assert run_cli(tmp_path / "nowhere", "--baseline", baseline) == 2


def test_bad_flag_values_are_rejected(baseline):
    with pytest.raises(SystemExit) as exit_info:
        check.build_parser().parse_args(["run", "--baseline", str(baseline), "--throughput-ratio", "2"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        check.build_parser().parse_args(["run", "--baseline", str(baseline), "--z", "-1"])


# --- end to end through the runner: a tiny real suite -------------------------------------------------

TINY_SUITE = """
name = "check-tiny"
datasets = ["linear-gaussian"]
seeds = [0]
[train]
steps = 10
batch_size = 100
eval_every = 10
eval_examples = 50
[eval]
n_examples = 100
batch_size = 100
[timing]
enabled = false
[[models]]
name = "linear-gaussian"
config = { latent_dim = 5, encoder = "exact" }  # q is the true posterior: bounds have (near) zero MC error
[[estimators]]
name = "elbo"
samples = 10
[[estimators]]
name = "iwae"
k = 20
[[estimators]]
name = "log_marginal"
method = "exact"
"""


def run_suite(suite: Path, out: Path, cache: Path) -> None:
    from bench import cli

    assert cli.main(["run", "--all", "--suite", str(suite), "--out", str(out), "--cache-dir", str(cache),
                     "--device", "cpu", "--no-report", "--quiet"]) == 0


def test_end_to_end_rerun_passes_and_a_wrapped_loosened_estimator_fails(tmp_path, monkeypatch, capsys):
    """A real run, its baseline, an unchanged rerun (retrained from scratch) and a run whose IWAE
    estimator is wrapped to subtract 0.5 nats: the rerun passes, the loosened run fails naming the cell."""
    import dataclasses

    from bench.run import evaluators

    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY_SUITE)
    run_suite(suite, tmp_path / "first", tmp_path / "cache-a")
    baseline = tmp_path / "baseline.json"
    assert run_cli(tmp_path / "first", "--write-baseline", baseline) == 0
    document = json.loads(baseline.read_text())
    assert document["suite"]["name"] == "check-tiny" and len(document["suite"]["hash"]) == 16
    assert {cell["metric"] for cell in document["cells"]} >= {"elbo", "iwae", "log_marginal", "kl"}

    run_suite(suite, tmp_path / "rerun", tmp_path / "cache-b")  # a fresh cache: the model is retrained
    capsys.readouterr()
    assert run_cli(tmp_path / "rerun", "--baseline", baseline) == 0
    assert "PASS:" in capsys.readouterr().out

    honest = evaluators.ESTIMATORS["iwae"]

    def loosened(model, x, k, params):
        return [dataclasses.replace(m, values=m.values - 0.5) if m.metric == "iwae" else m
                for m in honest.evaluate(model, x, k, params)]

    monkeypatch.setitem(evaluators.ESTIMATORS, "iwae", dataclasses.replace(honest, evaluate=loosened))
    run_suite(suite, tmp_path / "loose", tmp_path / "cache-a")
    assert run_cli(tmp_path / "loose", "--baseline", baseline) == 1, capsys.readouterr().out
    out = capsys.readouterr().out
    config_hash = document["cells"][0]["config_hash"][:8]
    assert f"linear-gaussian/test linear-gaussian[{config_hash}] iwae k=20 seed=0 iwae" in out
    assert "REGRESSION (1)" in out and "-0.5000" in out


def test_bench_check_command_line(tmp_path, baseline):
    """`python -m bench check` is wired to this module: exit status 1 on a regression, the cell named.
    (One subprocess only: importing torch dominates its time; exit status 2 is tested in process above.)"""
    import subprocess
    import sys

    loose = write_run(tmp_path / "loose", edited(base_rows(), "elbo", value=lambda v: v - 0.5))
    done = subprocess.run([sys.executable, "-m", "bench", "check", str(loose), "--baseline", str(baseline)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "digits/test vae[aaaa1111] elbo k=10 seed=0 elbo" in done.stdout


def test_committed_regression_baseline_matches_the_suite():
    """reports/baselines/regression.json parses, covers every registered model family, and was written from
    the regression suite as it is now: its (dataset, model, config_hash) triples are the suite's, so a model
    config change that would turn the CI check into "missing on both sides" fails here first."""
    import vaes
    from bench.plan.fits import prepare
    from bench.plan.suite import load_suite

    path = Path(__file__).resolve().parents[1] / "reports" / "baselines" / "regression.json"
    baseline = check.read_baseline(path)
    cells = baseline.cells
    suite = load_suite("regression")
    # The baseline names the suite as it is now: editing regression.toml without rewriting the baseline fails here.
    assert baseline.suite == check.suite_identity({"suite": {"name": suite.name, "contents": suite.contents}})
    in_baseline = {(key[0], key[2], key[3]) for key in cells}
    plan = prepare(suite)
    in_suite = {(fit.dataset, fit.model.name, fit.config_hash) for fit in plan.fits}
    assert in_baseline == in_suite
    assert {model for _, model, _ in in_suite} == set(vaes.list_models())
    assert {key[-1] for key in cells} >= {"elbo", "iwae", "log_marginal", "kl"}


def test_metric_policies_bounds_compared_parts_informational():
    assert check.policy_of("diffusion_elbo") is check.compare_bound
    assert check.policy_of("log_marginal") is check.compare_bound
    # The parts of the diffusion ELBO (prior and diffusion are KL-like) and per-layer KLs never fail.
    for part in ("diffusion_elbo/reconstruction", "diffusion_elbo/prior", "diffusion_elbo/diffusion", "kl/z1"):
        assert check.policy_of(part) is check.compare_information, part
    assert check.policy_of("elbo/part") is None and check.policy_of("ess") is None


# --- the check cannot pass by accident: nothing compared, another suite -------------------------------

def test_zero_cells_compared_exits_2(tmp_path, baseline, capsys):
    # The same cells under another seed: nothing in common with the baseline, so nothing was checked.
    other_seed = [dict(row, seed=1) for row in base_rows()]
    assert run_cli(write_run(tmp_path / "seed1", other_seed), "--baseline", baseline) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 0 cells compared") and len(err.strip().splitlines()) == 1


def _suite_manifest(name: str, contents: dict) -> dict:
    return {**MANIFEST, "suite": {"name": name, "source": f"{name}.toml", "contents": contents}}


def test_another_suites_baseline_exits_2(tmp_path, capsys):
    contents = {"name": "regression", "datasets": ["digits"], "seeds": [0]}
    path = tmp_path / "b.json"
    assert run_cli(write_run(tmp_path / "base", base_rows(), _suite_manifest("regression", contents)),
                   "--write-baseline", path) == 0
    assert run_cli(write_run(tmp_path / "same", base_rows(), _suite_manifest("regression", contents)),
                   "--baseline", path) == 0
    smoke = write_run(tmp_path / "smoke", base_rows(), _suite_manifest("smoke", {**contents, "name": "smoke"}))
    assert run_cli(smoke, "--baseline", path) == 2
    assert "belongs to suite 'regression', the run to suite 'smoke'" in capsys.readouterr().err
    two_seeds = _suite_manifest("regression", {**contents, "seeds": [0, 1]})
    edited_suite = write_run(tmp_path / "edited", base_rows(), two_seeds)
    assert run_cli(edited_suite, "--baseline", path) == 2
    err = capsys.readouterr().err
    assert "suite 'regression' has changed since baseline" in err and "rewrite the baseline" in err


# --- paired comparison, unreliable cells, throughput ----------------------------------------------------

N_EXAMPLES = 250


def _per_example_rows(shift: float, noise: float, seed: int, khat_share: float | None = None) -> list[dict]:
    """An IWAE cell of 250 examples whose per-example values are a fixed profile plus Monte Carlo noise
    (sd ``noise`` per example, drawn from ``seed``: the same seed is the same draws) plus ``shift``."""
    profile = random.Random(0)
    base = [-30.0 + profile.gauss(0, 3) for _ in range(N_EXAMPLES)]
    draws = random.Random(seed)
    values = [v + shift + draws.gauss(0, noise) for v in base]
    mc_stderr = noise / math.sqrt(N_EXAMPLES)
    rows = [make_row("iwae", sum(values) / N_EXAMPLES, estimator="iwae", k=50, mc_stderr=mc_stderr,
                     per_example=values, n_examples=N_EXAMPLES)]
    if khat_share is not None:
        rows.append(make_row("khat_share", khat_share, estimator="iwae", k=50, unit="share", mc_stderr=None))
    return rows


def test_paired_tolerance_sees_a_loosening_below_the_monte_carlo_error_when_draws_are_shared(tmp_path):
    # Per-example noise 2 nats: the cell's Monte Carlo error is 2 / sqrt(250) = 0.126, so unpaired the tolerance
    # is 0.05 + 4 * 0.179 = 0.77 nats. The same draws shifted by 0.1 nats have per-example differences of exactly
    # -0.1 (sd ~1e-15): the tolerance is the 0.05 floor and the shift fails. New draws (seed 1) differ by noise
    # whose paired error is ~0.179 (sd of the differences 2 sqrt 2 over sqrt 250): unshifted they pass at z < 4.
    path = tmp_path / "b.json"
    assert run_cli(write_run(tmp_path / "base", _per_example_rows(0.0, 2.0, seed=0)), "--write-baseline", path) == 0
    assert run_cli(write_run(tmp_path / "shifted", _per_example_rows(-0.1, 2.0, seed=0)), "--baseline", path) == 1
    assert run_cli(write_run(tmp_path / "redrawn", _per_example_rows(0.0, 2.0, seed=1)), "--baseline", path) == 0
    result, _ = check.run_check(tmp_path / "redrawn", path, check.Settings())
    assert result.findings == [] and result.compared == 1


def test_unreliable_cell_never_fails_on_noise_but_fails_on_shared_draws(tmp_path, capsys):
    # k-hat > 0.7 on 60% of the examples. New draws moved by 1 nat (5.6 paired errors of 0.179): listed as
    # unreliable, not failed. The same draws moved by 0.5 nats: no part of it is noise, so it fails.
    path = tmp_path / "b.json"
    assert run_cli(write_run(tmp_path / "base", _per_example_rows(0.0, 2.0, 0, khat_share=0.6)),
                   "--write-baseline", path) == 0
    redrawn = write_run(tmp_path / "redrawn", _per_example_rows(-1.0, 2.0, 1, khat_share=0.6))
    assert run_cli(redrawn, "--baseline", path) == 0
    out = capsys.readouterr().out
    assert "UNRELIABLE (1)" in out and "k-hat > 0.7 on 60% of examples" in out and "raise K or replicates" in out
    loosened = write_run(tmp_path / "loosened", _per_example_rows(-0.5, 2.0, 0, khat_share=0.6))
    assert run_cli(loosened, "--baseline", path) == 1
    assert "REGRESSION (1)" in capsys.readouterr().out
    # Below UNRELIABLE_SHARE the same redrawn 1-nat move is an ordinary regression.
    assert run_cli(write_run(tmp_path / "b2", _per_example_rows(0.0, 2.0, 0, khat_share=0.1)),
                   "--write-baseline", tmp_path / "b2.json") == 0
    assert run_cli(write_run(tmp_path / "r2", _per_example_rows(-1.0, 2.0, 1, khat_share=0.1)),
                   "--baseline", tmp_path / "b2.json") == 1


def _timed(value: float, times: list[float]) -> list[dict]:
    return [make_row("throughput", value, estimator="iwae", k=50, unit="samples/s", stderr=None, mc_stderr=None,
                     timing_s=times)]


def test_throughput_needs_a_ratio_and_a_significant_mann_whitney_test(tmp_path, capsys):
    path = tmp_path / "b.json"
    assert run_cli(write_run(tmp_path / "base", _timed(1000.0, [0.010, 0.011, 0.009, 0.0105, 0.012])),
                   "--write-baseline", path) == 0
    # Every run timing above every baseline timing, 5 against 5: the one-sided exact p is 1 / C(10, 5) = 0.004.
    slow = write_run(tmp_path / "slow", _timed(400.0, [0.025, 0.026, 0.024, 0.027, 0.0255]))
    assert run_cli(slow, "--baseline", path, "--throughput-ratio", "0.5") == 1
    out = capsys.readouterr().out
    assert "throughput fell to 0.40x" in out and "Mann-Whitney U p = 0.00397" in out
    # The same ratio from timings that overlap the baseline's is not significant: information, not a failure.
    noisy = write_run(tmp_path / "noisy", _timed(400.0, [0.009, 0.030, 0.011, 0.028, 0.010]))
    assert run_cli(noisy, "--baseline", path, "--throughput-ratio", "0.5") == 0
    assert "not significantly" in capsys.readouterr().out
    assert run_cli(slow, "--baseline", path) == 2  # off unless asked: this run then compares nothing
    assert check.slower_p_value([2.0, 3.0], [0.0, 1.0]) == pytest.approx(1 / 6)  # 2 vs 2 can never reach 0.01


def test_two_methods_of_one_estimator_are_two_cells(tmp_path, capsys):
    # Two AIS entries on one model (from the prior and from q) differ only in their method: each is its own cell,
    # so a loosened one is found and named, and the other still passes.
    ais = {"estimator": "ais", "k": None, "mc_stderr": 0.05, "stderr": 0.4}
    rows = [*base_rows(), make_row("log_marginal", -27.0, method="ais(init=prior)", **ais),
            make_row("log_marginal", -26.5, method="ais(init=posterior)", **ais)]
    path = tmp_path / "baseline.json"
    assert run_cli(write_run(tmp_path / "base", rows), "--write-baseline", path) == 0
    loosened = [dict(row, value=-28.0) if row["method"] == "ais(init=posterior)" else row for row in rows]
    assert run_cli(write_run(tmp_path / "loose", loosened), "--baseline", path) == 1
    out = capsys.readouterr().out
    assert "ais k=- seed=0 log_marginal [ais(init=posterior)]" in out
    assert out.rstrip().splitlines()[-1] == "check: 7 passed, 1 failed"  # 6 compared cells of base_rows + 2
