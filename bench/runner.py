"""Matrix expansion and cell execution.

``prepare`` turns a validated ``Suite`` into a ``Plan``: it loads every dataset,
checks every model's config overrides and that the model can model each of its
datasets, builds every training config, and expands the matrix into cells. It
raises ``SuiteError`` on any problem, before a run directory exists.

``execute`` runs a plan against a ``ResultsStore``. Cells are grouped by the
model fit they share (dataset x model entry x seed): the fit is trained (or
loaded from the checkpoint cache by bench.train) once, then each estimator cell
evaluates it. A model entry with ``eval_configs`` is still trained once: each
evaluation rebuilds the model under its evaluation-only overrides, loads the
trained state, and writes rows under its own label, model_config and
config_hash (a continuous-time VDM evaluated at several T). A cell that raises,
yields a non-finite value or runs out of memory is written as a failed row; the
run goes on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from vaes import create_model, list_models
from vaes.base import config_hash as hash_config
from vaes.registry import get_model_entry

from . import data as bench_data
from . import train as bench_train
from .evaluators import ESTIMATORS, EstimatorKind, Measurement, NotApplicable
from .store import ROW_COLUMNS, ResultsStore
from .suites import EstimatorSpec, KeyChecker, ModelSpec, Suite, SuiteError

log = logging.getLogger(__name__)

TRAIN_ESTIMATOR = "train"  # the estimator column of a fit's training rows


@dataclass(frozen=True)
class Evaluation:
    """The model a fit's estimator cells evaluate: the trained one, or it under evaluation-only overrides."""

    label: str  # the rows' label
    overrides: dict  # the rows' model_config: the entry's config with the evaluation's overrides
    model_config: dict  # overrides plus data_dim and likelihood from the dataset
    config_hash: str  # of the evaluated model's config
    changed: bool  # False: evaluated as trained (no rebuild)


@dataclass(frozen=True)
class Cell:
    cell_id: str
    estimator: str  # an ESTIMATORS key, or TRAIN_ESTIMATOR
    k: int | None
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
    train_config: object  # bench.train.TrainConfig
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


@dataclass
class Summary:
    ok: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (cell description, error)

    def count(self, status: str, description: str = "", error: str | None = None) -> None:
        if status == "failed":
            self.failed.append((description, error or ""))
        else:
            setattr(self, status, getattr(self, status) + 1)


# --- preparation: everything that can be wrong is found here ------------------------------------

def prepare(suite: Suite, *, data_dir: Path | None = None) -> Plan:
    label = Path(suite.source).name
    check = KeyChecker(label)
    known_datasets = bench_data.list_datasets()
    for i, name in enumerate(suite.datasets):
        if name not in known_datasets:
            raise check.fail(f"datasets[{i}]", f"names an unknown dataset {name!r}; known datasets: "
                                               f"{', '.join(known_datasets)}")
    known_models = list_models()
    for i, spec in enumerate(suite.models):
        if spec.name not in known_models:
            raise check.fail(f"models[{i}].name", f"names an unknown model {spec.name!r}; known models: "
                                                  f"{', '.join(known_models)}")
    datasets = {name: _load_dataset(name, suite, data_dir) for name in suite.datasets}
    split = suite.eval["split"]
    for name, dataset in datasets.items():
        try:
            dataset.split(split)
        except (KeyError, ValueError) as exc:
            raise check.fail("eval.split", f"cannot be used with dataset {name!r}: {exc}") from None

    fits = []
    for i, spec in enumerate(suite.models):
        _check_overrides(spec.name, spec.config, f"models[{i}].config", datasets[spec.datasets[0]], check)
        for dataset_name in spec.datasets:
            dataset = datasets[dataset_name]
            full_config = {**spec.config, "data_dim": dataset.data_dim, "likelihood": dataset.likelihood}
            try:
                model = create_model(spec.name, **full_config)
            except (TypeError, ValueError) as exc:
                raise check.fail(f"models[{i}]", f"({spec.label}) cannot run on dataset {dataset_name!r} "
                                                 f"({dataset.kind} data): {exc}; restrict it with "
                                                 f"models[{i}].datasets") from None
            evaluations = _evaluations(spec, i, model, dataset, check)
            for seed in suite.seeds:
                train_config = _train_config(suite, spec, i, seed, check)
                fit = Fit(dataset_name, split, spec, seed, full_config, model.config_hash(), train_config,
                          evaluations=evaluations)
                fits.append(dataclasses.replace(fit, cells=_cells(fit, suite)))
    return Plan(suite, datasets, tuple(fits))


def evaluation_only_fields(model) -> tuple[str, ...]:
    """The config fields a model declares evaluation-only (its config's ``evaluation_only_fields()``; none if absent)."""
    declared = getattr(model.config, "evaluation_only_fields", None)
    return tuple(declared()) if callable(declared) else ()


def _evaluations(spec: ModelSpec, index: int, trained, dataset, check: KeyChecker) -> tuple[Evaluation, ...]:
    """The entry's evaluations on one dataset; every override must be evaluation-only for the trained model.

    Evaluation-only means training never reads the field, so the trained state is valid under any value of it;
    the rebuilt model must then also hold the same state keys and shapes, which is checked here too.
    """
    allowed = evaluation_only_fields(trained)
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
        _check_overrides(spec.name, eval_config.overrides, where, dataset, check)
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
                                      changed=bool(eval_config.overrides)))
    return tuple(evaluations)


def _load_dataset(name: str, suite: Suite, data_dir: Path | None):
    try:
        return bench_data.load_dataset(name, seed=suite.eval["data_seed"], data_dir=data_dir)
    except (bench_data.DataNotFoundError, bench_data.DataIntegrityError) as exc:
        raise SuiteError(str(exc)) from None


def _expected_type(default: object):
    """The TOML type a config field accepts, judged from its default; None: not checked here."""
    checks = {bool: "boolean", int: "integer", float: "number", str: "string", tuple: "list", list: "list"}
    return checks.get(type(default))


def _check_overrides(name: str, overrides: dict, key: str, dataset, check: KeyChecker) -> None:
    """Every override (in the suite table ``key``) must name a config field (or a factory keyword) and have its type."""
    try:
        baseline = create_model(name, data_dim=dataset.data_dim, likelihood=dataset.likelihood)
    except (TypeError, ValueError):
        # Some defaults do not fit this dataset (an oracle's default mixture); the overrides must then
        # make the model buildable, which prepare() checks with the full config next.
        return
    defaults = {}
    if dataclasses.is_dataclass(baseline.config):
        defaults.update({f.name: getattr(baseline.config, f.name) for f in dataclasses.fields(baseline.config)})
    factory = get_model_entry(name).factory
    for param in inspect.signature(factory).parameters.values():
        if param.kind is param.KEYWORD_ONLY and param.default is not param.empty:
            defaults[param.name] = param.default
    validators = {
        "boolean": check.boolean,
        "integer": check.integer,
        "number": check.number,
        "string": check.string,
        "list": lambda v, key: _check_list(v, key, check),
    }
    for field_name, value in overrides.items():
        where = f"{key}.{field_name}"
        if field_name not in defaults:
            choices = ", ".join(k for k in defaults if k not in ("data_dim", "likelihood"))
            raise check.fail(where, f"is not a setting of model {name!r}; choices: {choices}")
        expected = _expected_type(defaults[field_name])
        if expected is not None:
            validators[expected](value, where)


def _check_list(value: object, key: str, check: KeyChecker) -> list:
    if not isinstance(value, list):
        raise check.fail(key, f"must be a list, got {value!r}")
    return value


def _train_config(suite: Suite, spec: ModelSpec, index: int, seed: int, check: KeyChecker):
    settings = {**suite.train, **spec.train}
    fields = {f.name: f for f in dataclasses.fields(bench_train.TrainConfig)}
    scalar = {"int": check.integer, "float": check.number, "float | None": check.number, "str": check.string,
              "bool": check.boolean}
    for key, value in settings.items():
        where = f"models[{index}].train.{key}" if key in spec.train else f"train.{key}"
        if key not in fields or key == "seed":
            choices = ", ".join(k for k in fields if k != "seed")
            raise check.fail(where, f"is not a training setting; choices: {choices}")
        annotation = fields[key].type if isinstance(fields[key].type, str) else getattr(fields[key].type, "__name__", "")
        if annotation in scalar:
            scalar[annotation](value, where)
    try:
        return bench_train.TrainConfig(**settings, seed=seed)
    except (TypeError, ValueError) as exc:
        where = f"models[{index}].train" if spec.train else "train"
        raise check.fail(where, f"is not a valid training configuration: {exc}") from None


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


# --- execution ------------------------------------------------------------------------------------

def execute(plan: Plan, store: ResultsStore, *, device: torch.device, cache_dir: Path | None,
            progress: bool = True) -> Summary:
    summary = Summary()
    fit_of = {cell.cell_id: fit for fit in plan.fits for cell in fit.cells}
    for cell_id, status in store.finished.items():
        if cell_id in fit_of:
            summary.count(status)
    bar = tqdm(total=plan.n_cells, initial=len(summary.failed) + summary.ok + summary.skipped, unit="cell",
               desc="cells", disable=not progress, dynamic_ncols=True)
    try:
        for fit in plan.fits:
            pending = [c for c in fit.cells if c.cell_id not in store.finished]
            if pending:
                _run_fit(plan, fit, pending, store, summary, bar, device=device, cache_dir=cache_dir, progress=progress)
    finally:
        bar.close()
    return summary


def _run_fit(plan: Plan, fit: Fit, pending: list[Cell], store: ResultsStore, summary: Summary, bar: tqdm, *,
             device: torch.device, cache_dir: Path | None, progress: bool) -> None:
    dataset = plan.datasets[fit.dataset]
    rows = _RowMaker(store.manifest["run_id"], fit, device)
    bar.set_postfix_str(f"{fit.dataset}/{fit.model.label}/seed {fit.seed}: training")
    try:
        model, train_seconds = _train_or_build(fit, dataset, device=device, cache_dir=cache_dir, progress=progress)
        _check_finite_parameters(model)
    except Exception as exc:  # noqa: BLE001  a failed fit fails its cells; the run goes on
        error = f"training failed: {_error_text(exc)}"
        log.error("%s / %s / seed %d: %s", fit.dataset, fit.model.label, fit.seed, error)
        for cell in pending:
            metric = "train_seconds" if cell.spec is None else ESTIMATORS[cell.estimator].primary_metric
            _write_cell(store, summary, bar, cell, fit, [rows.failed(cell, metric, error)], "failed", error)
        return
    n_train = int(dataset.split("train").shape[0])
    evaluated = {}  # evaluation label -> the trained model rebuilt under its overrides
    for cell in pending:
        bar.set_postfix_str(cell.describe(fit))
        if cell.spec is None:
            row = rows.row(cell, "train_seconds", train_seconds, None, None, "s", n_train, train_seconds,
                           split="train")
            _write_cell(store, summary, bar, cell, fit, [row], "ok", None)
        else:
            if cell.evaluation.label not in evaluated:
                evaluated[cell.evaluation.label] = _evaluated_model(fit, cell.evaluation, model, dataset, device)
            x = _evaluation_examples(plan.suite, dataset, cell.spec, device)
            cell_rows, status, error = _evaluate_cell(plan.suite, evaluated[cell.evaluation.label], x, cell, fit,
                                                      rows, device, progress)
            _write_cell(store, summary, bar, cell, fit, cell_rows, status, error)


def _evaluated_model(fit: Fit, evaluation: Evaluation, trained: torch.nn.Module, dataset,
                     device: torch.device) -> torch.nn.Module:
    """The trained model under an evaluation's overrides: rebuilt, then given the trained state (no training)."""
    if not evaluation.changed:
        return trained
    model = bench_train.build_model(fit.model.name, evaluation.model_config, dataset)
    model.load_state_dict(trained.state_dict())  # same keys and shapes: checked by prepare()
    return model.to(device).eval()


def _train_or_build(fit: Fit, dataset, *, device: torch.device, cache_dir: Path | None,
                    progress: bool) -> tuple[torch.nn.Module, float]:
    """The fit's trained model (bench.train trains it or loads its checkpoint) and its training seconds."""
    built = bench_train.build_model(fit.model.name, fit.model_config, dataset)
    if not any(p.requires_grad for p in built.parameters()):
        # Nothing to fit (a closed-form oracle): it is evaluated as built, and its training took no time.
        return built.to(device).eval(), 0.0
    result = bench_train.train_model(fit.model.name, fit.model_config, dataset, fit.train_config,
                                     device=device, cache_dir=cache_dir, progress=progress)
    return result.model, result.train_seconds


def _write_cell(store: ResultsStore, summary: Summary, bar: tqdm, cell: Cell, fit: Fit, rows: list[dict],
                status: str, error: str | None) -> None:
    for row in rows:
        store.append_row(row)
    store.finish_cell(cell.cell_id, status)
    summary.count(status, cell.describe(fit), error)
    bar.update(1)


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _check_finite_parameters(model: torch.nn.Module) -> None:
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"non-finite parameters after training: {', '.join(bad[:3])}")


def _evaluation_examples(suite: Suite, dataset, spec: EstimatorSpec, device: torch.device) -> Tensor:
    x = dataset.split(suite.eval["split"])
    n = spec.n_examples or suite.eval["n_examples"]
    return (x if n is None else x[:n]).to(device)


def evaluate(kind: EstimatorKind, model, x: Tensor, k: int | None, params: dict, *, batch_size: int,
             progress: bool = False) -> dict[str, tuple[Measurement, Tensor, Tensor | None]]:
    """Run one estimator over x in batches; metric -> (first batch's Measurement, values [N], mc stderr [N])."""
    if not kind.per_example:
        return {m.metric: (m, m.values, m.mc_stderr) for m in kind.evaluate(model, x, k, params)}
    batches = x.split(batch_size)
    parts: dict[str, list[Measurement]] = {}
    for batch in tqdm(batches, desc="batches", leave=False, disable=not progress or len(batches) < 4):
        for m in kind.evaluate(model, batch, k, params):
            parts.setdefault(m.metric, []).append(m)
    merged = {}
    for metric, ms in parts.items():
        stderr = None if any(m.mc_stderr is None for m in ms) else torch.cat([m.mc_stderr.double() for m in ms])
        merged[metric] = (ms[0], torch.cat([m.values.double() for m in ms]), stderr)
    return merged


def _evaluate_cell(suite: Suite, model, x: Tensor, cell: Cell, fit: Fit, rows: _RowMaker, device: torch.device,
                   progress: bool) -> tuple[list[dict], str, str | None]:
    kind = ESTIMATORS[cell.estimator]
    # Every cell draws from the fit's seed, so a cell can be recomputed alone (and K grids share draws).
    torch.manual_seed(fit.seed)
    start = time.perf_counter()
    try:
        merged = evaluate(kind, model, x, cell.k, cell.spec.params, batch_size=suite.eval["batch_size"],
                          progress=progress)
        wall = time.perf_counter() - start
        for metric, (_, values, _) in merged.items():
            bad = int((~torch.isfinite(values)).sum())
            if bad:
                raise FloatingPointError(f"{metric} is not finite for {bad} of {values.numel()} examples")
    except NotApplicable as exc:
        return [rows.failed(cell, kind.primary_metric, str(exc), status="skipped")], "skipped", None
    except Exception as exc:  # noqa: BLE001  exceptions, NaN and out-of-memory become failed rows
        _release_memory(device)
        error = _error_text(exc)
        log.error("%s: %s", cell.describe(fit), error)
        return [rows.failed(cell, kind.primary_metric, error)], "failed", error
    # An exact log p(x) draws nothing: its rows (timings included) have no K.
    k = None if any(m.method == "exact" for m, _, _ in merged.values()) else cell.k
    out = []
    for metric, (m, values, mc) in merged.items():
        n = values.numel()
        stderr = float(values.std(unbiased=True) / math.sqrt(n)) if kind.per_example and n >= 2 else None
        mc_stderr = float(mc.pow(2).sum().sqrt() / n) if mc is not None else None
        out.append(rows.row(cell, metric, float(values.mean()), stderr, mc_stderr, m.unit, int(x.shape[0]), wall,
                            method=m.method, k=k))
    if suite.timing["enabled"]:
        out.extend(_timing_rows(suite, kind, model, x, cell, k, rows, device))
    status = "failed" if any(r["status"] == "failed" for r in out) else "ok"
    return out, status, next((r["error"] for r in out if r["status"] == "failed"), None)


def _timing_rows(suite: Suite, kind: EstimatorKind, model, x: Tensor, cell: Cell, k: int | None, rows: _RowMaker,
                 device: torch.device) -> list[dict]:
    from . import timing  # imported here so that suites without timings do not need it

    settings = suite.timing
    batch = x[: settings["n_examples"]]
    try:
        result = timing.measure(lambda: kind.evaluate(model, batch, cell.k, cell.spec.params), device=device,
                                n_examples=int(batch.shape[0]), k=k or 1, warmup=settings["warmup"],
                                repeats=settings["repeats"])
    except Exception as exc:  # noqa: BLE001
        _release_memory(device)
        return [rows.failed(cell, "throughput", f"timing failed: {_error_text(exc)}")]
    n = int(batch.shape[0])
    wall = result.median_s
    return [
        rows.row(cell, "throughput", result.samples_per_s, None, None, "samples/s", n, wall, k=k),
        rows.row(cell, "examples_per_s", result.examples_per_s, None, None, "examples/s", n, wall, k=k),
        rows.row(cell, "wall_median_s", result.median_s, None, None, "s", n, wall, k=k),
        rows.row(cell, "peak_memory", result.peak_memory_bytes, None, None, "bytes", n, wall, k=k),
    ]


def _release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _RowMaker:
    """Builds rows with the columns of bench.store.ROW_COLUMNS for one fit."""

    def __init__(self, run_id: str, fit: Fit, device: torch.device):
        self.run_id, self.fit, self.device = run_id, fit, device.type

    def row(self, cell: Cell, metric: str, value, stderr, mc_stderr, unit: str | None, n_examples: int | None,
            wall_s: float | None, *, method: str | None = None, k: int | None | str = "cell",
            split: str | None = None, status: str = "ok", error: str | None = None) -> dict:
        fit, evaluation = self.fit, cell.evaluation
        label, config_hash, model_config = ((fit.model.label, fit.config_hash, fit.model.config) if evaluation is None
                                            else (evaluation.label, evaluation.config_hash, evaluation.overrides))
        row = {
            "run_id": self.run_id, "cell_id": cell.cell_id, "dataset": fit.dataset,
            "split": split or ("train" if cell.spec is None else fit.split),
            "model": fit.model.name, "label": label, "config_hash": config_hash,
            "model_config": model_config, "seed": fit.seed, "estimator": cell.estimator,
            "k": cell.k if k == "cell" else k, "metric": metric, "method": method,
            "value": None if value is None else float(value), "stderr": stderr, "mc_stderr": mc_stderr,
            "unit": unit, "n_examples": n_examples, "device": self.device, "wall_s": wall_s, "status": status,
            "error": error,
        }
        assert tuple(row) == ROW_COLUMNS
        return row

    def failed(self, cell: Cell, metric: str, error: str, *, status: str = "failed") -> dict:
        return self.row(cell, metric, None, None, None, None, None, None, status=status, error=error)

