"""One estimator cell: the estimator over the evaluation examples in batches, reduced to rows.

Each row's value is the mean over examples (a diagnostic may reduce otherwise: REDUCTIONS),
``stderr`` the standard error over examples and ``mc_stderr`` the Monte Carlo standard error of
that mean; bounds keep each example's value (``per_example``). A cell that raises, yields a
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
from reports.schema import PER_EXAMPLE_DECIMALS, ResultRow
from vaes.base import MissingCapability

from .device import release_memory
from .evaluators import ESTIMATORS, EstimatorKind, Measurement, NotApplicable
from .rows import FitRows
from .timing import measure

log = logging.getLogger(__name__)

TIMING_METRICS = ("throughput", "examples_per_s", "wall_median_s", "peak_memory")  # the rows of _timing_rows


def _finite_part(values: Tensor) -> Tensor:
    return values[torch.isfinite(values)]


# How a measurement's per-example values [N] become its row's value. "mean" needs every value finite (a
# non-finite one fails the cell); the others are diagnostics whose per-example values may be infinite
# (e.g. a k-hat of inf: too few positive weights to fit a tail), NaN where nothing finite is left.
REDUCTIONS = {
    "mean": lambda values: float(values.mean()),
    "finite_mean": lambda values: float(_finite_part(values).mean()),
    "finite_max": lambda values: float(_finite_part(values).max()) if torch.isfinite(values).any() else math.nan,
    # per-example standard errors -> the standard error of their mean: sqrt(sum se_i^2) / N
    "mean_stderr": lambda values: float(values.pow(2).sum().sqrt() / values.numel()),
}


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
                  progress: bool, draw_seed: int | None = None) -> tuple[list[ResultRow], str, str | None]:
    """The cell's rows, its status and its error (None unless failed).

    ``draw_seed`` replaces the fit's seed for the Monte Carlo draws only (the rows keep the fit's seed):
    the same trained model evaluated with other draws, to measure the spread of a cell over draws.
    """
    kind = ESTIMATORS[cell.estimator]
    # Every cell draws from the fit's seed, so a cell can be recomputed alone (and K grids share draws).
    torch.manual_seed(fit.seed if draw_seed is None else draw_seed)
    start = time.perf_counter()
    try:
        merged = evaluate(kind, model, x, cell.k, cell.spec.params, batch_size=suite.eval["batch_size"],
                          progress=progress)
        wall = time.perf_counter() - start
        for metric, (m, values, _) in merged.items():
            if m.reduction != "mean":
                continue
            bad = int((~torch.isfinite(values)).sum())
            if bad:
                raise FloatingPointError(f"{metric} is not finite for {bad} of {values.numel()} examples")
    except (NotApplicable, MissingCapability) as exc:  # nothing to measure on this model
        return [rows.skipped(cell, metric=kind.primary_metric, reason=str(exc))], "skipped", None
    except Exception as exc:  # noqa: BLE001  exceptions, NaN and out-of-memory become failed rows
        release_memory(device)
        error = error_text(exc)
        log.error("%s: %s", cell.describe(fit), error)
        return [rows.failed(cell, metric=kind.primary_metric, error=error)], "failed", error
    # An exact log p(x) draws nothing and AIS has no K: their rows (timings included) have none.
    k = None if any(m.method not in (None, "iwae") for m, _, _ in merged.values()) else cell.k
    out = []
    for metric, (m, values, mc) in merged.items():
        n = values.numel()
        averaged = kind.per_example and m.reduction == "mean" and n >= 2  # a mean has an error over examples
        stderr = float(values.std(unbiased=True) / math.sqrt(n)) if averaged else None
        mc_stderr = REDUCTIONS["mean_stderr"](mc) if mc is not None else None
        per_example = tuple(round(v, PER_EXAMPLE_DECIMALS) for v in values.tolist()) if m.per_example else None
        out.append(rows.measured(cell, metric=metric, value=REDUCTIONS[m.reduction](values), stderr=stderr,
                                 mc_stderr=mc_stderr, unit=m.unit, k=k, n_examples=int(x.shape[0]), wall_s=wall,
                                 method=m.method, replicates=m.replicates, per_example=per_example))
    if suite.timing["enabled"] and kind.timed(cell.spec.params):
        draws_per_k = cell.spec.params.get("replicates", 1)  # a replicated estimate draws R x K per example
        out.extend(_timing_rows(suite, kind, model, x, cell, k, draws_per_k, rows, device))
    failed = [r.error for r in out if r.status == "failed"]
    return out, "failed" if failed else "ok", failed[0] if failed else None


def _timing_rows(suite: Suite, kind: EstimatorKind, model, x: Tensor, cell: Cell, k: int | None, draws_per_k: int,
                 rows: FitRows, device: torch.device) -> list[ResultRow]:
    settings = suite.timing
    batch = x[: settings["n_examples"]]
    n = int(batch.shape[0])
    try:
        result = measure(lambda: kind.evaluate(model, batch, cell.k, cell.spec.params), device=device,
                         n_examples=n, k=(k or 1) * draws_per_k, warmup=settings["warmup"], repeats=settings["repeats"])
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
