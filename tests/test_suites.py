"""Suite TOML parsing: the schema, the defaults, and errors that name the key."""
from __future__ import annotations

import pytest

from bench.runner import prepare
from bench.suites import SuiteError, available_suites, load_suite, parse_suite, select


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
    assert {"smoke", "default"} <= set(available_suites())
    for name in ("smoke", "default"):
        plan = prepare(load_suite(name))
        assert plan.n_cells == sum(len(f.cells) for f in plan.fits) and plan.fits


def test_matrix_expansion_counts_and_defaults():
    suite = _parse(_suite())
    assert suite.eval == {"split": "test", "n_examples": None, "batch_size": 100, "data_seed": 0}
    assert [e.ks for e in suite.estimators] == [(1,), (1, 5), (7,)]
    assert suite.estimators[2].params == {"method": "auto"} and suite.estimators[2].n_examples == 3
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
    ({"models": [{"name": "nope"}]}, "models[0].name names an unknown model 'nope'; known models: "),
    ({"datasets": ["digits", "linear-gaussian", "nope"]}, "datasets[2] names an unknown dataset 'nope'; known datasets: "),
    ({"estimators": [{"name": "nope"}]}, "estimators[0].name is an unknown estimator 'nope'; known estimators: elbo"),
    ({"estimators": [{"name": "iwae", "k": [1, 0]}]}, "estimators[0].k[1] must be an integer >= 1, got 0"),
    ({"estimators": [{"name": "iwae", "k": 2.5}]}, "estimators[0].k must be an integer, got 2.5"),
    ({"estimators": [{"name": "elbo", "samples": True}]}, "estimators[0].samples must be an integer, got True"),
    ({"estimators": [{"name": "elbo", "k": 3}]}, "estimators[0].k is not a known key; choices: name, n_examples, samples"),
    ({"estimators": [{"name": "log_marginal", "method": "ais"}]}, "estimators[0].method must be one of auto, exact, iwae"),
    ({"train": {"steps": "many"}}, "train.steps must be an integer, got 'many'"),
    ({"train": {"stepz": 3}}, "train.stepz is not a training setting; choices: steps"),
    ({"eval": {"n_examples": 0}}, "eval.n_examples must be an integer >= 1, got 0"),
    ({"seeds": [0, -1]}, "seeds[1] must be an integer >= 0, got -1"),
    ({"colour": "red"}, "colour is not a known key"),
    ({"threads": 0}, "threads must be an integer >= 1, got 0"),
    ({"models": [{"name": "linear-gaussian"}]}, "models[0] (linear-gaussian) cannot run on dataset 'digits' (binary data)"),
    ({"models": [{"name": "vae", "datasets": ["mixture-2d"]}]}, "models[0].datasets[0] names 'mixture-2d', which is not in"),
    ({"models": [{"name": "vae"}, {"name": "vae"}]}, "models[0].label 'vae' is used by more than one model"),
])
def test_errors_name_the_key(change, message):
    with pytest.raises(SuiteError) as info:
        prepare(_parse(_suite(**change)))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_malformed_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('datasets = ["digits"\n')
    with pytest.raises(SuiteError, match="suite broken.toml: malformed TOML"):
        load_suite(str(path))
    with pytest.raises(SuiteError, match="unknown suite 'nope'; known suites: .*smoke"):
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
