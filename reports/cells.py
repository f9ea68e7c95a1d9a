"""From result rows to summary cells: one quantity (a table column) of one model config,
first per seed, then combined over seeds.

Combining seeds (documented formula). For a quantity measured with S seeds, seed s giving the
mean m_s over the n examples of the split with standard error se_s (std/sqrt(n)):

    mean   = (1/S) * sum_s m_s
    stderr = sqrt( (1/S) * sum_s se_s^2  +  var_s(m) / S )

The first term is the pooled example error (the root mean square of the per-seed stderrs). It is
not divided by S because every seed is evaluated on the same test examples, so averaging seeds
does not average away which examples were drawn. The second term is the standard error of the
mean over seeds, from the spread of the seed means (sample variance, ddof=1; zero when S = 1),
which carries the training and Monte Carlo variation between seeds. Missing per-seed stderrs
(n < 2, or throughput) count as zero in the first term; with S = 1 and no stderr the result has
no stderr (NaN).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from reports.gap import per_seed_gaps
from reports.load import ok_rows
from reports.schema import STRUCTURE_FIELDS, method_settings

BOUND_ESTIMATORS = ("elbo", "iwae")
MODEL_KEYS = ["dataset", "split", "model", "config_hash"]
EXACT = "exact"
# A diffusion model's loss-based ELBO (bench estimator diffusion_elbo): L_inf for a continuous-time model, which
# no trajectory estimate gives, and L_T (the ELBO column's value, with less noise) for a discrete one.
CONTINUOUS_ELBO, LOSS_ELBO = "ELBO_inf", "ELBO_loss"


def _bound_column(rows: pd.DataFrame) -> pd.Series:
    """The table column of an ELBO or IWAE row: ELBO, or IWAE_<K>."""
    iwae = "IWAE_" + rows["k"].astype(str)
    return iwae.where(rows["estimator"] == "iwae", "ELBO")


def _diffusion_elbo_column(rows: pd.DataFrame) -> pd.Series:
    continuous = rows["continuous_time"].eq(True)  # as the model declares it (None: unknown, not continuous)
    return pd.Series(np.where(continuous, CONTINUOUS_ELBO, LOSS_ELBO), index=rows.index)


def sampler_settings(method: object) -> str:
    """The settings of an AIS or BDMC row, short: "200x16 L10 sigmoid prior" (steps x chains, leapfrog steps,
    schedule, start). Each distinct setting is its own column, so different settings are never averaged."""
    _, settings = method_settings(method)
    return (f"{settings.get('steps')}x{settings.get('chains')} L{settings.get('leapfrog')} "
            f"{settings.get('schedule')} {settings.get('init')}")


def _sampler_column(prefix: str) -> Callable[[pd.DataFrame], pd.Series]:
    return lambda r: prefix + " " + r["method"].map(sampler_settings)


def _layer(rows: pd.DataFrame) -> pd.Series:
    """The layer named after the '/' of a metric ('kl/z_1' -> 'z_1'); '' without one."""
    return rows["metric"].str.partition("/")[2]


@dataclass(frozen=True)
class Quantity:
    """How one kind of summary cell is found among the result rows and which column it fills."""
    match: Callable[[pd.DataFrame], pd.Series]
    column: Callable[[pd.DataFrame], pd.Series]


QUANTITIES: dict[str, Quantity] = {
    "bound": Quantity(
        match=lambda r: ((r["estimator"] == "elbo") & (r["metric"] == "elbo"))
        | ((r["estimator"] == "iwae") & (r["metric"] == "iwae"))
        | ((r["estimator"] == "diffusion_elbo") & (r["metric"] == "diffusion_elbo")),
        column=lambda r: _bound_column(r).where(r["estimator"] != "diffusion_elbo", _diffusion_elbo_column(r)),
    ),
    "log_marginal": Quantity(
        match=lambda r: (r["estimator"] == "log_marginal") & (r["metric"] == "log_marginal"),
        column=lambda r: pd.Series("log p(x)", index=r.index),
    ),
    # AIS's log p(x) (a stochastic lower bound) and the BDMC sandwich, a column per setting
    "ais": Quantity(
        match=lambda r: (r["estimator"] == "ais") & (r["metric"] == "log_marginal"),
        column=_sampler_column("AIS"),
    ),
    **{f"bdmc_{side}": Quantity(
        match=lambda r, side=side: (r["estimator"] == "bdmc") & (r["metric"] == f"bdmc_{side}"),
        column=_sampler_column(f"BDMC {side}"),
    ) for side in ("lower", "upper", "gap")},
    "kl": Quantity(
        match=lambda r: (r["estimator"] == "kl_terms") & r["metric"].str.startswith("kl/"),
        column=lambda r: "KL " + _layer(r),
    ),
    # the total over layers as measured (its stderr from the per-example sums)
    "kl_total": Quantity(
        match=lambda r: (r["estimator"] == "kl_terms") & (r["metric"] == "kl"),
        column=lambda r: pd.Series("KL total", index=r.index),
    ),
    "active_units": Quantity(
        match=lambda r: (r["estimator"] == "active_units")
        & ((r["metric"] == "active_units") | r["metric"].str.startswith("active_units/")),
        column=lambda r: ("AU " + _layer(r)).str.strip(),
    ),
    # throughput of a bound on a device: column "<bound column>@<device>"
    "throughput": Quantity(
        match=lambda r: (r["metric"] == "throughput") & r["estimator"].isin(BOUND_ESTIMATORS),
        column=lambda r: _bound_column(r) + "@" + r["device"].astype(str),
    ),
}


def matched_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The ok rows that fill a summary cell, each with its kind, column, layer, suite_label, is_exact and k_rank."""
    rows = ok_rows(df)
    rows = rows[rows["value"].notna()]
    pieces = []
    for kind, quantity in QUANTITIES.items():
        matched = rows[quantity.match(rows).fillna(False).astype(bool)].copy()
        if matched.empty:
            continue
        matched["kind"] = kind
        matched["column"] = quantity.column(matched)
        matched["layer"] = _layer(matched)
        pieces.append(matched)
    if not pieces:
        return pd.DataFrame()
    cells = pd.concat(pieces, ignore_index=True)
    cells["suite_label"] = cells["label"] if "label" in cells.columns else None  # the suite entry's label
    cells["is_exact"] = cells["method"] == EXACT
    cells["k_rank"] = cells["k"].astype(float).fillna(np.inf)  # exact values have no k
    return cells


def per_seed_cells(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model config, seed, column) from the ok rows, with its kind and layer.

    Where one quantity was measured several ways for one seed, the best measurement is kept:
    an exact value over an estimate, then the largest k (more samples, same quantity: ELBO with
    more samples, log p(x) with larger K). Repeats at the same k (several run directories or
    devices) are averaged.
    """
    cells = matched_rows(df)
    if cells.empty:
        return pd.DataFrame(columns=[*MODEL_KEYS, "seed", "column", "kind", "value", "stderr"])
    keys = [*MODEL_KEYS, "seed", "column"]
    cells = cells.sort_values([*keys, "is_exact", "k_rank"])
    best = cells.groupby(keys, dropna=False)[["is_exact", "k_rank"]].transform("last")
    cells = cells[(cells["is_exact"] == best["is_exact"]) & (cells["k_rank"] == best["k_rank"])]
    return (
        cells.groupby(keys, dropna=False, sort=False)
        .agg(
            value=("value", "mean"),
            stderr=("stderr", lambda s: float(np.sqrt(np.mean(np.square(s)))) if s.notna().any() else np.nan),
            kind=("kind", "first"), layer=("layer", "first"), k=("k", "first"), method=("method", "first"),
            estimator=("estimator", "first"), device=("device", "first"), n_examples=("n_examples", "first"),
            config_key=("config_key", "first"), model_config=("model_config", "first"),
            suite_label=("suite_label", "first"),
            **{name: (name, "first") for name in STRUCTURE_FIELDS},
        )
        .reset_index()
    )


def throughput_quartiles(cells: pd.DataFrame) -> pd.DataFrame:
    """Per (model config, throughput column): the quartiles q1, q2, q3 of the throughput of every timed call,
    all seeds and repeats pooled. A row's timing_s holds the seconds of each timed call and its wall_s their
    median, at which its value (samples/s) was taken: a call drew value x wall_s samples, so took that many
    samples / its seconds. Rows without timing_s (written before rows carried it) give no quartiles."""
    timed = cells[(cells["kind"] == "throughput") & cells["timing_s"].map(lambda t: isinstance(t, list) and len(t) > 0)
                  & cells["wall_s"].notna()]
    columns = [*MODEL_KEYS, "kind", "column", "q1", "q2", "q3"]
    if timed.empty:
        return pd.DataFrame(columns=columns)
    per_call = timed.assign(rate=[value * wall / np.asarray(times, dtype=float) for value, wall, times
                                  in zip(timed["value"], timed["wall_s"], timed["timing_s"], strict=True)])
    records = []
    for keys, group in per_call.groupby([*MODEL_KEYS, "kind", "column"], dropna=False, sort=False):
        q1, q2, q3 = np.percentile(np.concatenate(list(group["rate"])), [25, 50, 75])
        records.append({**dict(zip([*MODEL_KEYS, "kind", "column"], keys)), "q1": q1, "q2": q2, "q3": q3})
    return pd.DataFrame.from_records(records, columns=columns)


def combine_seeds(values: np.ndarray, stderrs: np.ndarray) -> tuple[float, float]:
    """(mean, stderr) over seeds by the formula in this module's docstring."""
    values = np.asarray(values, dtype=float)
    stderrs = np.asarray(stderrs, dtype=float)
    n_seeds = len(values)
    mean = float(values.mean())
    has_stderr = bool(np.isfinite(stderrs).any())
    if n_seeds == 1 and not has_stderr:
        return mean, float("nan")
    pooled = float(np.mean(np.nan_to_num(stderrs, nan=0.0) ** 2))
    spread = float(values.var(ddof=1)) / n_seeds if n_seeds > 1 else 0.0
    return mean, float(np.sqrt(pooled + spread))


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model config, kind, column): mean and stderr over seeds, n_seeds, and the model's label.

    Besides the measured quantities it holds the model's paired gaps (kind "gap", reports.gap), whose
    column is the bound each gap is taken to, combined over seeds like any other cell. Throughput cells carry
    q1, q2, q3: the quartiles of their timed calls (throughput_quartiles).
    """
    per_seed = per_seed_cells(df)
    if per_seed.empty:
        return per_seed.assign(n_seeds=pd.Series(dtype=int), label=pd.Series(dtype=str))
    matched = matched_rows(df)
    gaps = per_seed_gaps(matched)
    per_seed = pd.concat([per_seed, gaps], ignore_index=True) if not gaps.empty else per_seed
    groups = per_seed.groupby([*MODEL_KEYS, "kind", "column"], dropna=False, sort=False)
    records = []
    for _, group in groups:
        mean, stderr = combine_seeds(group["value"].to_numpy(), group["stderr"].to_numpy())
        first = group.iloc[0]
        records.append({**first.drop(["seed", "value", "stderr"]).to_dict(),
                        "value": mean, "stderr": stderr, "n_seeds": group["seed"].nunique()})
    summary = pd.DataFrame.from_records(records)
    # throughput cells carry the quartiles of their timed calls (the plot's spread); other cells NaN
    summary = summary.merge(throughput_quartiles(matched), on=[*MODEL_KEYS, "kind", "column"], how="left")
    summary[["q1", "q2", "q3"]] = summary[["q1", "q2", "q3"]].astype(float)
    labels = model_labels(summary)
    derived = [labels[key] for key in zip(summary["dataset"], summary["model"], summary["config_hash"])]
    # A label the suite gave (one other than the model name) names the row; else the derived one.
    named = summary["suite_label"].notna() & (summary["suite_label"] != summary["model"])
    summary["label"] = summary["suite_label"].where(named, pd.Series(derived, index=summary.index))
    return _distinct_labels(summary).drop(columns="suite_label")


def _distinct_labels(summary: pd.DataFrame) -> pd.DataFrame:
    """One label names one model config per dataset: where a label names several (runs whose suites gave one
    label to different models or configs), each gets its model name, then its config hash, after the label."""
    configs = summary.drop_duplicates(["dataset", *MODEL_KEYS[2:], "label"])
    shared = configs.groupby(["dataset", "label"])["config_hash"].transform("size") > 1
    if not shared.any():
        return summary
    renamed = {}
    for (dataset, label), group in configs[shared].groupby(["dataset", "label"], sort=False):
        by_model = group["model"].nunique() == len(group)
        for _, config in group.iterrows():
            suffix = config["model"] if by_model else f"{config['model']} {str(config['config_hash'])[:8]}"
            renamed[(dataset, config["model"], config["config_hash"], label)] = f"{label} ({suffix})"
    keys = zip(summary["dataset"], summary["model"], summary["config_hash"], summary["label"])
    summary["label"] = [renamed.get(key, key[3]) for key in keys]
    return summary


def _natural_key(value: object) -> tuple:
    """Sort key that orders numbers numerically and 'z_2' before 'z_10'."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(value)))


def _value_sort_key(value: object) -> tuple:
    """Lists by length, then element by element (per-layer sizes: 1 layer before 2 before 8)."""
    if isinstance(value, (list, tuple)):
        return (len(value), tuple(_value_sort_key(v) for v in value))
    return _natural_key(value)


def _config_sort_key(config: dict) -> tuple:
    return tuple((key, _value_sort_key(config[key])) for key in sorted(config))


def _short_value(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def model_labels(summary: pd.DataFrame) -> dict[tuple[str, str, str], str]:
    """(dataset, model, config_hash) -> row label: the model name, plus the config overrides that
    differ between its configs when one dataset has several configs of that model."""
    labels = {}
    configs = summary.drop_duplicates(["dataset", "model", "config_hash"])
    for (dataset, model), group in configs.groupby(["dataset", "model"], sort=False):
        if len(group) == 1:
            labels[(dataset, model, group["config_hash"].iloc[0])] = model
            continue
        dicts = list(group["model_config"])
        keys = sorted({key for config in dicts for key in config})
        varying = [key for key in keys if len({repr(config.get(key)) for config in dicts}) > 1]
        for config_hash, config in zip(group["config_hash"], dicts):
            parts = [f"{key}={_short_value(config[key])}" for key in varying if key in config]
            labels[(dataset, model, config_hash)] = f"{model} ({', '.join(parts) if parts else 'default'})"
        if len({labels[(dataset, model, h)] for h in group["config_hash"]}) < len(group):
            for config_hash in group["config_hash"]:  # labels collide: fall back to the hash
                labels[(dataset, model, config_hash)] = f"{model} ({str(config_hash)[:8]})"
    return labels


def sort_models(summary: pd.DataFrame) -> list[str]:
    """Row labels in a stable order: by model name, then by config values (numbers numerically)."""
    configs = summary.drop_duplicates("label")
    order = sorted(zip(configs["model"], configs["model_config"], configs["label"]),
                   key=lambda item: (item[0], _config_sort_key(item[1])))
    return [label for _, _, label in order]


def natural_sorted(values) -> list:
    return sorted(values, key=_natural_key)


def bound_order(column: str) -> tuple[int, int]:
    """ELBO first, then the diffusion loss's ELBO_loss and ELBO_inf, then IWAE_K by K."""
    if column.startswith("IWAE_"):
        return 3, int(column.partition("_")[2])
    return {"ELBO": 0, LOSS_ELBO: 1, CONTINUOUS_ELBO: 2}.get(column, 3), 0
