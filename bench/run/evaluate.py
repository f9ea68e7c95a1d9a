"""One estimator cell: the estimator over the evaluation examples in batches, reduced to rows.

Each row's value is the mean over examples, ``stderr`` the standard error over examples and
``mc_stderr`` the Monte Carlo standard error of that mean. A cell that raises, yields a
non-finite value or runs out of memory becomes a failed row; an estimator with nothing to
measure on the model a skipped row. Timing rows follow when the suite asks for them.
"""
from __future__ import annotations

import logging
import math
import time

import torch
from torch import Tensor
from tqdm import tqdm

from bench.plan.fits import Cell, Fit
from bench.plan.suite import Suite
from reports.schema import ResultRow

from .device import release_memory
from .evaluators import ESTIMATORS, EstimatorKind, Measurement, NotApplicable
from .rows import FitRows
from .timing import measure

log = logging.getLogger(__name__)

TIMING_METRICS = ("throughput", "examples_per_s", "wall_median_s", "peak_memory")  # the rows of _timing_rows


def error_text(exc: BaseException) -> str:
    """One line: the exception's type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


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


def evaluate_cell(suite: Suite, model, x: Tensor, cell: Cell, fit: Fit, rows: FitRows, device: torch.device,
                  progress: bool) -> tuple[list[ResultRow], str, str | None]:
    """The cell's rows, its status and its error (None unless failed)."""
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
        return [rows.skipped(cell, metric=kind.primary_metric, reason=str(exc))], "skipped", None
    except Exception as exc:  # noqa: BLE001  exceptions, NaN and out-of-memory become failed rows
        release_memory(device)
        error = error_text(exc)
        log.error("%s: %s", cell.describe(fit), error)
        return [rows.failed(cell, metric=kind.primary_metric, error=error)], "failed", error
    # An exact log p(x) draws nothing: its rows (timings included) have no K.
    k = None if any(m.method == "exact" for m, _, _ in merged.values()) else cell.k
    out = []
    for metric, (m, values, mc) in merged.items():
        n = values.numel()
        stderr = float(values.std(unbiased=True) / math.sqrt(n)) if kind.per_example and n >= 2 else None
        mc_stderr = float(mc.pow(2).sum().sqrt() / n) if mc is not None else None
        out.append(rows.measured(cell, metric=metric, value=float(values.mean()), stderr=stderr, mc_stderr=mc_stderr,
                                 unit=m.unit, k=k, n_examples=int(x.shape[0]), wall_s=wall, method=m.method))
    if suite.timing["enabled"]:
        out.extend(_timing_rows(suite, kind, model, x, cell, k, rows, device))
    failed = [r.error for r in out if r.status == "failed"]
    return out, "failed" if failed else "ok", failed[0] if failed else None


def _timing_rows(suite: Suite, kind: EstimatorKind, model, x: Tensor, cell: Cell, k: int | None, rows: FitRows,
                 device: torch.device) -> list[ResultRow]:
    settings = suite.timing
    batch = x[: settings["n_examples"]]
    n = int(batch.shape[0])
    try:
        result = measure(lambda: kind.evaluate(model, batch, cell.k, cell.spec.params), device=device,
                         n_examples=n, k=k or 1, warmup=settings["warmup"], repeats=settings["repeats"])
    except Exception as exc:  # noqa: BLE001
        release_memory(device)
        return [rows.failed(cell, metric="throughput", error=f"timing failed: {error_text(exc)}")]
    timed = {"k": k, "n_examples": n, "wall_s": result.median_s}
    return [
        rows.measured(cell, metric="throughput", value=result.samples_per_s, unit="samples/s",
                      timing_s=result.times_s, **timed),
        rows.measured(cell, metric="examples_per_s", value=result.examples_per_s, unit="examples/s",
                      timing_s=result.times_s, **timed),
        rows.measured(cell, metric="wall_median_s", value=result.median_s, unit="s", timing_s=result.times_s, **timed),
        rows.measured(cell, metric="peak_memory", value=result.peak_memory_bytes, unit="bytes", **timed),
    ]
