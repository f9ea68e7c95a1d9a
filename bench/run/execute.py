"""``execute``: a plan's pending cells run against a results store, fit by fit.

Cells are grouped by the fit they share (dataset x model entry x seed): the fit is
trained (or loaded from the checkpoint cache by bench.train) once, then each
estimator cell evaluates it, under the evaluation's overrides where it has any
(the trained state loaded into the rebuilt model). A fit whose training fails fails
its cells; a cell that fails is written as a failed row; the run goes on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from bench.plan.fits import Cell, Evaluation, Fit, Plan
from bench.plan.suite import EstimatorSpec, Suite
from bench.store import ResultsStore
from bench.train import build_model, train_model
from reports.schema import ResultRow

from .evaluate import error_text, evaluate_cell
from .evaluators import ESTIMATORS
from .rows import FitRows

log = logging.getLogger(__name__)


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
                _run_fit(plan, fit, pending, _Writer(store, summary, bar, fit), device=device, cache_dir=cache_dir,
                         progress=progress)
    finally:
        bar.close()
    return summary


@dataclass
class _Writer:
    """Writes a finished cell's rows, marks it finished, counts it and moves the progress bar."""

    store: ResultsStore
    summary: Summary
    bar: tqdm
    fit: Fit

    def cell(self, cell: Cell, rows: list[ResultRow], status: str, error: str | None) -> None:
        for row in rows:
            self.store.append_row(row)
        self.store.finish_cell(cell.cell_id, status)
        self.summary.count(status, cell.describe(self.fit), error)
        self.bar.update(1)


def _run_fit(plan: Plan, fit: Fit, pending: list[Cell], write: _Writer, *, device: torch.device,
             cache_dir: Path | None, progress: bool) -> None:
    dataset = plan.datasets[fit.dataset]
    rows = FitRows(write.store.manifest["run_id"], fit, device)
    write.bar.set_postfix_str(f"{fit.dataset}/{fit.model.label}/seed {fit.seed}: training")
    try:
        model, train_seconds = _train_or_build(fit, dataset, device=device, cache_dir=cache_dir, progress=progress)
        _check_finite_parameters(model)
    except Exception as exc:  # noqa: BLE001  a failed fit fails its cells; the run goes on
        error = f"training failed: {error_text(exc)}"
        log.error("%s / %s / seed %d: %s", fit.dataset, fit.model.label, fit.seed, error)
        for cell in pending:
            metric = "train_seconds" if cell.spec is None else ESTIMATORS[cell.estimator].primary_metric
            write.cell(cell, [rows.failed(cell, metric=metric, error=error)], "failed", error)
        return
    n_train = int(dataset.split("train").shape[0])
    evaluated = {}  # evaluation label -> the trained model rebuilt under its overrides
    for cell in pending:
        write.bar.set_postfix_str(cell.describe(fit))
        if cell.spec is None:
            row = rows.measured(cell, metric="train_seconds", value=train_seconds, unit="s", k=None,
                                n_examples=n_train, wall_s=train_seconds)
            write.cell(cell, [row], "ok", None)
            continue
        if cell.evaluation.label not in evaluated:
            evaluated[cell.evaluation.label] = _evaluated_model(fit, cell.evaluation, model, dataset, device)
        x = _evaluation_examples(plan.suite, dataset, cell.spec, device)
        cell_rows, status, error = evaluate_cell(plan.suite, evaluated[cell.evaluation.label], x, cell, fit, rows,
                                                 device, progress)
        write.cell(cell, cell_rows, status, error)


def _evaluated_model(fit: Fit, evaluation: Evaluation, trained: torch.nn.Module, dataset,
                     device: torch.device) -> torch.nn.Module:
    """The trained model under an evaluation's overrides: rebuilt, then given the trained state (no training)."""
    if not evaluation.changed:
        return trained
    model = build_model(fit.model.name, evaluation.model_config, dataset)
    model.load_state_dict(trained.state_dict())  # same keys and shapes: checked by prepare()
    return model.to(device).eval()


def _train_or_build(fit: Fit, dataset, *, device: torch.device, cache_dir: Path | None,
                    progress: bool) -> tuple[torch.nn.Module, float]:
    """The fit's trained model (bench.train trains it or loads its checkpoint) and its training seconds."""
    built = build_model(fit.model.name, fit.model_config, dataset)
    if not any(p.requires_grad for p in built.parameters()):
        # Nothing to fit (a closed-form oracle): it is evaluated as built, and its training took no time.
        return built.to(device).eval(), 0.0
    result = train_model(fit.model.name, fit.model_config, dataset, fit.train_config,
                         device=device, cache_dir=cache_dir, progress=progress)
    return result.model, result.train_seconds


def _check_finite_parameters(model: torch.nn.Module) -> None:
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"non-finite parameters after training: {', '.join(bad[:3])}")


def _evaluation_examples(suite: Suite, dataset, spec: EstimatorSpec, device: torch.device) -> Tensor:
    x = dataset.split(suite.eval["split"])
    n = spec.n_examples or suite.eval["n_examples"]
    return (x if n is None else x[:n]).to(device)
