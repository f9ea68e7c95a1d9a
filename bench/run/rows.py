"""The rows of one fit: ``ResultRow``s (reports.schema) filled from the fit, the cell and the measurement."""
from __future__ import annotations

import torch

from bench.plan.fits import Cell, Fit
from reports.schema import ResultRow


class FitRows:
    """Builds the rows of one fit's cells; everything that is the same for the fit is given once here."""

    def __init__(self, run_id: str, fit: Fit, device: torch.device):
        self.run_id, self.fit, self.device = run_id, fit, device.type

    def measured(self, cell: Cell, *, metric: str, value: float, unit: str, k: int | None, n_examples: int,
                 wall_s: float, stderr: float | None = None, mc_stderr: float | None = None,
                 method: str | None = None, timing_s: tuple[float, ...] | None = None,
                 replicates: int | None = None, per_example: tuple[float, ...] | None = None) -> ResultRow:
        """A row with a value (status ok); ``k`` is the draws the value used (None: none, e.g. exact log p(x))."""
        return self._row(cell, metric=metric, value=float(value), stderr=stderr, mc_stderr=mc_stderr, unit=unit,
                         k=k, n_examples=n_examples, wall_s=wall_s, method=method, timing_s=timing_s,
                         replicates=replicates, per_example=per_example, status="ok", error=None)

    def failed(self, cell: Cell, *, metric: str, error: str) -> ResultRow:
        """The row of a cell (or timing) that raised, went non-finite or ran out of memory."""
        return self._without_value(cell, metric, "failed", error)

    def skipped(self, cell: Cell, *, metric: str, reason: str) -> ResultRow:
        """The row of a cell whose estimator has nothing to measure on this model."""
        return self._without_value(cell, metric, "skipped", reason)

    def _without_value(self, cell: Cell, metric: str, status: str, error: str) -> ResultRow:
        return self._row(cell, metric=metric, value=None, stderr=None, mc_stderr=None, unit=None, k=cell.k,
                         n_examples=None, wall_s=None, method=None, timing_s=None, replicates=None, per_example=None,
                         status=status, error=error)

    def _row(self, cell: Cell, **measurement) -> ResultRow:
        fit, evaluation = self.fit, cell.evaluation
        if evaluation is None:  # the training cell: the model as trained
            label, config_hash, model_config, structure = (fit.model.label, fit.config_hash, fit.model.config,
                                                           fit.structure)
        else:
            label, config_hash, model_config, structure = (evaluation.label, evaluation.config_hash,
                                                           evaluation.overrides, evaluation.structure)
        return ResultRow(run_id=self.run_id, cell_id=cell.cell_id, dataset=fit.dataset,
                         split="train" if cell.spec is None else fit.split, model=fit.model.name, label=label,
                         config_hash=config_hash, model_config=model_config, structure=structure, seed=fit.seed,
                         estimator=cell.estimator, device=self.device, **measurement)
