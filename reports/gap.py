"""The paired gap: for every model, its own best log p(x) estimate minus each of its bounds.

The reference of a model config (per seed) is its own best estimate of log p(x), never another
model's and never a bound compared with itself:

* the exact log p(x) where the model has one (log_marginal, method "exact");
* else the IWAE estimate with the most draws per example among its log_marginal (method "iwae")
  and iwae rows: IWAE-K is a lower bound that tightens as K grows, so the largest K is the best
  estimate the run holds. Its own IWAE_K bound is then the reference itself and has no gap;
* annealed importance sampling (method "ais(...)") ranks between the two: like IWAE-K it is a
  stochastic lower bound, but with enough steps it is the tighter one (Wu et al. 2017: 0.85 nats
  above IWAE with 10^5 draws on an MNIST VAE), and a run that holds it asked for it as the
  reference. Among several AIS rows, the one with the most steps (the "draws" ranking below
  counts steps x chains).

The gap to a bound is the mean over examples of d_i = reference_i - bound_i, and its standard
error is paired: sd(d) / sqrt(n). Every cell of one fit is evaluated on the same examples with
draws from the same seed (common random numbers), so reference and bound are strongly
correlated example by example and the paired error is far smaller than either error alone;
it counts both the spread over examples and the Monte Carlo noise of each example's d_i. The
rows keep each example's value (per_example); where a row does not (runs written before
schema 3), the gap's error is the sum of the two standard errors, an upper bound on the error
of a difference whatever its correlation (the note says "unpaired").

ELBO_inf (a continuous-time diffusion's L_inf) bounds the continuous-time model, not the T-step
model its row's trajectories are drawn from: it has no gap here.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from reports.schema import STRUCTURE_FIELDS, method_settings

MODEL_KEYS = ["dataset", "split", "model", "config_hash"]
CONTINUOUS_ELBO = "ELBO_inf"
LOG_MARGINAL_COLUMN = "log p(x)"
# How good a log p(x) estimate is, by method (higher is better); within a rank, more draws (K) is better.
REFERENCE_RANK = {"exact": 3, "ais": 2, "iwae": 1}
PAIRED, UNPAIRED = "paired", "unpaired (sum of standard errors)"
CARRIED = ["label", "config_key", "model_config", "device", *STRUCTURE_FIELDS]


def _reference(cells: pd.DataFrame) -> pd.Series | None:
    """The best log p(x) estimate among one model config's cells of one seed (module docstring), or None."""
    logp = cells[cells["kind"] == "log_marginal"].assign(from_log_marginal=True)
    annealed = cells[cells["kind"] == "ais"].assign(from_log_marginal=False)  # the ais estimator's own column
    iwae = cells[(cells["kind"] == "bound") & (cells["estimator"] == "iwae")].assign(method="iwae",
                                                                                      from_log_marginal=False)
    candidates = pd.concat([logp, annealed, iwae], ignore_index=True)
    family = candidates["method"].apply(lambda text: method_settings(text)[0])  # "ais(steps=...)" -> "ais"
    candidates = candidates[family.isin(REFERENCE_RANK.keys())]
    if candidates.empty:
        return None
    family = family[candidates.index]
    ranked = candidates.assign(rank=family.map(REFERENCE_RANK), draws=_draws(candidates, family))
    # ties (log p(x) as IWAE-K beside the IWAE_K bound: the same estimate) go to the log_marginal row
    ranked = ranked.sort_values(["rank", "draws", "from_log_marginal"], kind="stable")
    return ranked.iloc[-1]


def _draws(candidates: pd.DataFrame, family: pd.Series) -> pd.Series:
    """How much work an estimate holds, to rank estimates of one method: K for IWAE, steps x chains for AIS."""
    settings = candidates["method"].apply(lambda text: method_settings(text)[1])
    ais_work = settings.apply(lambda s: float(s.get("steps", 0)) * float(s.get("chains", 0)))
    return candidates["k"].astype(float).fillna(np.inf).where(family != "ais", ais_work)


def reference_name(reference: pd.Series) -> str:
    method = str(reference["method"])
    if method == "exact":
        return "exact"
    if method.startswith("ais"):
        settings = method_settings(method)[1]
        return f"AIS-{settings.get('steps', '?')}x{settings.get('chains', '?')} from {settings.get('init', '?')}"
    return f"{method.upper()}-{int(reference['k'])}"


def _same_estimate(reference: pd.Series, bound: pd.Series) -> bool:
    """Whether a bound is the reference's own estimate (IWAE_K where the reference is IWAE-K)."""
    return (reference["method"] == "iwae" and bound["estimator"] == "iwae"
            and float(bound["k"]) == float(reference["k"]))


def paired_difference(reference: pd.Series, bound: pd.Series) -> tuple[float, float, int | None, str]:
    """(mean of reference_i - bound_i, its standard error, examples paired, how) for two cells of one fit."""
    mine, theirs = reference.get("per_example"), bound.get("per_example")
    if isinstance(mine, (list, tuple)) and isinstance(theirs, (list, tuple)) and min(len(mine), len(theirs)) >= 2:
        n = min(len(mine), len(theirs))  # both are the first examples of the split
        differences = np.asarray(mine[:n], dtype=float) - np.asarray(theirs[:n], dtype=float)
        return float(differences.mean()), float(differences.std(ddof=1) / np.sqrt(n)), n, PAIRED
    stderr = float(np.nan_to_num(reference["stderr"]) + np.nan_to_num(bound["stderr"]))
    return float(reference["value"] - bound["value"]), stderr, None, UNPAIRED


def per_seed_gaps(matched: pd.DataFrame) -> pd.DataFrame:
    """One gap cell per (model config, seed, bound) from the matched result rows (reports.cells.matched_rows):
    kind "gap", column the bound's column, value and paired stderr, reference ("exact", "IWAE-5000"), the
    column the reference came from, and how the error was found (paired or unpaired)."""
    records = []
    if matched.empty:
        return pd.DataFrame.from_records(records)
    for keys, cells in matched.groupby([*MODEL_KEYS, "seed"], dropna=False, sort=False):
        reference = _reference(cells)
        if reference is None:
            continue
        bounds = cells[(cells["kind"] == "bound") & (cells["column"] != CONTINUOUS_ELBO)]
        # one measurement per bound column: the one with the most draws (as the summary cells keep)
        bounds = bounds.sort_values("k_rank", kind="stable").drop_duplicates("column", keep="last")
        for _, bound in bounds.iterrows():
            if _same_estimate(reference, bound):
                continue
            value, stderr, paired_n, how = paired_difference(reference, bound)
            records.append({
                **dict(zip([*MODEL_KEYS, "seed"], keys, strict=True)), "column": bound["column"], "kind": "gap",
                "value": value, "stderr": stderr, "layer": "", "k": bound["k"], "method": reference["method"],
                "estimator": bound["estimator"], "reference": reference_name(reference),
                "reference_column": LOG_MARGINAL_COLUMN if reference["from_log_marginal"] else reference["column"],
                "pairing": how, "paired_examples": paired_n,
                "suite_label": bound.get("label"), **{name: bound.get(name) for name in CARRIED},
            })
    return pd.DataFrame.from_records(records)
