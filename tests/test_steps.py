"""One trained continuous-time VDM evaluated at many T through a suite's `eval_configs`: one training run,
one row per T, and the bounds along T behaving as the VDM paper says (L_2T >= L_T, L_T -> L_inf).

Tolerances: 4 standard errors. Comparisons between two T use common random numbers and the standard
error of the mean per-example difference, std(d) / sqrt(N) (paired); comparisons between a runner row
and a recomputed value use the rows' own standard errors over examples combined in quadrature
(conservative: the two share the examples).
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

import estimators
from bench.cli import main
from bench.data import load_dataset
from bench.plan.fits import prepare
from bench.plan.suite import load_suite
from bench.train import TrainConfig, train_model
from reports.schema import read_rows
from vaes import create_model

Z = 4.0
STEPS = [1, 2, 4, 8]
VDM_CONFIG = {"time": "continuous", "hidden": [64, 64]}
TRAIN = {"steps": 1500, "batch_size": 100, "lr": 3e-3, "schedule": "cosine", "eval_every": 1500,
         "eval_examples": 100}
N_EXAMPLES = 200


def _toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


SUITE = "\n".join([
    'name = "steps-test"',
    'datasets = ["mixture-2d"]',
    "threads = 1",
    "[train]", *(f"{k} = {_toml_value(v)}" for k, v in TRAIN.items()),
    "[eval]", f"n_examples = {N_EXAMPLES}", "batch_size = 100",
    "[timing]", "enabled = false",
    "[[models]]", 'name = "vdm"', f"config = {_toml_value(VDM_CONFIG)}",
    "eval_configs = [" + ", ".join(_toml_value({"log_weights_steps": t}) for t in STEPS) + "]",
    'estimators = ["elbo", "kl_terms", "diffusion_elbo"]',
    "[[models]]", 'name = "vdm-oracle"', 'config = { mixture = "ring-2d", time = "continuous" }',
    "eval_configs = [" + ", ".join(_toml_value({"log_weights_steps": t}) for t in STEPS) + "]",
    'estimators = ["elbo", "diffusion_elbo", "log_marginal"]',
    "[[estimators]]", 'name = "elbo"', "samples = 16",
    "[[estimators]]", 'name = "kl_terms"', "samples = 8", "n_examples = 50",
    "[[estimators]]", 'name = "diffusion_elbo"', "samples = 32",
    "[[estimators]]", 'name = "log_marginal"',
])


@pytest.fixture(scope="module")
def steps_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("steps")
    suite = root / "steps-test.toml"
    suite.write_text(SUITE)
    run_dir, cache = root / "run", root / "cache"
    previous = torch.get_num_threads()
    try:
        assert main(["run", "--all", "--suite", str(suite), "--out", str(run_dir), "--cache-dir", str(cache),
                     "--no-report", "--quiet"]) == 0
    finally:
        torch.set_num_threads(previous)
    return run_dir, cache


def _rows(run_dir: Path, model: str, metric: str) -> dict[int, dict]:
    """T -> the ok row of `metric` of `model`."""
    rows = [r for r in read_rows(run_dir)[0] if r["model"] == model and r["metric"] == metric and r["status"] == "ok"]
    return {r["model_config"]["log_weights_steps"]: r for r in rows}


def test_the_evaluations_share_one_training_run_and_differ_only_in_T(steps_run):
    run_dir, cache = steps_run
    rows = [r for r in read_rows(run_dir)[0] if r["model"] == "vdm"]
    train_rows = [r for r in rows if r["estimator"] == "train"]
    # one training cell: its train_seconds row and its training curve (rows valid_elbo/<step>)
    assert len({r["cell_id"] for r in train_rows}) == 1
    assert [r["metric"] for r in train_rows].count("train_seconds") == 1
    assert all(r["model_config"] == VDM_CONFIG for r in train_rows)
    assert len(list(cache.glob("vdm--mixture-2d--*.pt"))) == 1  # one checkpoint, keyed by the trained config
    evaluated = [r for r in rows if r["estimator"] != "train"]
    configs = {json.dumps(r["model_config"], sort_keys=True) for r in evaluated}
    assert sorted(json.loads(c)["log_weights_steps"] for c in configs) == STEPS
    assert all({k: v for k, v in json.loads(c).items() if k != "log_weights_steps"} == VDM_CONFIG for c in configs)
    # One row label and one config hash per T, the hash of the evaluated model's config.
    by_t = {r["model_config"]["log_weights_steps"]: (r["label"], r["config_hash"]) for r in evaluated}
    assert len({h for _, h in by_t.values()}) == len(STEPS)
    assert by_t[4][0] == "vdm (log_weights_steps=4)"
    for t, (_, config_hash) in by_t.items():
        assert config_hash == create_model("vdm", data_dim=2, likelihood="gaussian", **VDM_CONFIG,
                                           log_weights_steps=t).config_hash()
    # Same network, same seed, same draws: L_inf does not depend on T, to the last digit.
    limits = {t: r["value"] for t, r in _rows(run_dir, "vdm", "diffusion_elbo").items()}
    assert sorted(limits) == STEPS and len(set(limits.values())) == 1
    # The per-step KL profile has T + 1 layers at T (z_1 ~ q(z_1 | x), then one per step).
    kl_layers = {t: sum(1 for r in evaluated if r["estimator"] == "kl_terms" and r["metric"].startswith("kl/")
                        and r["model_config"]["log_weights_steps"] == t) for t in STEPS}
    assert kl_layers == {t: t + 1 for t in STEPS}


def test_trajectory_elbo_rows_are_the_discrete_losses_of_the_trained_network(steps_run):
    """Row ELBO at T (whole T-step trajectories) = L_T of the same network (per-step closed-form KLs)."""
    run_dir, cache = steps_run
    dataset = load_dataset("mixture-2d")
    trained = train_model("vdm", VDM_CONFIG, dataset, TrainConfig(**TRAIN, seed=0), device="cpu", cache_dir=cache,
                          progress=False)
    assert trained.from_cache
    x = dataset.test[:N_EXAMPLES]
    elbo_rows = _rows(run_dir, "vdm", "elbo")
    for t in STEPS:
        model = create_model("vdm", data_dim=2, likelihood="gaussian", hidden=VDM_CONFIG["hidden"], steps=t)
        model.load_state_dict(trained.model.state_dict())
        with torch.no_grad():
            loss = estimators.diffusion_elbo(model, x, samples=64, generator=torch.Generator().manual_seed(3)).value
        row = elbo_rows[t]
        tolerance = Z * math.hypot(row["stderr"], float(loss.std() / math.sqrt(loss.numel())))
        assert abs(row["value"] - float(loss.mean())) <= tolerance, (t, row["value"], float(loss.mean()))


def test_doubling_T_never_hurts_the_trained_continuous_time_network(steps_run):
    """L_2T >= L_T within 4 paired standard errors, and L_T approaches the network's L_inf from below."""
    run_dir, cache = steps_run
    dataset = load_dataset("mixture-2d")
    state = train_model("vdm", VDM_CONFIG, dataset, TrainConfig(**TRAIN, seed=0), device="cpu", cache_dir=cache,
                        progress=False).model.state_dict()
    x = dataset.test[:N_EXAMPLES]

    def elbo(**time) -> torch.Tensor:
        model = create_model("vdm", data_dim=2, likelihood="gaussian", hidden=VDM_CONFIG["hidden"], **time)
        model.load_state_dict(state)
        with torch.no_grad():
            return estimators.diffusion_elbo(model, x, samples=16, generator=torch.Generator().manual_seed(5)).value

    previous = None
    for steps in [1, 2, 4, 8, 16, 32, 64, 128, 256]:
        bound = elbo(steps=steps)
        if previous is not None:
            gain = bound - previous
            assert float(gain.mean()) >= -Z * float(gain.std() / math.sqrt(gain.numel())), steps
        previous = bound
    limit = elbo(time="continuous")
    shortfall = limit - previous  # L_inf - L_256 >= 0 and small: the T -> infinity end of the same sweep
    assert float(shortfall.mean()) >= -Z * float(shortfall.std() / math.sqrt(shortfall.numel()))
    assert float(shortfall.mean()) < 0.1 * abs(float(limit.mean())) + 0.5
    # The runner's continuous-time row is this same L_inf (other draws): agreement within 4 standard errors.
    row = next(iter(_rows(run_dir, "vdm", "diffusion_elbo").values()))
    assert abs(row["value"] - float(limit.mean())) <= Z * math.hypot(row["stderr"], float(limit.std() / math.sqrt(
        limit.numel())))


def test_oracle_rows_rise_with_T_towards_the_exact_log_p(steps_run):
    run_dir, _ = steps_run
    elbo = _rows(run_dir, "vdm-oracle", "elbo")
    logp = _rows(run_dir, "vdm-oracle", "log_marginal")
    assert {r["method"] for r in logp.values()} == {"exact"} and len({r["value"] for r in logp.values()}) == 1
    exact = logp[1]["value"]
    for low, high in itertools.pairwise(STEPS):
        assert elbo[high]["value"] >= elbo[low]["value"] - Z * math.hypot(elbo[low]["stderr"], elbo[high]["stderr"])
    assert all(r["value"] <= exact + Z * r["stderr"] for r in elbo.values())
    limit = next(iter(_rows(run_dir, "vdm-oracle", "diffusion_elbo").values()))
    assert elbo[STEPS[-1]]["value"] < limit["value"] <= exact + Z * limit["stderr"]


def test_the_shipped_steps_suite_trains_each_network_once():
    plan = prepare(load_suite("steps"))
    fits = {(f.dataset, f.model.label): f for f in plan.fits}
    vdm = fits[("digits", "vdm")]
    steps = [e.overrides["log_weights_steps"] for e in vdm.evaluations]
    assert steps == [2 ** i for i in range(9)] and vdm.model_config["time"] == "continuous"
    # One training cell per fit; every other cell belongs to one of the fit's evaluations.
    assert sum(c.spec is None for c in vdm.cells) == 1
    assert {c.evaluation.label for c in vdm.cells if c.spec is not None} == {e.label for e in vdm.evaluations}
    # log p(x) by IWAE-5000 over T-step trajectories is out of budget for the trained VDM; exact for the oracle.
    assert "log_marginal" not in {c.estimator for c in vdm.cells}
    assert "log_marginal" in {c.estimator for c in fits[("mixture-2d", "vdm-oracle")].cells}
    assert sorted(f.model.config["n_layers"] for f in plan.fits
                  if f.model.name == "hvae" and f.dataset == "digits") == [1, 2, 4, 8]
