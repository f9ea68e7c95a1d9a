"""``execute``: a plan's pending cells run against a results store, one task per fit, on an executor.

Cells are grouped by the fit they share (dataset x model entry x seed); each fit with pending
cells is one task (bench.run.fit_task: train or load, then evaluate), run by the executor the
settings name (bench.run.executors). Results stream back here, and only here are they written:
a cell's rows, then its completion, flushed as they come, so the store has one writer whatever
runs the fits. A fit whose worker died has its unfinished cells written as failed rows (the
error says so; ``--resume`` reruns them) and the run goes on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from bench.plan.fits import Cell, Fit, Plan
from bench.store import ResultsStore

from . import executors
from .executors import ExecutorSettings, FitLost
from .fit_task import CellResult, FitTask, failed_cell

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


def pending_tasks(plan: Plan, store: ResultsStore, *, device: torch.device, cache_dir: Path | None,
                  progress: bool) -> list[FitTask]:
    """One task per fit that has cells the store has not finished."""
    cache = None if cache_dir is None else Path(cache_dir).resolve()
    tasks = []
    for index, fit in enumerate(plan.fits):
        pending = tuple(c for c in fit.cells if c.cell_id not in store.finished)
        if pending:
            tasks.append(FitTask(index, store.manifest["run_id"], plan.suite, fit, pending, device, cache, progress))
    return tasks


def execute(plan: Plan, store: ResultsStore, *, device: torch.device, cache_dir: Path | None,
            progress: bool = True, settings: ExecutorSettings | None = None) -> Summary:
    """Run every pending cell; ``settings`` default to the serial executor with torch's current threads."""
    summary = Summary()
    fit_of = {cell.cell_id: fit for fit in plan.fits for cell in fit.cells}
    for cell_id, status in store.finished.items():
        if cell_id in fit_of:
            summary.count(status)
    settings = settings or ExecutorSettings("serial", 1, torch.get_num_threads())
    tasks = pending_tasks(plan, store, device=device, cache_dir=cache_dir,
                          progress=progress and settings.name == "serial")
    bar = tqdm(total=plan.n_cells, initial=len(summary.failed) + summary.ok + summary.skipped, unit="cell",
               desc="cells", disable=not progress, dynamic_ncols=True)
    writer = _Writer(store, summary, bar, {task.index: task for task in tasks},
                     {cell.cell_id: cell for fit in plan.fits for cell in fit.cells})
    events = executors.run(tasks, plan.datasets, settings)
    try:
        for event in events:
            if isinstance(event, FitLost):
                writer.lost(event)
            else:
                writer.cell(event)
    finally:
        events.close()  # ends the executor's workers, also on an error or Ctrl-C here
        bar.close()
    return summary


@dataclass
class _Writer:
    """Writes a finished cell's rows, marks it finished, counts it and moves the progress bar."""

    store: ResultsStore
    summary: Summary
    bar: tqdm
    tasks: dict[int, FitTask]  # fit index -> its task
    cells: dict[str, Cell]

    def cell(self, result: CellResult) -> None:
        fit: Fit = self.tasks[result.fit_index].fit
        for row in result.rows:
            self.store.append_row(row)
        self.store.finish_cell(result.cell_id, result.status)
        description = self.cells[result.cell_id].describe(fit)
        self.summary.count(result.status, description, result.error)
        self.bar.set_postfix_str(description)
        self.bar.update(1)

    def lost(self, event: FitLost) -> None:
        task = self.tasks[event.fit_index]
        error = f"{event.error}; `--resume` reruns the fit"
        log.error("%s: %s", task.describe(), error)
        for cell in task.cells:
            if cell.cell_id not in self.store.finished:
                self.cell(failed_cell(task, cell, error))
