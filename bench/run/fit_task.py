"""One fit as a unit of work: train (or load) the model, evaluate its pending cells, yield each cell's rows.

The same generator runs in the driver (serial executor), in a worker process or in a Ray task.
What it takes and yields pickles, and it writes nothing: the driver alone appends to the store.
Values depend only on the fit and the cell, never on the process or the order: training seeds
from the fit's train config, and every estimator cell from the fit's seed (so a cell can be
recomputed alone, and a K grid shares its draws).

A fit whose training fails fails its cells; a cell that fails is a failed row; an unexpected
error fails the fit's remaining cells (logged with its traceback) and the run goes on.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bench.data import Dataset
from bench.plan.fits import Cell, Evaluation, Fit
from bench.plan.suite import EstimatorSpec, Suite
from bench.train import build_model, train_model
from reports.schema import ResultRow

from .evaluate import error_text, evaluate_cell
from .evaluators import ESTIMATORS
from .reuse import IwaeReuse
from .rows import FitRows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitTask:
    """A fit and the cells of it still to run, with everything a worker needs besides the dataset."""

    index: int  # the fit's position in the plan: the driver's key for it
    run_id: str
    suite: Suite
    fit: Fit
    cells: tuple[Cell, ...]  # the pending cells, in plan order
    device: torch.device
    cache_dir: Path | None  # absolute: a worker may run in another directory
    progress: bool  # training progress bars (only where one fit runs at a time)

    def describe(self) -> str:
        return f"{self.fit.dataset} / {self.fit.model.label} / seed {self.fit.seed}"


@dataclass(frozen=True)
class CellResult:
    """A finished cell: its rows, status and error, as the driver writes them."""

    fit_index: int
    cell_id: str
    rows: tuple[ResultRow, ...]
    status: str  # "ok", "skipped" or "failed"
    error: str | None


def failed_cell(task: FitTask, cell: Cell, error: str) -> CellResult:
    """The one failed row of a cell that did not run (training failed, or its worker died)."""
    metric = "train_seconds" if cell.spec is None else ESTIMATORS[cell.estimator].primary_metric
    row = FitRows(task.run_id, task.fit, task.device).failed(cell, metric=metric, error=error)
    return CellResult(task.index, cell.cell_id, (row,), "failed", error)


def shippable(dataset: Dataset) -> Dataset:
    """The dataset as a worker needs it: the splits, without the closure of the exact density (not picklable)."""
    return dataclasses.replace(dataset, exact_log_density=None)


def run_fit(task: FitTask, dataset: Dataset) -> Iterator[CellResult]:
    """Each pending cell's result, in order; every pending cell gets exactly one."""
    finished = set()
    try:
        for result in _fit_cells(task, dataset):
            finished.add(result.cell_id)
            yield result
    except Exception as exc:  # a fault of the fit (not of one cell) fails what is left of it; the run goes on
        error = f"fit failed: {error_text(exc)}"
        log.exception("%s: %s", task.describe(), error)
        for cell in task.cells:
            if cell.cell_id not in finished:
                yield failed_cell(task, cell, error)


def _fit_cells(task: FitTask, dataset: Dataset) -> Iterator[CellResult]:
    fit, device = task.fit, task.device
    rows = FitRows(task.run_id, fit, device)
    try:
        model, train_seconds, history = _train_or_build(fit, dataset, device=device, cache_dir=task.cache_dir,
                                                        progress=task.progress)
        _check_finite_parameters(model)
    except Exception as exc:  # noqa: BLE001  a failed fit fails its cells; the run goes on
        error = f"training failed: {error_text(exc)}"
        log.error("%s: %s", task.describe(), error)
        for cell in task.cells:
            yield failed_cell(task, cell, error)
        return
    n_train = int(dataset.split("train").shape[0])
    evaluated = {}  # evaluation label -> the trained model rebuilt under its overrides
    reuse = IwaeReuse()
    for cell in reuse.order(task.cells):
        if cell.spec is None:
            row = rows.measured(cell, metric="train_seconds", value=train_seconds, unit="s", k=None,
                                n_examples=n_train, wall_s=train_seconds)
            yield CellResult(task.index, cell.cell_id, (row, *_curve_rows(rows, cell, fit, history)), "ok", None)
            continue
        if cell.evaluation.label not in evaluated:
            evaluated[cell.evaluation.label] = _evaluated_model(fit, cell.evaluation, model, dataset, device)
        model_evaluated = evaluated[cell.evaluation.label]
        x = _evaluation_examples(task.suite, dataset, cell.spec, device)
        reused = reuse.rows_for(cell, model_evaluated, x)
        if reused is not None:
            yield CellResult(task.index, cell.cell_id, reused, "ok", None)
            continue
        cell_rows, status, error = evaluate_cell(task.suite, model_evaluated, x, cell, fit, rows, device,
                                                 task.progress)
        reuse.offer(cell, x, cell_rows, status)
        yield CellResult(task.index, cell.cell_id, tuple(cell_rows), status, error)


def _evaluated_model(fit: Fit, evaluation: Evaluation, trained: torch.nn.Module, dataset,
                     device: torch.device) -> torch.nn.Module:
    """The trained model under an evaluation's overrides: rebuilt, then given the trained state (no training)."""
    if not evaluation.changed:
        return trained
    model = build_model(fit.model.name, evaluation.model_config, dataset)
    model.load_state_dict(trained.state_dict())  # same keys and shapes: checked by prepare()
    return model.to(device).eval()


def _train_or_build(fit: Fit, dataset, *, device: torch.device, cache_dir: Path | None,
                    progress: bool) -> tuple[torch.nn.Module, float, list[dict]]:
    """The fit's trained model (bench.train trains it or loads its checkpoint), its training seconds and
    its training history (bench.train.loop: one entry at step 0, every eval_every steps and the last)."""
    built = build_model(fit.model.name, fit.model_config, dataset)
    if not any(p.requires_grad for p in built.parameters()):
        # Nothing to fit (a closed-form oracle): it is evaluated as built, and its training took no time.
        return built.to(device).eval(), 0.0, []
    result = train_model(fit.model.name, fit.model_config, dataset, fit.train_config,
                         device=device, cache_dir=cache_dir, progress=progress)
    return result.model, result.train_seconds, result.history


TRAINING_CURVE_METRIC = "valid_elbo"  # rows "valid_elbo/<step>": the training curve, read by reports.flags


def _curve_rows(rows: FitRows, cell: Cell, fit: Fit, history: list[dict]) -> list[ResultRow]:
    """The training curve as rows of the training cell: the validation ELBO at each recorded step, so a
    report can tell whether training had converged (the curve still rising at its end)."""
    return [rows.measured(cell, metric=f"{TRAINING_CURVE_METRIC}/{int(entry['step'])}", value=entry["valid_elbo"],
                          unit="nats", k=None, n_examples=fit.train_config.eval_examples, wall_s=entry.get("seconds"))
            for entry in history if entry.get("valid_elbo") is not None]


def _check_finite_parameters(model: torch.nn.Module) -> None:
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"non-finite parameters after training: {', '.join(bad[:3])}")


def _evaluation_examples(suite: Suite, dataset, spec: EstimatorSpec, device: torch.device) -> Tensor:
    x = dataset.split(suite.eval["split"])
    n = spec.n_examples or suite.eval["n_examples"]
    return (x if n is None else x[:n]).to(device)
