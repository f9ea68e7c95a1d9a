"""Suite TOML parsing: the schema, the defaults, and errors that name the key."""
from __future__ import annotations

import hashlib
import json

import pytest

from bench.plan.fits import prepare
from bench.plan.keys import SuiteError
from bench.plan.suite import available_suites, load_suite, parse_suite, select
from bench.run.evaluators import DEFAULT_REPLICATES
from vaes.base import config_hash


def _suite(**overrides) -> dict:
    contents = {
        "datasets": ["digits", "linear-gaussian"],
        "train": {"steps": 5},
        "models": [
            {"name": "vae", "config": {"latent_dim": 2, "hidden": [8]}},
            {"name": "vae", "label": "vae-wide", "config": {"latent_dim": 2, "hidden": [16]}, "datasets": ["digits"],
             "train": {"lr": 0.01}},
            {"name": "linear-gaussian", "datasets": ["linear-gaussian"]},
        ],
        "estimators": [{"name": "elbo"}, {"name": "iwae", "k": [1, 5]}, {"name": "log_marginal", "k": 7,
                                                                        "n_examples": 3}],
    }
    contents.update(overrides)
    return contents


def _parse(contents: dict):
    return parse_suite(contents, source="t.toml", default_name="t", label="t.toml")


def test_shipped_suites_load_and_prepare():
    assert {"smoke", "default", "steps"} <= set(available_suites())
    for name in ("smoke", "default", "steps"):
        plan = prepare(load_suite(name))
        assert plan.n_cells == sum(len(f.cells) for f in plan.fits) and plan.fits


def test_matrix_expansion_counts_and_defaults():
    suite = _parse(_suite())
    assert suite.eval == {"split": "test", "n_examples": None, "batch_size": 100, "data_seed": 0}
    assert [e.ks for e in suite.estimators] == [(1,), (1, 5), (7,)]
    assert suite.estimators[2].params == {"method": "auto", "replicates": DEFAULT_REPLICATES}
    assert suite.estimators[2].n_examples == 3
    plan = prepare(suite)
    # vae on 2 datasets, vae-wide on digits, linear-gaussian on its data: 4 fits x (train + 1 + 2 + 1) cells.
    assert len(plan.fits) == 4 and plan.n_cells == 4 * 5
    ids = [c.cell_id for f in plan.fits for c in f.cells]
    assert len(set(ids)) == len(ids)
    wide = next(f for f in plan.fits if f.model.label == "vae-wide")
    assert wide.train_config.lr == 0.01 and wide.train_config.steps == 5
    # Cell ids are stable: the same suite expands to the same ids.
    assert ids == [c.cell_id for f in prepare(_parse(_suite())).fits for c in f.cells]


@pytest.mark.parametrize("change, message", [
    ({"models": [{"name": "vae", "config": {"latent_dim": "a"}}]},
     "suite t.toml: models[0].config.latent_dim must be an integer, got 'a'"),
    ({"models": [{"name": "vae", "config": {"hidden": 8}}]}, "models[0].config.hidden must be a list, got 8"),
    ({"models": [{"name": "vae", "config": {"width": 8}}]}, "models[0].config.width is not a setting of model 'vae'"),
    ({"models": [{"name": "vae", "config": {"data_dim": 8}}]}, "models[0].config.data_dim is set from each dataset"),
    ({"models": [{"name": "nope"}]}, "models[0].name names an unknown model 'nope'; choices: "),
    ({"datasets": ["digits", "linear-gaussian", "nope"]}, "datasets[2] names an unknown dataset 'nope'; choices: "),
    ({"estimators": [{"name": "nope"}]}, "estimators[0].name is an unknown estimator 'nope'; choices: elbo"),
    ({"estimators": [{"name": "iwae", "k": [1, 0]}]}, "estimators[0].k[1] must be an integer >= 1, got 0"),
    ({"estimators": [{"name": "iwae", "k": 2.5}]}, "estimators[0].k must be an integer, got 2.5"),
    ({"estimators": [{"name": "elbo", "samples": True}]}, "estimators[0].samples must be an integer, got True"),
    ({"estimators": [{"name": "elbo", "k": 3}]},
     "estimators[0].k is not a known key; choices: name, n_examples, samples"),
    ({"estimators": [{"name": "log_marginal", "method": "renyi"}]},
     "estimators[0].method must be one of auto, exact, iwae, ais"),
    ({"train": {"steps": "many"}}, "train.steps must be an integer, got 'many'"),
    ({"train": {"stepz": 3}}, "train.stepz is not a training setting; choices: steps"),
    ({"eval": {"n_examples": 0}}, "eval.n_examples must be an integer >= 1, got 0"),
    ({"seeds": [0, -1]}, "seeds[1] must be an integer >= 0, got -1"),
    ({"colour": "red"}, "colour is not a known key"),
    ({"threads": 0}, "threads must be an integer >= 1, got 0"),
    ({"models": [{"name": "linear-gaussian"}]},
     "models[0] (linear-gaussian) cannot run on dataset 'digits' (binary data)"),
    ({"models": [{"name": "vae", "datasets": ["mixture-2d"]}]},
     "models[0].datasets[0] names 'mixture-2d', which is not in"),
    ({"models": [{"name": "vae"}, {"name": "vae"}]}, "models[0].label 'vae' is used by more than one model"),
])
def test_errors_name_the_key(change, message):
    with pytest.raises(SuiteError) as info:
        prepare(_parse(_suite(**change)))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


VDM_ON_DIGITS = {"name": "vdm", "config": {"time": "continuous", "hidden": [8]}, "datasets": ["digits"]}


@pytest.mark.parametrize("entry, message", [
    ({"eval_configs": {"log_weights_steps": 2}}, "models[0].eval_configs must be a non-empty array of tables"),
    ({"eval_configs": []}, "models[0].eval_configs must be a non-empty array of tables"),
    ({"eval_configs": [3]}, "models[0].eval_configs[0] must be a table, got 3"),
    ({"eval_configs": [{"data_dim": 3}]}, "models[0].eval_configs[0].data_dim is set from each dataset"),
    ({"eval_configs": [{"log_weights_steps": 2}, {"log_weights_steps": 2}]},
     "models[0].eval_configs[1] repeats an earlier evaluation {'log_weights_steps': 2}"),
    ({"eval_configs": [{"hidden": [16]}]},
     ("models[0].eval_configs[0].hidden is not an evaluation-only setting of model 'vdm' (training reads it: give it "
      "its own model entry); evaluation-only settings: log_weights_steps")),
    ({"config": {"time": "discrete", "steps": 4}, "eval_configs": [{"steps": 8}]},
     ("models[0].eval_configs[0].steps is not an evaluation-only setting of model 'vdm' (training reads it: give it "
      "its own model entry); evaluation-only settings: none with this config")),
    ({"config": {"time": "continuous", "objective": {"name": "iwae", "k": 2}},
      "eval_configs": [{"log_weights_steps": 8}]},  # trained through log_weights: T is part of training
     "models[0].eval_configs[0].log_weights_steps is not an evaluation-only setting of model 'vdm'"),
    ({"eval_configs": [{"log_weights_steps": "a"}]},
     "models[0].eval_configs[0].log_weights_steps must be an integer, got 'a'"),
    ({"eval_configs": [{"log_weights_steps": 0}]},
     "models[0].eval_configs[0] (vdm (log_weights_steps=0)) is not a valid configuration: log_weights_steps must be"),
    ({"estimators": ["elbo", "nope"]},
     "models[0].estimators[1] names 'nope', which is not among the suite's estimators (elbo, iwae, log_marginal)"),
    ({"estimators": []}, "models[0].estimators must be a non-empty list of names"),
])
def test_eval_config_and_estimator_errors_name_the_key(entry, message):
    with pytest.raises(SuiteError) as info:
        prepare(_parse(_suite(models=[{**VDM_ON_DIGITS, **entry}])))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_eval_configs_of_a_plain_model_are_refused():
    entry = {"name": "vae", "config": {"latent_dim": 2}, "eval_configs": [{"latent_dim": 3}]}
    with pytest.raises(SuiteError, match=r"models\[0\]\.eval_configs\[0\]\.latent_dim is not an evaluation-only "
                                         r"setting of model 'vae' .*evaluation-only settings: none with this config"):
        prepare(_parse(_suite(models=[entry])))


def test_rows_of_two_entries_may_not_share_a_label():
    models = [{**VDM_ON_DIGITS, "eval_configs": [{"log_weights_steps": 2}]},
              {**VDM_ON_DIGITS, "label": "vdm (log_weights_steps=2)"}]
    with pytest.raises(SuiteError, match=r"models\[0\] labels rows 'vdm \(log_weights_steps=2\)', as another entry"):
        _parse(_suite(models=models))


def test_eval_configs_expand_into_evaluations_of_one_fit():
    models = [{**VDM_ON_DIGITS, "eval_configs": [{"log_weights_steps": 1}, {"log_weights_steps": 2}, {}]},
              {"name": "vae", "config": {"latent_dim": 2, "hidden": [8]}, "estimators": ["iwae"]}]
    plan = prepare(_parse(_suite(models=models)))
    vdm = next(f for f in plan.fits if f.model.name == "vdm")
    assert [e.label for e in vdm.evaluations] == ["vdm (log_weights_steps=1)", "vdm (log_weights_steps=2)", "vdm"]
    assert [e.overrides for e in vdm.evaluations] == [{**VDM_ON_DIGITS["config"], "log_weights_steps": 1},
                                                      {**VDM_ON_DIGITS["config"], "log_weights_steps": 2},
                                                      VDM_ON_DIGITS["config"]]
    hashes = [e.config_hash for e in vdm.evaluations]
    assert len(set(hashes)) == 3 and hashes[2] == vdm.config_hash  # {}: the trained config itself
    # One training cell, then every estimator cell of the suite (elbo, iwae x 2, log_marginal) per evaluation.
    assert [c.estimator for c in vdm.cells].count("train") == 1 and len(vdm.cells) == 1 + 3 * 4
    ids = [c.cell_id for f in plan.fits for c in f.cells]
    assert len(set(ids)) == len(ids)
    # The entry's `estimators` keeps only those: the vae gets its iwae K grid and nothing else.
    vae = [f for f in plan.fits if f.model.name == "vae"]
    assert len(vae) == 2 and all([c.estimator for c in f.cells] == ["train", "iwae", "iwae"] for f in vae)
    # An entry without eval_configs keeps the cell ids it had before they existed (a resume still matches).
    fit, cell = vae[0], vae[0].cells[1]
    identity = {"dataset": fit.dataset, "split": "test", "model": "vae", "config_hash": fit.config_hash,
                "train": config_hash(fit.train_config), "seed": 0, "estimator": "iwae", "k": 1,
                "params": {"replicates": DEFAULT_REPLICATES},
                "n_examples": None}
    assert cell.cell_id == hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def test_malformed_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('datasets = ["digits"\n')
    with pytest.raises(SuiteError, match=r"suite broken\.toml: malformed TOML"):
        load_suite(str(path))
    with pytest.raises(SuiteError, match=r"unknown suite 'nope'; choices: .*smoke"):
        load_suite("nope")


def test_filters_narrow_the_suite_and_reject_names_outside_it():
    suite = _parse(_suite())
    narrowed = select(suite, models=["vae-wide", "linear-gaussian"], datasets=["digits"], estimators=["iwae"], seed=3)
    assert [m.label for m in narrowed.models] == ["vae-wide"]  # linear-gaussian has no digits
    assert [e.name for e in narrowed.estimators] == ["iwae"] and narrowed.seeds == (3,)
    with pytest.raises(SuiteError, match="model 'hvae' is not in suite t; its models: linear-gaussian, vae, vae-wide"):
        select(suite, models=["hvae"])
    with pytest.raises(SuiteError, match="leave no model"):
        select(suite, models=["linear-gaussian"], datasets=["digits"])


def test_replicates_are_validated_when_the_suite_is_loaded():
    base = {"datasets": ["digits"], "models": [{"name": "vae"}]}
    suite = parse_suite({**base, "estimators": [{"name": "iwae", "k": 5, "replicates": 4}]}, source="x",
                        default_name="x")
    assert suite.estimators[0].params["replicates"] == 4
    for bad in (1, 0, "2", 2.0, True):
        with pytest.raises(SuiteError, match=r"estimators\[0\]\.replicates must be an integer"):
            parse_suite({**base, "estimators": [{"name": "iwae", "k": 5, "replicates": bad}]}, source="x",
                        default_name="x")
