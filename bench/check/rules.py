"""The rules of the check: what each metric is compared by, and the tolerance of a bound.

What is compared depends on the metric (METRIC_POLICIES):

* bounds (elbo, iwae, log_marginal, diffusion_elbo) are higher-is-better: a drop larger than the
  tolerance is a regression, a rise larger than it an improvement;
* KL terms (kl, kl/<layer>) and the diffusion ELBO's parts are neither better nor worse when they move, so a
  significant change is shown as information and never fails;
* throughput (throughput, examples_per_s) is compared as a run/baseline ratio,
  only when --throughput-ratio is given: timings depend on the machine and its
  load, so by default CI never fails on time.

The tolerance of a bound is  floor + z * sqrt(se_baseline^2 + se_run^2)  where
se is the Monte Carlo standard error (mc_stderr) when both sides have one, else
the standard error over examples (stderr):

* Monte Carlo error first: a run and its baseline evaluate the same examples
  (same dataset seed and split), so the example-to-example spread is common to
  both and cancels in their difference; what differs is the Monte Carlo draws.
  The over-examples stderr is the fallback where no Monte Carlo error exists
  (a single-draw ELBO); it is larger, so the fallback errs towards passing.
* z = 4 by default: the check tests on the order of a hundred cells at once, and
  a one-sided 4-sigma test keeps the chance of a false alarm per cell near 3e-5
  (well under 1% for the whole suite); it also leaves room for the delta-method
  IWAE error, which understates the error when the weights are heavy-tailed.
* floor = 0.05 nats per example by default: results of a trained model are not
  bit-for-bit across BLAS builds, thread counts and platforms, and a rounding
  difference early in training moves the final bound by a few hundredths of a
  nat. 0.05 nats is far below the gaps the benchmark exists to resolve (ELBO vs
  IWAE-K differ by tenths to whole nats) and below the 0.5-nat loosening the
  tests inject.

A cell present on only one side is reported (and fails only with --fail-on-missing);
when a model's config_hash differs between the two sides the report says "model
config changed", since every cell of that model then shows up as missing on both
sides. A failed cell (status "failed") in the run is a regression: a bound that
cannot be computed is not tight.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .cells import CellKey, cell_key

# Defaults of the tolerance; the module docstring says why each has its value.
DEFAULT_Z = 4.0
DEFAULT_FLOOR_NATS = 0.05


@dataclass(frozen=True)
class Settings:
    z: float = DEFAULT_Z
    floor: float = DEFAULT_FLOOR_NATS  # nats per example
    throughput_ratio: float | None = None  # fail when run/baseline throughput falls below it; None: off
    fail_on_missing: bool = False


@dataclass(frozen=True)
class Finding:
    kind: str  # one of FINDING_KINDS
    key: CellKey
    baseline: float | None
    run: float | None
    change: float | None  # run - baseline (nats) for bounds and KL, run / baseline for throughput
    tolerance: float | None  # allowed drop (nats), or the ratio threshold for throughput
    note: str = ""


# The sections of the report, in print order, with whether a finding of that kind fails the check.
FINDING_KINDS = {
    "regression": True,
    "improvement": False,
    "missing in run": False,
    "new in run": False,
    "information": False,
}


def noise_scale(baseline: dict, run: dict) -> tuple[float, str]:
    """sqrt(se_b^2 + se_r^2) and which standard error it used (see the module docstring for the order)."""
    for column in ("mc_stderr", "stderr"):
        sides = (baseline.get(column), run.get(column))
        if all(isinstance(side, (int, float)) and math.isfinite(side) for side in sides):
            return math.hypot(*sides), column
    return 0.0, "floor only"


def bound_tolerance(baseline: dict, run: dict, settings: Settings) -> tuple[float, float, str]:
    """(allowed change in nats, the combined standard error, which standard error it is)."""
    scale, source = noise_scale(baseline, run)
    return settings.floor + settings.z * scale, scale, source


def _not_finite(run: dict) -> bool:
    return not isinstance(run["value"], (int, float)) or not math.isfinite(run["value"])


def _not_finite_finding(kind: str, baseline: dict, run: dict) -> Finding:
    return Finding(kind, cell_key(run), baseline["value"], None, None, None, f"value {run['value']!r} is not finite")


def _compare_values(baseline: dict, run: dict, settings: Settings, *, bound: bool) -> Finding | None:
    """A move beyond the tolerance: for a bound a regression (down) or an improvement (up), else information."""
    if _not_finite(run):
        return _not_finite_finding("regression" if bound else "information", baseline, run)
    tolerance, scale, source = bound_tolerance(baseline, run, settings)
    change = run["value"] - baseline["value"]
    if abs(change) <= tolerance:
        return None
    if not bound:
        return Finding("information", cell_key(run), baseline["value"], run["value"], change, tolerance,
                       f"KL moved (tolerance from {source}); not a failure")
    z = f" (z = {change / scale:+.1f})" if scale > 0 else ""
    return Finding("regression" if change < 0 else "improvement", cell_key(run), baseline["value"], run["value"],
                   change, tolerance, f"tolerance from {source}{z}")


def compare_bound(baseline: dict, run: dict, settings: Settings) -> Finding | None:
    return _compare_values(baseline, run, settings, bound=True)


def compare_information(baseline: dict, run: dict, settings: Settings) -> Finding | None:
    """KL terms: a significant change either way is worth a look, never a failure."""
    return _compare_values(baseline, run, settings, bound=False)


def compare_throughput(baseline: dict, run: dict, settings: Settings) -> Finding | None:
    """Throughput as a ratio (only when asked for): below settings.throughput_ratio is a regression."""
    key = cell_key(run)
    if _not_finite(run) or baseline["value"] <= 0:
        return Finding("information", key, baseline["value"], run["value"], None, settings.throughput_ratio,
                       "throughput not comparable (non-positive or non-finite)")
    ratio = run["value"] / baseline["value"]
    if ratio >= settings.throughput_ratio:
        return None
    return Finding("regression", key, baseline["value"], run["value"], ratio, settings.throughput_ratio,
                   f"throughput fell to {ratio:.2f}x of the baseline (threshold {settings.throughput_ratio:.2f}x)")


Comparison = Callable[[dict, dict, Settings], "Finding | None"]

# How each metric is compared; metrics not listed (ess, reconstruction, timings in seconds, memory,
# active units, training time) are diagnostics, not bounds, and are neither stored nor compared.
METRIC_POLICIES: dict[str, Comparison] = {
    "elbo": compare_bound,
    "iwae": compare_bound,
    "log_marginal": compare_bound,
    "diffusion_elbo": compare_bound,
    "kl": compare_information,
    "throughput": compare_throughput,
    "examples_per_s": compare_throughput,
}
# Metrics with a part after the '/': per-layer KL ("kl/<layer>") and the diffusion ELBO's parts
# (reconstruction, prior, diffusion) move without being better or worse on their own.
PART_POLICIES: dict[str, Comparison] = {"kl": compare_information, "diffusion_elbo": compare_information}


def policy_of(metric: object) -> Comparison | None:
    """The comparison for a metric: METRIC_POLICIES by name, PART_POLICIES for "<name>/<part>"."""
    if not isinstance(metric, str):
        return None
    name, _, part = metric.partition("/")
    return (PART_POLICIES if part else METRIC_POLICIES).get(name)


def active_comparison(metric: object, settings: Settings) -> Comparison | None:
    """The comparison this check runs for a metric: timings only when --throughput-ratio is given."""
    comparison = policy_of(metric)
    if comparison is compare_throughput and settings.throughput_ratio is None:
        return None
    return comparison
