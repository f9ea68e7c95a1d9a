"""The IWAE paper reproduced: the `paper` suite's settings are the paper's, the `mnist` suite differs only
in its schedule, and the published numbers are the paper's and meet the measured ones in the report."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from torch import nn

from bench.plan.suite import load_suite
from bench.train import SCHEDULES, TrainConfig, iwae_stage
from reports.published import DIFFERENCE, MEASURED, PUBLISHED, load_published, published_tables
from reports.units import NLL_NATS
from vaes import create_model

MNIST_TRAIN_IMAGES = 50_000  # the fixed binarization's training split
MNIST = {"data_dim": 784, "likelihood": "bernoulli"}

# label -> (stochastic layers, objective trained on, its k): VAE and IWAE with k in {1, 5, 50}; at k = 1 the
# two objectives coincide, so one model stands for both.
PAPER_MODELS = {
    f"{objective}-{layers}l-k{k}": (layers, "elbo" if objective == "vae" else "iwae", k)
    for layers in (1, 2) for objective in ("vae", "iwae") for k in (1, 5, 50)
    if not (objective == "iwae" and k == 1)
}


@pytest.fixture(scope="module")
def paper():
    return load_suite("paper")


def _linears(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def _activations(module: nn.Module) -> set[type]:
    return {type(m) for m in module.modules() if not isinstance(m, (nn.Linear, nn.Sequential, nn.ModuleList))
            and not list(m.children())}


def _model(spec):
    return create_model(spec.name, **spec.config, **MNIST)


# --- the paper suite as loaded ------------------------------------------------------------------------

def test_paper_suite_has_the_papers_models_and_objectives(paper):
    assert paper.datasets == ("binarized-mnist",)
    assert {spec.label for spec in paper.models} == set(PAPER_MODELS)
    for spec in paper.models:
        layers, objective, k = PAPER_MODELS[spec.label]
        model = _model(spec)
        assert (model.objective.name, model.objective.k) == (objective, k), spec.label
        assert len(model.layers) == layers, spec.label
        assert spec.train == {} and spec.datasets == ("binarized-mnist",)  # every model on the same protocol


def test_paper_suite_architectures_are_the_papers(paper):
    for spec in paper.models:
        model = _model(spec)
        assert _activations(model) - {type(model.likelihood)} == {nn.Tanh}, spec.label
        if PAPER_MODELS[spec.label][0] == 1:  # 784-200-200-50, mirrored decoder
            assert _linears(model.encoder) == [(784, 200), (200, 200)]
            assert _linears(model.posterior_head) == [(200, 50), (200, 50)]  # mean and log sigma
            assert _linears(model.decoder) == [(50, 200), (200, 200), (200, 784)]
        else:  # 784-200-200-100 (z1) -100-100-50 (z2), mirrored decoder
            assert _linears(model.up[0]) == [(784, 200), (200, 200), (200, 100), (200, 100)]
            assert _linears(model.up[1]) == [(100, 100), (100, 100), (100, 50), (100, 50)]
            assert _linears(model.down[0]) == [(50, 100), (100, 100), (100, 100), (100, 100)]
            assert _linears(model.decoder) == [(100, 200), (200, 200), (200, 784)]


def test_paper_suite_schedule_and_optimizer_are_the_papers(paper):
    config = TrainConfig(**paper.train)
    assert (config.batch_size, config.lr, config.betas, config.eps) == (20, 1e-3, (0.9, 0.999), 1e-4)
    assert config.output_bias_init is True and config.schedule == "iwae-stages"
    steps_per_epoch = MNIST_TRAIN_IMAGES // config.batch_size
    total = config.total_steps(MNIST_TRAIN_IMAGES)
    assert total == 3280 * steps_per_epoch
    # Stage i: 3^i epochs at lr 1e-3 * 10^(-i/7). Its first step is where iwae_stage turns to i.
    first_steps = [steps_per_epoch * (3**i - 1) // 2 for i in range(8)] + [total]
    for i in range(8):
        start, end = first_steps[i], first_steps[i + 1]
        assert (end - start) / steps_per_epoch == 3**i
        assert iwae_stage(start, total, config.stages) == i and iwae_stage(end - 1, total, config.stages) == i
        lr = config.lr * SCHEDULES["iwae-stages"](start, total, config)
        assert lr == pytest.approx(1e-3 * 10 ** (-i / 7), rel=1e-12)


def test_paper_suite_evaluation_is_the_papers(paper):
    assert paper.eval["split"] == "test" and paper.eval["n_examples"] is None  # all 10,000 test images
    estimators = {e.name: e for e in paper.estimators}
    assert estimators["log_marginal"].ks == (5000,) and estimators["log_marginal"].params["method"] == "iwae"
    assert estimators["active_units"].params["threshold"] == 0.01
    assert all(e.n_examples is None for e in paper.estimators)


# What the mnist suite adds to the paper's evaluation: IWAE-5000 on the first 100 test images for every model,
# and AIS and BDMC there for the one-layer VAE and IWAE (k = 50).
AIS_ESTIMATORS = ("ais", "bdmc")
AIS_MODELS = ("vae-1l-k1", "iwae-1l-k50")


def test_mnist_suite_is_the_paper_suite_with_a_shorter_schedule(paper):
    mnist = load_suite("mnist")
    added = [e for e in mnist.estimators if e.n_examples == 100]
    assert [(e.name, e.ks) for e in added] == [("iwae", (5000,)), ("ais", (None,)), ("bdmc", (None,))]
    assert tuple(e for e in mnist.estimators if e not in added) == paper.estimators
    assert tuple(dataclasses.replace(spec, estimators=None) for spec in mnist.models) == paper.models
    paper_names = tuple(e.name for e in paper.estimators)
    for spec in mnist.models:
        assert spec.estimators == paper_names + (AIS_ESTIMATORS if spec.label in AIS_MODELS else ())
    assert (mnist.eval, mnist.datasets) == (paper.eval, paper.datasets)
    schedule_keys = {"epochs", "stages", "eval_every"}
    assert {k: v for k, v in mnist.train.items() if k not in schedule_keys} == \
        {k: v for k, v in paper.train.items() if k not in schedule_keys}
    assert mnist.threads == 2
    # Its schedule is the paper's first two stages exactly: 1 epoch at lr 1e-3, 3 at 1e-3 * 10^(-1/7).
    config = TrainConfig(**mnist.train)
    steps_per_epoch = MNIST_TRAIN_IMAGES // config.batch_size
    total = config.total_steps(MNIST_TRAIN_IMAGES)
    stages = np.array([iwae_stage(step, total, config.stages) for step in range(0, total, steps_per_epoch)])
    assert stages.tolist() == [0, 1, 1, 1]
    assert [SCHEDULES["iwae-stages"](step * steps_per_epoch, total, config) for step in (0, 1)] == \
        pytest.approx([1.0, 10 ** (-1 / 7)], rel=1e-12)


# --- the published numbers ----------------------------------------------------------------------------

REFERENCES = Path(__file__).resolve().parents[2] / "shared" / "REFERENCES.md"
REFERENCE_ROW = re.compile(r"^\| MNIST, (dynamic|fixed) binarization[^|]*\| (\d) \| (VAE|IWAE) *\|"
                           r" ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$")


def test_published_numbers_are_those_of_the_references():
    if not REFERENCES.is_file():
        pytest.skip(f"no {REFERENCES} beside the project to check against")
    expected = set()
    for line in REFERENCES.read_text(encoding="utf-8").splitlines():
        match = REFERENCE_ROW.match(line.strip())
        if match:
            protocol, layers, objective, *nlls = match.groups()
            expected |= {(f"{protocol} binarization", int(layers), objective, k, float(nll))
                         for k, nll in zip((1, 5, 50), nlls)}
    published = load_published()
    rows = {(r.protocol, r.layers, r.objective, r.k, r.nll) for r in published.itertuples()}
    assert len(expected) == 15 and rows == expected and len(published) == 15


def test_published_rows_name_the_suite_model_that_follows_their_protocol(paper):
    specs = {spec.label: spec for spec in paper.models}
    for row in load_published().itertuples():
        model = _model(specs[row.label])
        objective = "iwae" if row.objective == "IWAE" and row.k > 1 else "elbo"  # at k = 1 both are the ELBO
        assert (len(model.layers), model.objective.name, model.objective.k) == (row.layers, objective, row.k)
        assert row.same_protocol == (row.protocol == "fixed binarization")  # the data is the fixed binarization


def _summary(log_marginals: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """Summary cells as reports.cells.summarize gives them: test log p(x) per labelled model."""
    return pd.DataFrame([{"dataset": "binarized-mnist", "split": "test", "kind": "log_marginal", "label": label,
                          "value": value, "stderr": stderr, "k": 5000, "method": "iwae"}
                         for label, (value, stderr) in log_marginals.items()])


def test_report_puts_measured_beside_published_with_the_difference():
    summary = _summary({"iwae-1l-k5": (-90.0, 0.25), "vae-1l-k1": (-91.5, 0.5)})
    (table,) = published_tables(summary)
    assert table.unit == NLL_NATS and table.dataset == "binarized-mnist" and table.split == "test"
    # Same-protocol rows first: IWAE 1L k=1 (88.71) and k=5 (87.63); then the dynamic-binarization rows.
    assert table.rows[:2] == ["IWAE 1L k=1", "IWAE 1L k=5"]
    assert len(table.rows) == 2 + 3  # dynamic: IWAE and VAE at k=1 (one model), IWAE k=5
    assert table.cell("IWAE 1L k=5", PUBLISHED)["value"] == 87.63
    measured = table.cell("IWAE 1L k=5", MEASURED)
    assert (measured["value"], measured["stderr"]) == (90.0, 0.25) and measured["note"] == "iwae-1l-k5 (IWAE-5000)"
    difference = table.cell("IWAE 1L k=5", DIFFERENCE)
    assert difference["value"] == pytest.approx(90.0 - 87.63) and difference["stderr"] == 0.25
    assert table.cell("IWAE 1L k=1", DIFFERENCE)["value"] == pytest.approx(91.5 - 88.71)
    dynamic = table.cell("IWAE 1L k=5, dynamic binarization", DIFFERENCE)
    assert math.isnan(dynamic["value"]) and "another protocol" in dynamic["note"]
    assert table.cell("IWAE 1L k=5, dynamic binarization", MEASURED)["value"] == 90.0


def test_no_published_table_without_a_matching_measurement():
    assert published_tables(_summary({"vae": (-20.0, 0.1)})) == []
    other_split = _summary({"iwae-1l-k5": (-90.0, 0.25)}).assign(split="valid")
    assert published_tables(other_split) == []
