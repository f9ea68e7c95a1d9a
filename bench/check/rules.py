"""The rules of the check: what each metric is compared by, and the tolerance of a bound.

What is compared depends on the metric (METRIC_POLICIES):

* bounds (elbo, iwae, log_marginal, diffusion_elbo) are higher-is-better: a drop larger than the
  tolerance is a regression; a rise larger than it is an improvement, and it fails too: the
  baseline no longer describes the code, and a stale baseline would let a later loosening of the
  same size pass. Both say "rewrite the baseline" (--write-baseline);
* KL terms (kl, kl/<layer>) and the diffusion ELBO's parts are neither better nor worse when they move, so a
  significant change is shown as information and never fails;
* throughput (throughput, examples_per_s) is compared only when --throughput-ratio R is given
  (timings depend on the machine and its load, so by default CI never fails on time): a cell
  regresses when its throughput falls below R x the baseline's AND a one-sided Mann-Whitney U
  test on the raw timing samples (timing_s, seconds per timed call, as asv compares them) says
  the run's calls are slower at level --throughput-alpha. With n and m samples the smallest
  p-value is 1 / C(n + m, n): 0.17 for 2 against 2, 0.004 for 5 against 5, so a suite that
  wants the test to be able to fail times at least 4 repeats.

The tolerance of a bound is  floor + z * se,  where se is the standard error of the change:

* paired first: where both sides keep each example's value (per_example, same examples), se is
  the standard error of the mean of the per-example differences d_i = run_i - baseline_i,
  sd(d) / sqrt(n). It is honest whatever changed: where the run drew new weights it estimates
  the Monte Carlo noise of the change directly (n - 1 degrees of freedom; its expectation is
  the hypot of the two Monte Carlo errors below), and where the run shares the baseline's draws
  (the same code path: common random numbers) it is ~0, because then no part of the change is
  noise, and a loosening far below the cell's Monte Carlo error still fails.
* else sqrt(se_baseline^2 + se_run^2) with se the Monte Carlo standard error (mc_stderr) when
  both sides have one, else the standard error over examples (stderr).
* Monte Carlo error before the spread over examples: a run and its baseline evaluate the same examples
  (same dataset seed and split), so the example-to-example spread is common to
  both and cancels in their difference; what differs is the Monte Carlo draws.
  Every mc_stderr the runner writes is honest: IWAE and IWAE log p(x) from the
  spread of independent replicates (B (R - 1) degrees of freedom for a cell of B
  examples), ELBO and KL from the sample variance of their draws. The over-examples
  stderr is the fallback where no Monte Carlo error exists (a single-draw ELBO);
  it is larger, so the fallback errs towards passing.
* z = 4 by default: the check tests on the order of a hundred cells at once in
  both directions, and a two-sided 4-sigma test keeps the chance of a false alarm
  per cell near 6e-5 (about 0.6% for a hundred cells).
* floor = 0.05 nats per example by default: results of a trained model are not
  bit-for-bit across BLAS builds, thread counts and platforms, and a rounding
  difference early in training moves the final bound by a few hundredths of a
  nat. 0.05 nats is far below the gaps the benchmark exists to resolve (ELBO vs
  IWAE-K differ by tenths to whole nats) and below the 0.5-nat loosening the
  tests inject.

Unreliable cells: an IWAE cell (or IWAE log p(x)) whose Pareto k-hat exceeds 0.7 on more
than UNRELIABLE_SHARE of its examples, on either side, has a value whose distribution over
seeds is far from normal (rare large weights make rare large jumps), so no z-score of its
Monte Carlo noise means what it says. Such a cell never fails on noise: where its draws
changed (the paired error is more than SAME_DRAWS_RATIO of the Monte Carlo errors) a change
beyond the tolerance is listed as "unreliable" with its z and the advice to raise K or the
replicates, and does not fail; where the run shares the baseline's draws the change is not
noise, and it is judged like any other cell. A failed or non-finite cell always fails.

A cell of the baseline missing from the run fails (a run that skips cells cannot vouch for
them); a cell new in the run is reported (and fails only with --fail-on-new). When a model's
config_hash differs between the two sides the report says "model config changed", since every
cell of that model then shows up as missing on both sides. A failed cell (status "failed") in
the run is a regression: a bound that cannot be computed is not tight.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from scipy import stats

from reports.flags import UNRELIABLE_SHARE  # one rule for the check and the report's weights flag

from .cells import CellKey, cell_key

# Defaults of the tolerance; the module docstring says why each has its value.
DEFAULT_Z = 4.0
DEFAULT_FLOOR_NATS = 0.05
DEFAULT_THROUGHPUT_ALPHA = 0.01  # one-sided level of the Mann-Whitney U test on timing samples
KHAT_SHARE = "khat_share"  # the metric holding a cell's share of examples above k-hat 0.7
# Pairing run and baseline per example needs this many examples (the paired error then has >= 29 degrees of
# freedom: a t tail beyond 4 has probability 5e-4 there, against 6e-5 for the normal; fewer is too heavy).
PAIRED_MIN_EXAMPLES = 30
# Paired error below this fraction of the Monte Carlo errors: the run shares the baseline's draws. New draws
# give a ratio near 1 (0.9-1.1 over 250 examples); shared ones ~1e-5 (the rounding of per_example).
SAME_DRAWS_RATIO = 0.1


@dataclass(frozen=True)
class Settings:
    z: float = DEFAULT_Z
    floor: float = DEFAULT_FLOOR_NATS  # nats per example
    throughput_ratio: float | None = None  # fail when run/baseline throughput falls below it; None: off
    throughput_alpha: float = DEFAULT_THROUGHPUT_ALPHA
    fail_on_new: bool = False


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
    "improvement": True,  # the baseline is stale: rewrite it
    "missing in run": True,
    "new in run": False,  # fails only with --fail-on-new
    "unreliable": False,  # a significant change of a cell whose k-hat says its error is not to be trusted
    "information": False,
}


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def paired_stderr(baseline: dict, run: dict) -> float | None:
    """sd(run_i - baseline_i) / sqrt(n) over the examples both sides keep; None where they do not pair."""
    sides = (baseline.get("per_example"), run.get("per_example"))
    if not all(isinstance(side, list) for side in sides) or len(sides[0]) != len(sides[1]):
        return None
    if len(sides[0]) < PAIRED_MIN_EXAMPLES or not all(map(_finite_number, [*sides[0], *sides[1]])):
        return None
    differences = [r - b for b, r in zip(*sides, strict=True)]
    return statistics.stdev(differences) / math.sqrt(len(differences))


def monte_carlo_scale(baseline: dict, run: dict) -> float | None:
    """sqrt(mc_b^2 + mc_r^2) where both sides have a Monte Carlo error."""
    sides = (baseline.get("mc_stderr"), run.get("mc_stderr"))
    return math.hypot(*sides) if all(map(_finite_number, sides)) else None


def noise_scale(baseline: dict, run: dict) -> tuple[float, str]:
    """The standard error of the change and which one it is (see the module docstring for the order)."""
    paired = paired_stderr(baseline, run)
    if paired is not None:
        return paired, "paired examples"
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


def unreliable_share(baseline: dict, run: dict) -> float | None:
    """The larger share of examples above k-hat 0.7 of the two sides where it exceeds UNRELIABLE_SHARE, else None."""
    shares = [side.get(KHAT_SHARE) for side in (baseline, run)]
    shares = [share for share in shares if isinstance(share, (int, float)) and math.isfinite(share)]
    worst = max(shares, default=None)
    return worst if worst is not None and worst > UNRELIABLE_SHARE else None


def shares_draws(baseline: dict, run: dict) -> bool:
    """Whether the run drew the baseline's weights: a paired error far below the Monte Carlo errors."""
    paired, scale = paired_stderr(baseline, run), monte_carlo_scale(baseline, run)
    return paired is not None and scale is not None and paired <= SAME_DRAWS_RATIO * scale


def _compare_values(baseline: dict, run: dict, settings: Settings, *, bound: bool) -> Finding | None:
    """A move beyond the tolerance: for a bound a regression (down) or an improvement (up), else information;
    a bound whose k-hat marks it unreliable is listed as such and never fails."""
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
    share = unreliable_share(baseline, run)
    if share is not None and not shares_draws(baseline, run):
        return Finding("unreliable", cell_key(run), baseline["value"], run["value"], change, tolerance,
                       f"k-hat > 0.7 on {share:.0%} of examples{z}: not a failure; raise K or replicates")
    return Finding("regression" if change < 0 else "improvement", cell_key(run), baseline["value"], run["value"],
                   change, tolerance, f"tolerance from {source}{z}")


def compare_bound(baseline: dict, run: dict, settings: Settings) -> Finding | None:
    return _compare_values(baseline, run, settings, bound=True)


def compare_information(baseline: dict, run: dict, settings: Settings) -> Finding | None:
    """KL terms: a significant change either way is worth a look, never a failure."""
    return _compare_values(baseline, run, settings, bound=False)


def _timing_samples(side: dict) -> list[float] | None:
    samples = side.get("timing_s")
    if not isinstance(samples, list) or not samples:
        return None
    if not all(isinstance(t, (int, float)) and math.isfinite(t) for t in samples):
        return None
    return [float(t) for t in samples]


def slower_p_value(run_times: list[float], baseline_times: list[float]) -> float:
    """One-sided Mann-Whitney U p-value that the run's timed calls take longer than the baseline's (exact for
    small samples without ties)."""
    return float(stats.mannwhitneyu(run_times, baseline_times, alternative="greater").pvalue)


def compare_throughput(baseline: dict, run: dict, settings: Settings) -> Finding | None:
    """Throughput (only when asked for): a regression when the ratio run/baseline is below settings.throughput_ratio
    and the timing samples are significantly slower (Mann-Whitney U); the ratio alone where either side kept none."""
    key = cell_key(run)
    if _not_finite(run) or baseline["value"] <= 0:
        return Finding("information", key, baseline["value"], run["value"], None, settings.throughput_ratio,
                       "throughput not comparable (non-positive or non-finite)")
    ratio = run["value"] / baseline["value"]
    if ratio >= settings.throughput_ratio:
        return None
    fell = f"throughput fell to {ratio:.2f}x of the baseline (threshold {settings.throughput_ratio:.2f}x)"
    run_times, baseline_times = _timing_samples(run), _timing_samples(baseline)
    if run_times is None or baseline_times is None:
        return Finding("regression", key, baseline["value"], run["value"], ratio, settings.throughput_ratio,
                       f"{fell}; no timing samples to test, the ratio alone decides")
    p_value = slower_p_value(run_times, baseline_times)
    test = (f"Mann-Whitney U p = {p_value:.3g} on {len(run_times)} vs {len(baseline_times)} timings, "
            f"level {settings.throughput_alpha:g}")
    if p_value >= settings.throughput_alpha:
        return Finding("information", key, baseline["value"], run["value"], ratio, settings.throughput_ratio,
                       f"{fell}, not significantly ({test}); not a failure")
    return Finding("regression", key, baseline["value"], run["value"], ratio, settings.throughput_ratio,
                   f"{fell} ({test})")


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
