"""Matrix expansion: ``prepare`` turns a validated ``Suite`` into a ``Plan`` of fits and cells.

It loads every dataset, checks every model's config overrides and that the model can
model each of its datasets, builds every training config, and expands the matrix into
cells. It raises ``SuiteError`` on any problem, before a run directory exists.

A fit is one trained model (dataset x model entry x seed); its cells are the training
cell and one cell per (evaluation, estimator, K). A model entry with ``eval_configs`` is
still trained once: each evaluation is the trained state under evaluation-only
overrides, with its own label, model_config and config_hash (a continuous-time VDM
evaluated at several T).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from bench import data as bench_data
from bench.train.config import TrainConfig
from reports.schema import STRUCTURE_FIELDS
from vaes import create_model, list_models
from vaes.base import config_hash as hash_config

from . import resources
from .configs import check_overrides, train_config
from .keys import KeyChecker, SuiteError
from .objectives import check_model_objective, check_objective_table
from .suite import EstimatorSpec, ModelSpec, Suite

TRAIN_ESTIMATOR = "train"  # the estimator column of a fit's training rows


@dataclass(frozen=True)
class Evaluation:
    """The model a fit's estimator cells evaluate: the trained one, or it under evaluation-only overrides."""

    label: str  # the rows' label
    overrides: dict  # the rows' model_config: the entry's config with the evaluation's overrides
    model_config: dict  # overrides plus data_dim and likelihood from the dataset
    config_hash: str  # of the evaluated model's config
    structure: dict | None  # the evaluated model's declared structure (rows carry it)
    changed: bool  # False: evaluated as trained (no rebuild)


@dataclass(frozen=True)
class Cell:
    cell_id: str
    estimator: str  # an ESTIMATORS key, or TRAIN_ESTIMATOR
    k: int | None  # draws per example: one K of the estimator's validated grid; None without K
    spec: EstimatorSpec | None  # None for the training cell
    evaluation: Evaluation | None = None  # None for the training cell

    def describe(self, fit: Fit) -> str:
        k = "" if self.k is None else f" k={self.k}"
        label = fit.model.label if self.evaluation is None else self.evaluation.label
        return f"{fit.dataset} / {label} / seed {fit.seed} / {self.estimator}{k}"


@dataclass(frozen=True)
class Fit:
    """One trained model: a dataset x model entry x seed, and the cells evaluated on it."""

    dataset: str
    split: str  # the split evaluated (training always uses "train")
    model: ModelSpec
    seed: int
    model_config: dict  # the overrides plus data_dim and likelihood from the dataset: what is trained
    config_hash: str  # of the trained model's config
    structure: dict | None  # the trained model's declared structure
    train_config: TrainConfig
    cells: tuple[Cell, ...] = field(default=())  # the training cell first
    evaluations: tuple[Evaluation, ...] = field(default=())  # one per eval config (one, as trained, by default)


@dataclass(frozen=True)
class Plan:
    suite: Suite
    datasets: dict  # name -> bench.data.Dataset
    fits: tuple[Fit, ...]

    @property
    def n_cells(self) -> int:
        return sum(len(fit.cells) for fit in self.fits)


def structure_record(model) -> dict | None:
    """The model's declared structure as a row carries it; None for a model that does not declare one."""
    try:
        declared = model.structure()
    except NotImplementedError:
        return None
    return {name: getattr(declared, name) for name in STRUCTURE_FIELDS}


def prepare(suite: Suite, *, data_dir: Path | None = None) -> Plan:
    check = KeyChecker(Path(suite.source).name)
    known_datasets = {name: name for name in bench_data.list_datasets()}
    for i, name in enumerate(suite.datasets):
        check.choice(name, f"datasets[{i}]", "dataset", known_datasets)
    known_models = {name: name for name in list_models()}
    for i, spec in enumerate(suite.models):
        check.choice(spec.name, f"models[{i}].name", "model", known_models)
    datasets = {name: _load_dataset(name, suite, data_dir) for name in suite.datasets}
    split = suite.eval["split"]
    for name, dataset in datasets.items():
        try:
            dataset.split(split)
        except (KeyError, ValueError) as exc:
            raise check.fail("eval.split", f"cannot be used with dataset {name!r}: {exc}") from None

    try:
        limit = resources.memory_limit_bytes()
    except resources.ResourceError as exc:
        raise SuiteError(str(exc)) from None
    fits = []
    for i, spec in enumerate(suite.models):
        check_objective_table(spec.config, f"models[{i}].config.objective", check)
        check_overrides(spec.name, spec.config, f"models[{i}].config", datasets[spec.datasets[0]], check)
        for dataset_name in spec.datasets:
            dataset = datasets[dataset_name]
            full_config = {**spec.config, "data_dim": dataset.data_dim, "likelihood": dataset.likelihood}
            _check_model_size(spec, i, dataset_name, full_config, limit, check)
            try:
                model = create_model(spec.name, **full_config)
            except (TypeError, ValueError) as exc:
                raise check.fail(f"models[{i}]", f"({spec.label}) cannot run on dataset {dataset_name!r} "
                                                 f"({dataset.kind} data): {exc}; restrict it with "
                                                 f"models[{i}].datasets") from None
            check_model_objective(model, f"models[{i}].config.objective", check)
            evaluations = _evaluations(spec, i, model, dataset, check)
            for seed in suite.seeds:
                fit = Fit(dataset_name, split, spec, seed, full_config, model.config_hash(), structure_record(model),
                          train_config(suite, spec, i, seed, check), evaluations=evaluations)
                fit = dataclasses.replace(fit, cells=_cells(fit, suite))
                _check_cell_sizes(fit, i, model, dataset, suite, limit, check)
                fits.append(fit)
    return Plan(suite, datasets, tuple(fits))


def _check_model_size(spec: ModelSpec, index: int, dataset_name: str, config: dict, limit: int,
                      check: KeyChecker) -> None:
    """Refuse a model whose training state alone is beyond the memory limit, before building it."""
    try:
        shapes = resources.meta_model(spec.name, config)
    except Exception:  # noqa: BLE001  a config the real construction refuses: it says why, just after
        return
    problem = resources.too_large(resources.training_bytes(shapes), limit)
    if problem is not None:
        raise check.fail(f"models[{index}]", f"({spec.label}) on {dataset_name!r} {problem}")


def _check_cell_sizes(fit: Fit, index: int, model, dataset, suite: Suite, limit: int, check: KeyChecker) -> None:
    """Refuse a cell whose estimated peak (training state, a chunk of draws, the k-hat tail) is beyond the limit."""
    base = resources.training_bytes(model)
    for cell in fit.cells:
        if cell.k is None or cell.spec is None:
            continue
        n = cell.spec.n_examples or suite.eval["n_examples"] or dataset.split(fit.split).shape[0]
        batch = min(suite.eval["batch_size"], n)
        draws = cell.k * cell.spec.params.get("replicates", 1)
        try:
            needed, _ = resources.draw_bytes(model, batch, dataset.data_dim, draws)
        except Exception:  # noqa: BLE001  a model whose draw_nbytes needs real data: no estimate
            continue
        problem = resources.too_large(base + needed, limit)
        if problem is not None:
            raise check.fail(f"models[{index}]", f"({cell.describe(fit)}: {draws:,} draws per example in batches "
                                                 f"of {batch}) {problem}")


def _evaluations(spec: ModelSpec, index: int, trained, dataset, check: KeyChecker) -> tuple[Evaluation, ...]:
    """The entry's evaluations on one dataset; every override must be evaluation-only for the trained model.

    Evaluation-only means training never reads the field, so the trained state is valid under any value of it;
    the rebuilt model must then also hold the same state keys and shapes, which is checked here too.
    """
    allowed = trained.evaluation_only_fields()
    state = {name: tuple(t.shape) for name, t in trained.state_dict().items()}
    evaluations = []
    for j, eval_config in enumerate(spec.evaluations()):
        where = f"models[{index}].eval_configs[{j}]"
        for key in eval_config.overrides:
            if key not in allowed:
                settings = ", ".join(allowed) if allowed else "none with this config"
                raise check.fail(f"{where}.{key}", f"is not an evaluation-only setting of model {spec.name!r} "
                                                   f"(training reads it: give it its own model entry); "
                                                   f"evaluation-only settings: {settings}")
        check_overrides(spec.name, eval_config.overrides, where, dataset, check)
        overrides = spec.eval_config(eval_config.overrides)
        full_config = {**overrides, "data_dim": dataset.data_dim, "likelihood": dataset.likelihood}
        try:
            model = create_model(spec.name, **full_config)
        except (TypeError, ValueError) as exc:
            raise check.fail(where, f"({eval_config.label}) is not a valid configuration: {exc}") from None
        if {name: tuple(t.shape) for name, t in model.state_dict().items()} != state:
            raise check.fail(where, f"changes the trained state's keys or shapes of model {spec.name!r}, so the "
                                    f"trained state cannot be evaluated under it")
        evaluations.append(Evaluation(eval_config.label, overrides, full_config, model.config_hash(),
                                      structure_record(model), changed=bool(eval_config.overrides)))
    return tuple(evaluations)


def _load_dataset(name: str, suite: Suite, data_dir: Path | None):
    try:
        return bench_data.load_dataset(name, seed=suite.eval["data_seed"], data_dir=data_dir)
    except (bench_data.DataNotFoundError, bench_data.DataIntegrityError) as exc:
        raise SuiteError(str(exc)) from None


def _cell_id(fit: Fit, split: str, estimator: str, k: int | None, params: dict, n_examples: int | None,
             evaluation: Evaluation | None = None) -> str:
    """Stable across runs and machines: a hash of what the cell computes, never of when or where."""
    identity = {
        "dataset": fit.dataset, "split": split, "model": fit.model.name, "config_hash": fit.config_hash,
        "train": hash_config(fit.train_config), "seed": fit.seed, "estimator": estimator, "k": k,
        "params": params, "n_examples": n_examples,
    }
    if evaluation is not None and evaluation.changed:  # absent otherwise, so plain entries keep their ids
        identity["evaluated_config_hash"] = evaluation.config_hash
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _cells(fit: Fit, suite: Suite) -> tuple[Cell, ...]:
    train_cell = Cell(_cell_id(fit, "train", TRAIN_ESTIMATOR, None, {}, None), TRAIN_ESTIMATOR, None, None)
    cells = [train_cell]
    chosen = fit.model.estimators
    for evaluation in fit.evaluations:
        for spec in suite.estimators:
            if chosen is not None and spec.name not in chosen:
                continue
            n = spec.n_examples or suite.eval["n_examples"]
            for k in spec.ks:
                cell_id = _cell_id(fit, fit.split, spec.name, k, spec.params, n, evaluation)
                cells.append(Cell(cell_id, spec.name, k, spec, evaluation))
    return tuple(cells)
