"""Trust flags: why a model's row should not be taken at face value, computed from the result rows.

A flag belongs to one model config (dataset, model, config_hash) and says what is wrong, with the number
that shows it:

* "weights": its importance weights are unreliable. The Pareto k-hat of an example's weights above 0.7
  means their variance is effectively infinite and an IWAE or log p(x) estimate of that example cannot be
  trusted (Vehtari et al., "Pareto smoothed importance sampling"); flagged when more than UNRELIABLE_SHARE of
  the examples are above it (row khat_share; the rule `bench check` uses for an unreliable cell), or when
  K > 1 draws are worth about one (ESS below ESS_ABOUT_ONE).
* "below uniform": a bound under -D log 2 on D binary dimensions, below what a model that gives every
  binary image the same probability scores: the model is worse than no model.
* "not converged": the validation ELBO of the training curve (rows valid_elbo/<step>) still rises at its end:
  training as long again at the rate of its last interval would gain more than CONVERGED_NATS. (A share of
  the whole rise would miss a model that started thousands of nats off and still gains 2 nats a step window.)
* "failed": some measurement of the model raised an error or gave no finite number (status failed). A skipped
  cell (status skipped: the estimator does not apply to the model, e.g. active units of a model without posterior
  means) is no reason for distrust and raises no flag; the tables show it as a dash (reports.render).
"""
from __future__ import annotations

import math

import pandas as pd

from reports.load import failed_rows, ok_rows

CONFIG_KEYS = ["dataset", "model", "config_hash"]
RELIABLE_KHAT = 0.7
# A cell with k-hat > 0.7 on more than this share of its examples is unreliable: with a fifth of the examples'
# weights in the infinite-variance regime, those examples carry most of the cell's Monte Carlo variance, and the
# normal approximation behind its error bar no longer holds. At K = 5000 a few heavy-tailed examples are common
# in every trained model; a share that small does not make the cell's mean untrustworthy.
UNRELIABLE_SHARE = 0.2
ESS_ABOUT_ONE = 1.5  # of K >= 2 draws: fewer than one and a half draws effectively count
CURVE_METRIC = "valid_elbo/"
CONVERGED_NATS = 1.0  # of the projected gain over as many steps again
# Flags whose numbers make a row's values meaningless at the scale of the others (a bound below the uniform model,
# weights worth one draw): such rows never set an axis. A k-hat share alone marks a row but leaves its values
# plotted at their scale (at K = 5000 a few heavy-tailed examples are common, and every row would lose its axis).
SEVERE = ("below uniform", "ESS ")
FLAG_COLUMNS = [*CONFIG_KEYS, "flag", "detail"]
FAILED = "failed"  # the row status, and the flag's name


def _weights(ok: pd.DataFrame) -> list[dict]:
    flags = []
    share = ok[ok["metric"] == "khat_share"]
    for keys, rows in share.groupby(CONFIG_KEYS, sort=False):
        worst = rows.loc[rows["value"].idxmax()]
        if worst["value"] > UNRELIABLE_SHARE:
            flags.append({**dict(zip(CONFIG_KEYS, keys)), "flag": "weights",
                          "detail": f"k-hat > {RELIABLE_KHAT} on {worst['value']:.0%} of examples "
                                    f"({worst['estimator']}, K={int(worst['k'])})"})
    ess = ok[(ok["metric"] == "ess") & (ok["k"].astype(float) >= 2)]
    for keys, rows in ess.groupby(CONFIG_KEYS, sort=False):
        worst = rows.loc[rows["value"].idxmin()]
        if worst["value"] < ESS_ABOUT_ONE:
            flags.append({**dict(zip(CONFIG_KEYS, keys)), "flag": "weights",
                          "detail": f"ESS {worst['value']:.2f} of K={int(worst['k'])} ({worst['estimator']})"})
    return flags


def _below_uniform(summary: pd.DataFrame) -> list[dict]:
    flags = []
    if summary.empty:
        return flags
    bounds = summary[(summary["kind"] == "bound") & (summary["likelihood"] == "bernoulli")
                     & summary["data_dim"].notna()]
    for keys, rows in bounds.groupby(CONFIG_KEYS, sort=False):
        uniform = -float(rows["data_dim"].iloc[0]) * math.log(2)
        best = rows.loc[rows["value"].idxmax()]
        if best["value"] < uniform:
            flags.append({**dict(zip(CONFIG_KEYS, keys)), "flag": "below uniform",
                          "detail": f"{best['column']} {best['value']:.1f} < uniform {uniform:.1f} nats "
                                    f"(D={int(rows['data_dim'].iloc[0])} binary dims)"})
    return flags


def _not_converged(ok: pd.DataFrame) -> list[dict]:
    flags = []
    curve = ok[(ok["estimator"] == "train") & ok["metric"].str.startswith(CURVE_METRIC)]
    curve = curve.assign(step=pd.to_numeric(curve["metric"].str.slice(len(CURVE_METRIC)), errors="coerce"))
    for (*keys, _seed), rows in curve.dropna(subset=["step"]).groupby([*CONFIG_KEYS, "seed"], sort=False):
        rows = rows.drop_duplicates("step", keep="last").sort_values("step")
        if len(rows) < 2:
            continue
        values, steps = rows["value"].to_numpy(), rows["step"].to_numpy()
        last = values[-1] - values[-2]
        if last * steps[-1] / (steps[-1] - steps[-2]) > CONVERGED_NATS:
            flags.append({**dict(zip(CONFIG_KEYS, keys)), "flag": "not converged",
                          "detail": f"validation ELBO rose {last:.2f} nats over the last {int(steps[-1] - steps[-2])} "
                                    f"of {int(steps[-1])} steps"})
    return flags


def _failed(results: pd.DataFrame) -> list[dict]:
    bad = failed_rows(results)
    bad = bad[bad["status"] == FAILED]
    return [{**dict(zip(CONFIG_KEYS, keys)), "flag": FAILED,
             "detail": f"{rows['cell_id'].nunique()} cell(s) failed: "
                       + ", ".join(sorted(set(rows["estimator"].astype(str))))}
            for keys, rows in bad.groupby(CONFIG_KEYS, sort=False)]


def trust_flags(results: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Every flag of every model config: columns dataset, model, config_hash, flag, detail (one flag of a
    kind per config; the first found is kept)."""
    ok = ok_rows(results)
    ok = ok[ok["value"].notna()]
    records = [*_weights(ok), *_below_uniform(summary), *_not_converged(ok), *_failed(results)]
    flags = pd.DataFrame.from_records(records, columns=FLAG_COLUMNS)
    return flags.drop_duplicates([*CONFIG_KEYS, "flag"]).reset_index(drop=True)


def flags_by_label(flags: pd.DataFrame, summary: pd.DataFrame) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(dataset, row label) -> [(flag, detail), ...], with the labels the tables and plots use."""
    if summary.empty or flags.empty:
        return {}
    labels = summary.drop_duplicates(CONFIG_KEYS).set_index(CONFIG_KEYS)["label"]
    out: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for _, flag in flags.iterrows():
        key = (flag["dataset"], flag["model"], flag["config_hash"])
        if key in labels.index:
            out.setdefault((flag["dataset"], labels[key]), []).append((flag["flag"], flag["detail"]))
    return out


def _severe(flag: str, detail: str) -> bool:
    return flag in SEVERE or any(detail.startswith(prefix) for prefix in SEVERE)


def axis_labels(summary: pd.DataFrame, flagged: dict[tuple[str, str], list[tuple[str, str]]],
                dataset: str) -> set[str]:
    """The labels of one dataset whose values may set a plot's axes: those without a SEVERE flag; all where that
    leaves none."""
    labels = set(summary.loc[summary["dataset"] == dataset, "label"])
    kept = {label for label in labels if not any(_severe(f, d) for f, d in flagged.get((dataset, label), []))}
    return kept or labels
