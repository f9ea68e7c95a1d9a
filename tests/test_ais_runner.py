"""AIS and BDMC through the runner: their settings checked when a suite loads, their rows, and the report;
and the mixture-latent model, the closed-form multimodal case of the `ais` suite.

Tolerances: an AIS row's mc_stderr is the Monte Carlo error of its mean over the examples,
sqrt(sum_i se_i^2) / n with each se_i the chains' error of one example (estimators.ais). At 3 of
them a correct estimator fails about 0.3% of the time; every run is seeded, so a failure is a change.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch

import estimators as E
import vaes
from bench.cli import main
from bench.plan.fits import prepare
from bench.plan.keys import SuiteError
from bench.plan.suite import load_suite, parse_suite
from reports.build import build_report
from reports.schema import method_settings, method_text, read_rows

pytestmark = pytest.mark.usefixtures("one_thread")


# --- settings are checked when the suite loads ----------------------------------------------------------

def _suite(estimator: dict) -> dict:
    return {"datasets": ["linear-gaussian"], "train": {"steps": 5},
            "models": [{"name": "linear-gaussian"}], "estimators": [estimator]}


@pytest.mark.parametrize("estimator, message", [
    ({"name": "ais", "steps": 0}, "estimators[0] (ais): AIS steps must be an integer >= 1, got 0"),
    ({"name": "ais", "steps": 2.5}, "estimators[0] (ais): AIS steps must be an integer >= 1, got 2.5"),
    ({"name": "ais", "chains": 0}, "estimators[0] (ais): AIS chains must be an integer >= 1, got 0"),
    ({"name": "ais", "chains": "many"}, "estimators[0] (ais): AIS chains must be an integer >= 1, got 'many'"),
    ({"name": "ais", "leapfrog": -1}, "estimators[0] (ais): AIS leapfrog must be an integer >= 1, got -1"),
    ({"name": "ais", "schedule": "cosine"},
     "estimators[0] (ais): unknown AIS schedule 'cosine'; choices: sigmoid, linear"),
    ({"name": "ais", "init": "encoder"}, "estimators[0] (ais): unknown AIS init 'encoder'; choices: prior, posterior"),
    ({"name": "bdmc", "steps": 0}, "estimators[0] (bdmc): AIS steps must be an integer >= 1, got 0"),
    ({"name": "bdmc", "init": "q"}, "estimators[0] (bdmc): unknown AIS init 'q'; choices: prior, posterior"),
    ({"name": "ais", "k": 5}, "estimators[0].k is not a known key; choices: name, n_examples, steps, chains, "
                              "leapfrog, schedule, init"),
    ({"name": "bdmc", "n_examples": 0}, "estimators[0].n_examples must be an integer >= 1, got 0"),
])
def test_bad_settings_are_a_suite_error_naming_the_entry(estimator, message):
    with pytest.raises(SuiteError) as info:
        parse_suite(_suite(estimator), source="t.toml", default_name="t", label="t.toml")
    assert str(info.value) == f"suite t.toml: {message}"


def test_a_bad_setting_exits_2_with_one_line_before_any_run_directory(tmp_path, capsys):
    suite = tmp_path / "bad.toml"
    suite.write_text(textwrap.dedent("""
        datasets = ["linear-gaussian"]
        [[models]]
        name = "linear-gaussian"
        [[estimators]]
        name = "ais"
        chains = 0
    """))
    code = main(["run", "--all", "--suite", str(suite), "--out", str(tmp_path / "out"), "--quiet", "--no-report"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == [err]
    assert "suite bad.toml: estimators[0] (ais): AIS chains must be an integer >= 1, got 0" in err
    assert not (tmp_path / "out").exists()


def test_the_shipped_ais_suite_prepares():
    plan = prepare(load_suite("ais"))
    cells = {(fit.model.label, cell.estimator) for fit in plan.fits for cell in fit.cells}
    assert {("linear-gaussian", "ais"), ("mixture-latent", "bdmc"), ("vae", "ais"), ("hvae", "bdmc")} <= cells
    assert ("vae", "log_marginal") not in cells  # no exact log p(x) for the digits models


def test_method_text_round_trips():
    settings = {"steps": 200, "chains": 16, "init": "prior"}
    text = method_text("ais", settings)
    assert text == "ais(steps=200, chains=16, init=prior)"
    assert method_settings(text) == ("ais", {key: str(value) for key, value in settings.items()})
    assert method_settings("iwae") == ("iwae", {}) and method_settings(None) == (None, {})


# --- a tiny ais suite end to end ------------------------------------------------------------------------

TINY_AIS = textwrap.dedent("""
    datasets = ["linear-gaussian", "mixture-2d"]
    threads = 1
    [train]
    steps = 5
    eval_every = 5
    eval_examples = 20
    [eval]
    n_examples = 20
    batch_size = 10         # two batches: AIS and BDMC rows gather them
    [timing]
    enabled = true          # AIS and BDMC cells write no timing rows even so
    n_examples = 4
    warmup = 0
    repeats = 1
    [[models]]
    name = "linear-gaussian"
    datasets = ["linear-gaussian"]
    [[models]]
    name = "vdm-oracle"     # no log_joint: AIS and BDMC are not applicable
    datasets = ["mixture-2d"]
    estimators = ["ais", "bdmc"]
    [[estimators]]
    name = "log_marginal"
    method = "exact"
    [[estimators]]
    name = "ais"
    steps = 30
    chains = 8
    [[estimators]]
    name = "bdmc"
    steps = 30
    chains = 8
    n_examples = 10
""")


@pytest.fixture(scope="module")
def tiny_ais_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ais")
    (root / "tiny-ais.toml").write_text(TINY_AIS)
    code = main(["run", "--all", "--suite", str(root / "tiny-ais.toml"), "--out", str(root / "run"),
                 "--cache-dir", str(root / "cache"), "--no-report", "--quiet"])
    assert code == 0
    return root / "run"


def _rows(run_dir: Path) -> dict[tuple[str, str, str], dict]:
    return {(r["model"], r["estimator"], r["metric"]): r for r in read_rows(run_dir)[0]}


def test_ais_through_the_runner_matches_the_exact_log_marginal(tiny_ais_run):
    rows = _rows(tiny_ais_run)
    exact = rows[("linear-gaussian", "log_marginal", "log_marginal")]
    ais = rows[("linear-gaussian", "ais", "log_marginal")]
    assert exact["method"] == "exact" and exact["n_examples"] == ais["n_examples"] == 20
    assert ais["method"] == "ais(steps=30, chains=8, leapfrog=10, schedule=sigmoid, init=prior)"
    assert ais["k"] is None and ais["mc_stderr"] > 0
    assert abs(ais["value"] - exact["value"]) < 3 * ais["mc_stderr"], (ais["value"], exact["value"], ais["mc_stderr"])
    # Diagnostics beside the value: mean acceptance probability (30 steps leave the tuning short of 0.65, from
    # a small first step, so it is high), and the ESS of 8 chains, between 1 and 8.
    assert 0.5 < rows[("linear-gaussian", "ais", "acceptance")]["value"] <= 1
    assert 1 <= rows[("linear-gaussian", "ais", "ess")]["value"] <= 8
    assert not any(r["metric"] == "throughput" and r["estimator"] in ("ais", "bdmc") for r in rows.values())


def test_bdmc_rows_are_a_sandwich_on_simulated_data(tiny_ais_run):
    rows = _rows(tiny_ais_run)
    lower, upper, gap = (rows[("linear-gaussian", "bdmc", f"bdmc_{side}")] for side in ("lower", "upper", "gap"))
    assert {r["method"] for r in (lower, upper, gap)} == {
        "bdmc(steps=30, chains=8, leapfrog=10, schedule=sigmoid, init=prior)"}
    assert lower["n_examples"] == upper["n_examples"] == gap["n_examples"] == 10
    assert gap["value"] == pytest.approx(upper["value"] - lower["value"], abs=1e-9)
    # Both bounds of the same log p(x): lower <= upper up to their Monte Carlo errors.
    assert gap["value"] > -3 * math.hypot(lower["mc_stderr"], upper["mc_stderr"])


def test_models_without_log_joint_get_skipped_rows(tiny_ais_run):
    rows = _rows(tiny_ais_run)
    for estimator, metric in (("ais", "log_marginal"), ("bdmc", "bdmc_gap")):
        row = rows[("vdm-oracle", estimator, metric)]
        assert row["status"] == "skipped" and f"{estimator} needs a model with 'log_joint'" in row["error"]


def test_the_report_says_where_each_log_marginal_came_from(tiny_ais_run, tmp_path):
    (report,) = build_report([tiny_ais_run], formats=["md"], out_dir=tmp_path)
    text = report.read_text()
    rows = _rows(tiny_ais_run)
    lower, upper = (rows[("linear-gaussian", "bdmc", f"bdmc_{side}")]["value"] for side in ("lower", "upper"))
    assert "| log p(x) | log p(x) from |" in text and "| exact |" in text
    assert "| AIS 30x8 L10 sigmoid prior | on |" in text and "| 20 examples |" in text
    # Markdown escapes brackets (reports.render.md_escape): they render as written
    assert "| BDMC gap 30x8 L10 sigmoid prior | BDMC \\[lower, upper\\] |" in text
    assert f"\\[{lower:.2f}, {upper:.2f}\\] nats, 10 simulated" in text


@pytest.mark.slow
def test_log_marginal_method_ais_from_a_suite(tmp_path):
    """estimators.log_marginal's default AIS (1,000 steps x 16 chains) as a suite's log_marginal method."""
    suite = tmp_path / "lm.toml"
    suite.write_text(TINY_AIS.split("[[models]]")[0].replace("n_examples = 20", "n_examples = 10") + textwrap.dedent("""
        [[models]]
        name = "linear-gaussian"
        datasets = ["linear-gaussian"]
        [[estimators]]
        name = "log_marginal"
        method = "exact"
        [[estimators]]
        name = "log_marginal"
        method = "ais"
    """))
    assert main(["run", "--all", "--suite", str(suite), "--out", str(tmp_path / "run"), "--cache-dir",
                 str(tmp_path / "cache"), "--no-report", "--quiet"]) == 0
    rows = read_rows(tmp_path / "run")[0]
    method = "ais(steps=1000, chains=16, leapfrog=10, schedule=sigmoid, init=prior)"
    assert {r["metric"] for r in rows if r["method"] == method} == {"log_marginal"}  # no timing rows
    ais, exact = ({r["method"]: r for r in rows if r["metric"] == "log_marginal"}[m] for m in (method, "exact"))
    assert ais["k"] is None and ais["n_examples"] == exact["n_examples"] == 10
    assert abs(ais["value"] - exact["value"]) < 3 * ais["mc_stderr"]


# --- the mixture-latent model ----------------------------------------------------------------------------

def test_mixture_latent_marginal_is_the_integral_of_its_joint():
    """p(x) = int p(x, z) dz by the midpoint rule on a grid fine against the narrowest posterior (std 0.1):
    spacing 0.01 over [-3.5, 3.5]^2, which holds every component (radius 2, std 0.2) to beyond 7 stds."""
    model = vaes.create_model("mixture-latent")
    x, _ = model.sample_joint(4, generator=torch.Generator().manual_seed(0))
    step = 0.01
    axis = torch.arange(-3.5 + step / 2, 3.5, step, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)[:, None, :].expand(-1, 4, 2)  # [G, B, 2]
    integral = torch.logsumexp(model.log_joint(x, {"z": grid}), 0) + 2 * math.log(step)
    torch.testing.assert_close(integral, model.exact_log_marginal(x), rtol=0, atol=1e-6)
    data = vaes.mixture.get_mixture("ring-2d")
    torch.testing.assert_close(model.exact_log_marginal(x), data.log_prob(x), rtol=0, atol=0)


def test_mixture_latent_ais_from_q_matches_its_exact_log_marginal():
    model = vaes.create_model("mixture-latent")
    x, _ = model.sample_joint(20, generator=torch.Generator().manual_seed(1))
    estimate = E.ais(model, x, steps=30, chains=8, init="posterior", generator=torch.Generator().manual_seed(2))
    error = float((estimate.value - model.exact_log_marginal(x)).mean())
    assert abs(error) < 3 * estimate.mean_stderr(), (error, estimate.mean_stderr())


@pytest.mark.parametrize("config, message", [
    ({"noise": 1.0}, "noise must lie strictly between 0 and 1, got 1.0"),
    ({"mixture": "random-16d"}, "mixture 'random-16d' is 16-dimensional, but data_dim is 2"),
    ({"likelihood": "bernoulli"}, "mixture-latent models real-valued data only"),
])
def test_mixture_latent_bad_configs_are_named(config, message):
    with pytest.raises(ValueError, match=message):
        vaes.create_model("mixture-latent", **config)
