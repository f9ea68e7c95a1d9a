"""A log_marginal cell that is the same estimate as a finished iwae cell of the same fit takes its rows.

Where a model has no exact log p(x), log_marginal is the IWAE-K bound. Every estimator cell of a
fit seeds from the fit's seed and walks the same examples in the same batches, so an iwae cell
with the same evaluation, K, examples and other parameters (any besides K and log_marginal's
method, e.g. replicates) has already computed exactly those numbers: its
"iwae" row becomes the log_marginal row (method "iwae"), and its other rows (the weight
diagnostics, and the timings of the same call) are taken as they are. Values are bit-identical
to computing the cell (tests/test_executors.py holds that, diagnostics included).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from bench.plan.fits import Cell
from reports.schema import ResultRow

SOURCE, TARGET = "iwae", "log_marginal"  # estimator names, which are also their value rows' metric names


class IwaeReuse:
    """The finished iwae cells of one fit, offered to its log_marginal cells."""

    def __init__(self):
        self._rows: dict[tuple, tuple[ResultRow, ...]] = {}  # (evaluation, K, examples, settings) -> rows

    @staticmethod
    def order(cells: tuple[Cell, ...]) -> list[Cell]:
        """The cells with every log_marginal after the iwae cells, so it finds them finished."""
        return sorted(cells, key=lambda cell: cell.estimator == TARGET)

    def offer(self, cell: Cell, x: Tensor, rows: list[ResultRow], status: str) -> None:
        if cell.estimator == SOURCE and status == "ok":
            self._rows[_key(cell, x)] = tuple(rows)

    def rows_for(self, cell: Cell, model, x: Tensor) -> tuple[ResultRow, ...] | None:
        """The log_marginal cell's rows taken from the matching iwae cell; None where it must be computed."""
        if cell.estimator != TARGET or not _is_iwae(cell.spec.params["method"], model, x):
            return None
        source = self._rows.get(_key(cell, x))
        if source is None:
            return None
        renamed = {"estimator": TARGET, "cell_id": cell.cell_id}
        value = {"metric": TARGET, "method": SOURCE}  # the value row: log p(x) by its IWAE estimate
        return tuple(dataclasses.replace(row, **renamed, **(value if row.metric == SOURCE else {})) for row in source)


def _key(cell: Cell, x: Tensor) -> tuple:
    settings = sorted((name, repr(value)) for name, value in cell.spec.params.items() if name not in ("k", "method"))
    return cell.evaluation.label, cell.k, int(x.shape[0]), tuple(settings)


def _is_iwae(method: str, model, x: Tensor) -> bool:
    """Whether log_marginal resolves to its IWAE estimate here (as estimators.log_marginal resolves "auto")."""
    if method == "auto":
        with torch.inference_mode():
            return model.exact_log_marginal(x[:1]) is None
    return method == SOURCE
