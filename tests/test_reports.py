"""reports/: tables, formats, plots and the CLI from a small hand-written results table.

Every expected number below is computed by hand from the rows written in this file, with the
seed-combination formula of reports/cells.py:
    mean = mean_s m_s,   stderr = sqrt(mean_s se_s^2 + var_s(m, ddof=1) / S).
No Monte Carlo is involved, so the tolerances are float rounding only.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import reports
from reports import cli
from reports.load import load_results
from reports.table import build_tables

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LN2 = math.log(2.0)
DIGITS_DIMS = 64  # the digits images are 8x8
MANIFEST = {
    "run_id": "run-test", "git_commit": "abc1234def", "versions": {"python": "3.11", "numpy": "2.0"},
    "device": "cpu", "device_name": "test-cpu", "threads": 2, "command": ["python", "-m", "bench", "run"],
    "suite": {"name": "hand"}, "started": "2025-01-01T10:00:00", "finished": "2025-01-01T10:05:00",
}


DATA = {"digits": (DIGITS_DIMS, "bernoulli"), "mixture-2d": (2, "gaussian")}  # data_dim, likelihood


def _structure(dataset: str, model: str, config: dict) -> dict:
    """What the model declares in its rows (vaes.base.ModelStructure)."""
    data_dim, likelihood = DATA[dataset]
    if model == "vdm":
        continuous, steps = config.get("time") == "continuous", config.get("steps", 8)
        return {"family": "vdm", "latent_layers": steps + 1, "data_dim": data_dim, "likelihood": likelihood,
                "diffusion_steps": None if continuous else steps, "continuous_time": continuous}
    return {"family": "mlp-vae", "latent_layers": 1, "data_dim": data_dim, "likelihood": likelihood,
            "diffusion_steps": None, "continuous_time": False}


def _row(dataset, model, config, seed, estimator, k, metric, value, stderr, *, unit="nats", method=None,
         device="cpu", status="ok", error=None) -> dict:
    config_hash = f"h-{model}-" + "-".join(f"{key}{val}" for key, val in sorted(config.items()))
    return {
        "run_id": "run-test", "cell_id": f"{dataset}/{config_hash}/{seed}/{estimator}/{k}/{device}",
        "dataset": dataset, "split": "test", "model": model, "label": model, "config_hash": config_hash,
        "model_config": config, "structure": _structure(dataset, model, config), "seed": seed,
        "estimator": estimator, "k": k, "metric": metric, "method": method, "value": value, "stderr": stderr,
        "mc_stderr": None, "unit": unit, "n_examples": 100, "device": device, "wall_s": 0.01, "timing_s": None,
        "status": status, "error": error, "schema_version": 2,
    }


def digits_rows() -> list[dict]:
    """Two models (vae, iwae), two seeds, ELBO, IWAE_5, IWAE_50, log p(x), KL, active units, throughput."""
    rows = []
    per_seed = {  # model -> column -> [(value, stderr) for seed 0, 1]
        ("vae", ()): {"elbo": [(-30.0, 0.4), (-31.0, 0.2)], 5: [(-29.0, 0.3), (-29.4, 0.3)],
                      50: [(-28.5, 0.3), (-28.7, 0.3)], "logp": [(-28.0, 0.3), (-28.2, 0.3)],
                      "kl": [(6.0, 0.1), (6.4, 0.1)]},
        ("iwae", (("k", 5),)): {"elbo": [(-29.8, 0.4), (-30.2, 0.4)], 5: [(-28.9, 0.3), (-29.1, 0.3)],
                                50: [(-28.4, 0.3), (-28.6, 0.3)], "logp": [(-28.2, 0.3), (-28.2, 0.3)],
                                "kl": [(8.0, 0.1), (8.0, 0.1)]},
    }
    for (model, config), columns in per_seed.items():
        config = dict(config)
        for seed in (0, 1):
            value, se = columns["elbo"][seed]
            rows.append(_row("digits", model, config, seed, "elbo", 1, "elbo", value, se))
            rows.append(_row("digits", model, config, seed, "elbo", 1, "kl", 7.0, 0.1))  # not a table column
            for k in (5, 50):
                value, se = columns[k][seed]
                rows.append(_row("digits", model, config, seed, "iwae", k, "iwae", value, se))
                rows.append(_row("digits", model, config, seed, "iwae", k, "throughput", 1000.0 * k + seed * 100, None,
                                 unit="samples/s"))
            value, se = columns["logp"][seed]
            rows.append(_row("digits", model, config, seed, "log_marginal", 1000, "log_marginal", value, se,
                             method="iwae"))
            value, se = columns["kl"][seed]
            rows.append(_row("digits", model, config, seed, "kl_terms", 1, "kl/z", value, se))
            rows.append(_row("digits", model, config, seed, "kl_terms", 1, "kl", value, se))  # total: one layer
            for metric in ("active_units", "active_units/z"):  # total and per layer, as bench writes them
                rows.append(_row("digits", model, config, seed, "active_units", None, metric, 10 + seed, None,
                                 unit="count"))
    return rows


def diffusion_rows() -> list[dict]:
    """A VDM on a non-image dataset at T = 2, 8 and continuous time, with per-step KL and exact log p(x)."""
    rows = []
    for seed in (0, 1):
        for steps, bound in ((2, -11.0), (8, -10.25)):
            config = {"steps": steps, "time": "discrete"}
            rows.append(_row("mixture-2d", "vdm", config, seed, "elbo", 1, "elbo", bound, 0.05))
            rows.append(_row("mixture-2d", "vdm", config, seed, "log_marginal", None, "log_marginal", -10.0, 0.05,
                             method="exact"))
            rows += [_row("mixture-2d", "vdm", config, seed, "kl_terms", 1, f"kl/z_{t}", 1.0 / t, 0.01)
                     for t in range(1, steps + 1)]
        rows.append(_row("mixture-2d", "vdm", {"steps": 8, "time": "continuous"}, seed, "elbo", 1, "elbo", -10.1, 0.05))
    rows.append(_row("mixture-2d", "vdm", {"steps": 1, "time": "discrete"}, 0, "elbo", 1, "elbo", None, None,
                     status="failed", error="RuntimeError: boom at T=1"))
    rows.append(_row("mixture-2d", "vdm", {"steps": 1, "time": "discrete"}, 0, "active_units", None, "active_units",
                     None, None, status="skipped", error="VDM has no posterior means"))  # k is null here
    return rows


def write_run(run_dir: Path, rows: list[dict], *, torn_tail: bool = False, manifest: dict | None = MANIFEST) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(row) for row in rows) + "\n"
    if torn_tail:
        text += '{"run_id": "run-test", "cell_id": "torn'  # a row cut off mid-write
    (run_dir / "results.jsonl").write_text(text)
    if manifest is not None:
        (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return run_dir


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return write_run(tmp_path / "run", digits_rows() + diffusion_rows(), torn_tail=True)


def _table(run_dir: Path, dataset: str, unit: str):
    tables = build_tables(load_results([run_dir]))
    return next(t for t in tables if t.dataset == dataset and t.unit == unit)


def _seed_stderr(values, stderrs) -> float:
    """The documented formula, written out for two seeds."""
    mean = sum(values) / 2
    spread = sum((v - mean) ** 2 for v in values) / (2 - 1)
    return math.sqrt(sum(se ** 2 for se in stderrs) / 2 + spread / 2)


# ---- loading

def test_load_skips_torn_last_line_and_keeps_statuses(run_dir):
    df = load_results([run_dir])
    assert len(df) == len(digits_rows()) + len(diffusion_rows())
    assert (df["status"] == "failed").sum() == 1 and (df["status"] == "skipped").sum() == 1
    assert df.attrs["manifests"][str(run_dir)]["git_commit"] == "abc1234def"
    assert str(df["k"].dtype) == "Int64"


def test_failed_rows_keep_a_failed_metric_of_an_ok_cell_but_not_a_retried_one(tmp_path):
    ok = _row("digits", "vae", {}, 0, "iwae", 5, "iwae", -29.0, 0.3)
    timing = _row("digits", "vae", {}, 0, "iwae", 5, "throughput", None, None, status="failed", error="timing failed")
    retried = _row("digits", "vae", {}, 0, "elbo", 1, "elbo", None, None, status="failed", error="oom")
    df = load_results([write_run(tmp_path / "r", [ok, timing, retried, _row("digits", "vae", {}, 0, "elbo", 1,
                                                                              "elbo", -30.0, 0.4)])])
    assert reports.failed_rows(df)["error"].tolist() == ["timing failed"]


def test_rows_written_before_the_structure_existed_still_load_in_nats(tmp_path):
    old = [{k: v for k, v in row.items() if k not in ("label", "structure", "timing_s", "schema_version")}
           for row in digits_rows()]
    df = load_results([write_run(tmp_path / "old", old)])
    assert (df["schema_version"] == 1).all() and df["data_dim"].isna().all() and df["family"].isna().all()
    # the same numbers as a current run, but no bits/dim: the rows do not say how many dimensions the data has
    assert {(t.dataset, t.unit) for t in build_tables(df)} == {("digits", "nats"), ("digits", "gap nats")}
    old_elbo = _table(tmp_path / "old", "digits", "nats").cell("vae", "ELBO")
    new_elbo = _table(write_run(tmp_path / "new", digits_rows()), "digits", "nats").cell("vae", "ELBO")
    assert (old_elbo["value"], old_elbo["stderr"]) == (new_elbo["value"], new_elbo["stderr"])
    # beside a current run of the same dataset, the rows that declare D give it; the old ones do not contradict it
    both = build_tables(load_results([tmp_path / "old", tmp_path / "new"]))
    assert {(t.dataset, t.unit) for t in both} == {("digits", "nats"), ("digits", "bits/dim"), ("digits", "gap nats")}


def test_corrupt_middle_line_is_an_error(tmp_path):
    run = write_run(tmp_path / "run", digits_rows()[:3])
    lines = (run / "results.jsonl").read_text().splitlines()
    (run / "results.jsonl").write_text("\n".join([lines[0], "{not json", lines[1]]) + "\n")
    with pytest.raises(reports.ReportError, match="line 2"):
        load_results([run])


# ---- the comparison table in nats

def test_bound_cells_mean_and_stderr_over_seeds(run_dir):
    table = _table(run_dir, "digits", "nats")
    assert table.rows == ["iwae", "vae"]  # one config per model: plain model names
    elbo = table.cell("vae", "ELBO")
    assert elbo["value"] == pytest.approx(-30.5, abs=1e-12)
    # sqrt((0.4^2 + 0.2^2)/2 + var(-30, -31)/2) = sqrt(0.1 + 0.25)
    assert elbo["stderr"] == pytest.approx(math.sqrt(0.35), abs=1e-12)
    assert elbo["stderr"] == pytest.approx(_seed_stderr([-30.0, -31.0], [0.4, 0.2]), abs=1e-12)
    iwae50 = table.cell("iwae", "IWAE_50")
    assert iwae50["value"] == pytest.approx(-28.5, abs=1e-12)
    assert iwae50["stderr"] == pytest.approx(math.sqrt(0.09 + 0.02 / 2), abs=1e-12)
    assert [c.id for c in table.columns][:4] == ["seeds", "ELBO", "IWAE_5", "IWAE_50"]
    assert table.cell("vae", "seeds")["value"] == 2


def test_log_marginal_kl_active_units_throughput(run_dir):
    table = _table(run_dir, "digits", "nats")
    logp = table.cell("vae", "log p(x)")
    assert (logp["value"], logp["note"]) == (pytest.approx(-28.1, abs=1e-12), "IWAE-1000 estimate")
    assert "gap" not in [c.id for c in table.columns]  # gaps have their own table
    kl = table.cell("vae", "KL z")
    assert kl["value"] == pytest.approx(6.2, abs=1e-12)
    assert kl["stderr"] == pytest.approx(math.sqrt(0.01 + 0.08 / 2), abs=1e-12)
    with pytest.raises(KeyError):  # one layer: no per-layer column beside the total
        table.cell("iwae", "AU z")
    units = table.cell("iwae", "AU")
    assert units["value"] == pytest.approx(10.5) and units["stderr"] == pytest.approx(math.sqrt(0.5 / 2))
    # throughput of the tightest bound (IWAE_50): seeds 50000 and 50100, no per-seed stderr
    speed = table.cell("vae", "samples/s (cpu)")
    assert speed["value"] == pytest.approx(50050.0) and speed["stderr"] == pytest.approx(math.sqrt(5000.0 / 2))


def test_best_entries_marked_per_column(run_dir):
    table = _table(run_dir, "digits", "nats")
    best = {(row, col) for row, col, b in zip(table.cells["row"], table.cells["column"], table.cells["best"]) if b}
    # bounds: highest; log p(x): highest (vae -28.1 > -28.2);
    # throughput: highest (equal means: both marked); KL and active units: never marked
    assert best == {("iwae", "ELBO"), ("iwae", "IWAE_5"), ("iwae", "IWAE_50"), ("vae", "log p(x)"),
                    ("iwae", "samples/s (cpu)"), ("vae", "samples/s (cpu)")}


def test_bits_per_dim_conversion_by_hand(run_dir):
    bits = _table(run_dir, "digits", "bits/dim")
    scale = DIGITS_DIMS * LN2
    elbo = bits.cell("vae", "ELBO")
    assert elbo["value"] == pytest.approx(30.5 / scale, abs=1e-12)  # -(-30.5) / (64 ln 2) = 30.5 / 44.3614 bits/dim
    assert elbo["value"] == pytest.approx(0.687534, abs=1e-6)
    assert elbo["stderr"] == pytest.approx(math.sqrt(0.35) / scale, abs=1e-12)
    assert bits.cell("vae", "KL z")["value"] == pytest.approx(6.2 / scale, abs=1e-12)
    assert bits.cell("vae", "AU")["value"] == pytest.approx(10.5)  # counts are not converted
    # as an NLL the lowest bits/dim is best: still iwae's bounds, and vae's log p(x)
    marked = bits.cells[bits.cells["best"] & (bits.cells["kind"] == "bound")]
    assert set(marked["row"]) == {"iwae"}
    assert bits.cells[bits.cells["best"] & (bits.cells["column"] == "log p(x)")]["row"].tolist() == ["vae"]
    # only discrete data (a Bernoulli likelihood, as the rows declare) gets a bits/dim table
    units = {(t.dataset, t.unit) for t in build_tables(load_results([run_dir]))}
    assert units == {("digits", "nats"), ("digits", "bits/dim"), ("mixture-2d", "nats"), ("digits", "gap nats"),
                     ("mixture-2d", "gap nats")}


def test_config_labels_and_exact_log_marginal(run_dir):
    table = _table(run_dir, "mixture-2d", "nats")
    assert table.rows == ["vdm (steps=2, time=discrete)", "vdm (steps=8, time=continuous)",
                          "vdm (steps=8, time=discrete)"]
    logp = table.cell("vdm (steps=8, time=discrete)", "log p(x)")
    assert (logp["value"], logp["note"]) == (pytest.approx(-10.0), "exact")
    gaps = _table(run_dir, "mixture-2d", "gap nats")
    assert gaps.cell("vdm (steps=8, time=discrete)", "ELBO")["value"] == pytest.approx(0.25)
    assert gaps.cell("vdm (steps=8, time=discrete)", "log p(x)")["note"].startswith("exact; errors unpaired")
    assert "vdm (steps=8, time=continuous)" not in gaps.rows  # no log p(x) and no IWAE of its own: no gap
    # 8 KL layers > MAX_KL_COLUMNS: their sum, sum_t 1/t, in one column; 2 layers: one column each
    total = table.cell("vdm (steps=8, time=discrete)", "KL total")
    assert total["value"] == pytest.approx(sum(1.0 / t for t in range(1, 9)))
    assert total["stderr"] == pytest.approx(8 * 0.01)
    assert table.cell("vdm (steps=2, time=discrete)", "KL z_2")["value"] == pytest.approx(0.5)
    assert [c.id for c in table.columns if c.kind.startswith("kl")] == ["KL z_1", "KL z_2", "KL total"]


def test_exact_and_largest_k_measurement_win(tmp_path):
    rows = [_row("digits", "vae", {}, 0, "elbo", 1, "elbo", -31.0, 0.5),
            _row("digits", "vae", {}, 0, "elbo", 100, "elbo", -30.0, 0.1),
            _row("digits", "vae", {}, 0, "log_marginal", 5000, "log_marginal", -29.5, 0.1, method="iwae"),
            _row("digits", "vae", {}, 0, "log_marginal", None, "log_marginal", -29.0, 0.1, method="exact")]
    table = _table(write_run(tmp_path / "r", rows), "digits", "nats")
    assert table.cell("vae", "ELBO")["value"] == -30.0
    assert math.isnan(table.cell("vae", "seeds")["stderr"])
    assert (table.cell("vae", "log p(x)")["value"], table.cell("vae", "log p(x)")["note"]) == (-29.0, "exact")
    assert table.cell("vae", "ELBO")["stderr"] == pytest.approx(0.1)  # one seed: its own stderr


def test_many_kl_layers_use_the_measured_total_and_several_layers_get_au_columns(tmp_path):
    rows = [_row("digits", "vdm", {}, 0, "kl_terms", 1, f"kl/z_{t}", 0.1, 0.01) for t in range(1, 11)]
    rows.append(_row("digits", "vdm", {}, 0, "kl_terms", 1, "kl", 1.0, 0.02))
    rows += [_row("digits", "vdm", {}, 0, "active_units", None, metric, n, None, unit="count")
             for metric, n in (("active_units", 5), ("active_units/z_1", 3), ("active_units/z_2", 2))]
    table = _table(write_run(tmp_path / "r", rows), "digits", "nats")
    total = table.cell("vdm", "KL total")
    assert (total["value"], total["stderr"], total["note"]) == (1.0, 0.02, "measured total")
    assert [c.id for c in table.columns] == ["seeds", "KL total", "AU", "AU z_1", "AU z_2"]
    assert table.cell("vdm", "AU z_2")["value"] == 2
    # bits/dim: a KL total keeps its sign, 1 nat / (64 ln 2)
    bits = _table(tmp_path / "r", "digits", "bits/dim")
    assert bits.cell("vdm", "KL total")["value"] == pytest.approx(1.0 / (DIGITS_DIMS * LN2))


# ---- the report files

def test_every_format_written_with_expected_content(run_dir, tmp_path):
    out = tmp_path / "out"
    written = reports.build_report([run_dir], formats=("md", "html", "tex", "csv", "png"), out_dir=out)
    names = {p.name for p in written}
    assert {"report.md", "report.html", "report.tex", "comparison.csv"} <= names
    assert all(p.stat().st_size > 0 for p in written)
    # iwae's ELBO: -30.0 +- sqrt(0.16 + 0.08/2) = 0.447 -> two decimals
    md = (out / "report.md").read_text()
    assert "**-30.00 ± 0.45**" in md and "| vae | 2 | -30.50 ± 0.59 |" in md
    assert "bits/dim" in md and "RuntimeError: boom at T=1" in md and "abc1234def" in md
    assert "| skipped | VDM has no posterior means |" in md
    assert "![bound_vs_k.png](bound_vs_k.png)" in md
    tex = (out / "report.tex").read_text()
    # bold inside math mode (\textbf around $...$ would leave the math upright and unbold)
    assert r"$\mathbf{-30.00 \pm 0.45}$" in tex and r"$-30.50 \pm 0.59$" in tex and r"\textbf{$" not in tex
    assert all(rule in tex for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"IWAE\_50"))
    page = (out / "report.html").read_text()
    assert "<strong>-30.00 ± 0.45</strong>" in page and "-30.50 ± 0.59" in page
    assert page.count("data:image/png;base64,") == 5  # every plot embedded: one self-contained file
    assert "abc1234def" in page and "test-cpu" in page and "2025-01-01T10:05:00" in page
    assert "RuntimeError: boom at T=1" in page
    csv = pd.read_csv(out / "comparison.csv")
    cell = csv[(csv["dataset"] == "digits") & (csv["unit"] == "bits/dim") & (csv["model"] == "vae")
               & (csv["column"] == "ELBO")].iloc[0]
    assert cell["value"] == pytest.approx(30.5 / (DIGITS_DIMS * LN2)) and not cell["best"]


def test_every_plot_is_a_png(run_dir, tmp_path):
    written = reports.build_report([run_dir], formats=["png"], out_dir=tmp_path / "plots")
    stems = ["bound_vs_k", "gap", "kl_layers", "throughput", "bound_vs_steps"]
    # each plot as PNG, with an SVG of it beside
    assert sorted(p.name for p in written) == sorted([f"{s}.png" for s in stems] + [f"{s}.svg" for s in stems])
    for path in written:
        data = path.read_bytes()
        if path.suffix == ".png":
            assert data[:8] == PNG_MAGIC and len(data) > 10_000, path.name
        else:
            assert b"<svg" in data[:1000] and len(data) > 10_000, path.name


def test_default_out_dir_and_formats(run_dir):
    written = reports.build_report([run_dir])
    # report.md links the plots, so they are written beside it (PNG and SVG)
    plots = [f"{s}.{fmt}" for s in ["bound_vs_k", "gap", "kl_layers", "throughput", "bound_vs_steps"]
             for fmt in ("png", "svg")]
    assert sorted(p.name for p in written) == sorted(["report.html", "report.md", *plots])
    assert all(p.parent == run_dir / "report" for p in written)


def test_bad_input_raises_report_error(tmp_path, run_dir):
    with pytest.raises(reports.ReportError, match="unknown report format 'pdf'; choose from"):
        reports.build_report([run_dir], formats=["md", "pdf"])
    with pytest.raises(reports.ReportError, match=r"no results\.jsonl"):
        reports.build_report([tmp_path / "nowhere"])
    failed_only = write_run(tmp_path / "failed", diffusion_rows()[-2:])
    with pytest.raises(reports.ReportError, match="no results to report"):
        reports.build_report([failed_only])
    assert issubclass(reports.ReportError, ValueError)


def test_png_without_plot_extra_fails_clearly(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "seaborn", None)  # import seaborn now raises ImportError
    with pytest.raises(reports.ReportError, match=r"elbo-bench\[plot\]"):
        reports.build_report([run_dir], formats=["png"], out_dir=tmp_path / "a")
    written = reports.build_report([run_dir], formats=["html"], out_dir=tmp_path / "b")  # tables still written
    page = written[0].read_text()
    assert "No plots:" in page and "<strong>-30.00 ± 0.45</strong>" in page


# ---- command line and imports

def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_exit_codes(run_dir, tmp_path, capsys):
    assert cli.main(_parse([str(run_dir), "--format", "md,csv", "--out", str(tmp_path / "o")])) == 0
    assert (tmp_path / "o" / "comparison.csv").stat().st_size > 0
    capsys.readouterr()
    assert cli.main(_parse([str(run_dir), "--format", "docx"])) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "docx" in err and "md, html, tex, csv, png" in err
    assert cli.main(_parse([str(tmp_path / "missing")])) == 2


@pytest.mark.slow  # 3.5 s: a fresh interpreter builds a report
def test_reports_does_not_import_torch(run_dir, tmp_path):
    code = ("import sys, reports; from pathlib import Path; "
            f"reports.build_report([Path({str(run_dir)!r})], formats=['md', 'csv'], out_dir=Path({str(tmp_path)!r})); "
            "import reports.plots; reports.plots.plotting(); "
            "assert 'torch' not in sys.modules, 'reports imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_unpaired_gap_per_model_against_its_own_log_marginal(run_dir):
    # Rows without per-example values: gap = reference - bound per seed, its error the sum of the two errors
    # (an upper bound whatever the correlation), then combined over seeds like any cell.
    gaps = _table(run_dir, "digits", "gap nats")
    assert gaps.rows == ["iwae", "vae"] and [c.id for c in gaps.columns] == ["log p(x)", "ELBO", "IWAE_5", "IWAE_50"]
    # iwae: IWAE-1000 -28.2 (0.3) both seeds; IWAE_50 -28.4, -28.6 (0.3): gaps 0.2, 0.4 with errors 0.6
    iwae50 = gaps.cell("iwae", "IWAE_50")
    assert iwae50["value"] == pytest.approx(0.3, abs=1e-12)
    assert iwae50["stderr"] == pytest.approx(math.sqrt(0.36 + 0.02 / 2), abs=1e-12)
    # vae: ELBO gaps -28.0 - (-30.0) = 2.0 (0.3 + 0.4) and -28.2 - (-31.0) = 2.8 (0.3 + 0.2)
    elbo = gaps.cell("vae", "ELBO")
    assert elbo["value"] == pytest.approx(2.4, abs=1e-12)
    assert elbo["stderr"] == pytest.approx(math.sqrt((0.49 + 0.25) / 2 + 0.32 / 2), abs=1e-12)
    assert gaps.cell("vae", "log p(x)")["note"] == "IWAE-1000; errors unpaired (sum of standard errors)"
    assert not gaps.cells["best"].any()  # each row has its own reference: nothing to rank across rows


def _paired_rows(bounds: dict, reference: tuple[str, int | None, list[float]]) -> list[dict]:
    rows = []
    for (estimator, k), values in bounds.items():
        row = _row("digits", "vae", {}, 0, estimator, k, estimator, sum(values) / len(values), 1.0)
        rows.append({**row, "per_example": values, "schema_version": 3})
    method, k, values = reference
    row = _row("digits", "vae", {}, 0, "log_marginal", k, "log_marginal", sum(values) / len(values), 1.0,
               method=method)
    return [*rows, {**row, "per_example": values, "schema_version": 3}]


def test_paired_gap_from_per_example_values_never_a_bound_against_itself(tmp_path):
    # log p(x) as IWAE-50 is the IWAE_50 bound itself (same estimate, same draws): no gap to it. The others are
    # paired: d = logp_i - bound_i over the 4 examples, gap mean(d), error sd(d) / sqrt(4).
    logp = [-20.0, -25.0, -30.0, -21.0]
    elbo = [-21.0, -26.5, -31.0, -23.0]  # d = 1.0, 1.5, 1.0, 2.0: mean 1.375, sd 0.4787
    iwae5 = [-20.5, -25.5, -30.4, -21.6]  # d = 0.5, 0.5, 0.4, 0.6: mean 0.5, sd 0.08165
    rows = _paired_rows({("elbo", 1): elbo, ("iwae", 5): iwae5, ("iwae", 50): logp}, ("iwae", 50, logp))
    gaps = _table(write_run(tmp_path / "run", rows), "digits", "gap nats")
    assert [c.id for c in gaps.columns] == ["log p(x)", "ELBO", "IWAE_5"]
    assert gaps.cell("vae", "ELBO")["value"] == pytest.approx(1.375, abs=1e-12)
    assert gaps.cell("vae", "ELBO")["stderr"] == pytest.approx(0.478714 / 2, abs=1e-6)
    assert gaps.cell("vae", "IWAE_5")["value"] == pytest.approx(0.5, abs=1e-12)
    # unpaired, the error would be 1 + 1 = 2 nats: pairing is what makes the gap resolvable
    assert gaps.cell("vae", "IWAE_5")["stderr"] == pytest.approx(0.0816497 / 2, abs=1e-6)
    assert gaps.cell("vae", "log p(x)")["note"] == "IWAE-50"
    # an exact log p(x) outranks any estimate, and the largest-K IWAE bound is the reference without one
    exact = _paired_rows({("iwae", 5): iwae5, ("iwae", 500): logp}, ("exact", None, logp))
    assert _table(write_run(tmp_path / "exact", exact), "digits", "gap nats").cell("vae", "log p(x)")["note"] == "exact"
    no_logp = [row for row in rows if row["estimator"] != "log_marginal"]
    gaps = _table(write_run(tmp_path / "nologp", no_logp), "digits", "gap nats")
    assert gaps.cell("vae", "log p(x)")["note"] == "IWAE-50" and [c.id for c in gaps.columns][1:] == ["ELBO",
                                                                                                    "IWAE_5"]


def test_ais_outranks_iwae_as_the_reference_and_is_named_by_its_settings(tmp_path):
    # log p(x) by IWAE-50 and by AIS on the same 4 examples: AIS is the reference (REFERENCE_RANK), so IWAE_50
    # gets a gap too: d = ais_i - iwae50_i = 0.2, 0.1, 0.3, 0.2: mean 0.2, sd 0.08165.
    logp = [-20.0, -25.0, -30.0, -21.0]
    ais = [-19.8, -24.9, -29.7, -20.8]
    rows = _paired_rows({("iwae", 5): [-20.5, -25.5, -30.4, -21.6], ("iwae", 50): logp}, ("iwae", 50, logp))
    method = "ais(steps=200, chains=16, leapfrog=10, schedule=sigmoid, init=prior)"
    annealed = _row("digits", "vae", {}, 0, "ais", None, "log_marginal", sum(ais) / 4, 1.0, method=method)
    gaps = _table(write_run(tmp_path / "run", [*rows, {**annealed, "per_example": ais, "schema_version": 3}]),
                  "digits", "gap nats")
    assert gaps.cell("vae", "log p(x)")["note"] == "AIS-200x16 from prior"
    assert gaps.cell("vae", "log p(x)")["value"] == pytest.approx(sum(ais) / 4, abs=1e-12)
    assert gaps.cell("vae", "IWAE_50")["value"] == pytest.approx(0.2, abs=1e-12)
    assert gaps.cell("vae", "IWAE_50")["stderr"] == pytest.approx(0.0816497 / 2, abs=1e-6)
