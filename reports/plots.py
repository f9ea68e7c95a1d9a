"""seaborn/matplotlib plots of a results summary (reports.cells.summarize), each as PNG bytes.

Needs the [plot] extra; imported lazily so that tables work without it. Every plot is in nats
per example (bounds, gap, KL) or samples per second, with the unit on its axis.
"""
from __future__ import annotations

import importlib
import io
import json
import math
import re
from collections.abc import Callable

import numpy as np
import pandas as pd

from reports.cells import bound_order, natural_sorted, sort_models
from reports.errors import ReportError

PLOT_EXTRA_HINT = "pip install 'elbo-bench[plot]'"
# Above this many layers a KL plot is a profile along t (a VDM), below it a bar per layer.
KL_PROFILE_MIN_LAYERS = 8
PANEL_WIDTH, PANEL_HEIGHT, MAX_COLUMNS = 5.0, 3.8, 3
DEVICE_LINESTYLES = ("-", "--", ":", "-.")
ESTIMATOR_MARKERS = ("s", "o", "^", "D", "v")
NATS_LABEL = "nats per example"


def plotting():
    """(pyplot, seaborn) with the non-interactive Agg backend; ReportError if the [plot] extra is missing."""
    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
        sns = importlib.import_module("seaborn")
    except ImportError as exc:
        raise ReportError(f"png output needs seaborn and matplotlib ({exc}); install them with {PLOT_EXTRA_HINT}") from None
    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def _panels(n: int, plt):
    columns = min(n, MAX_COLUMNS)
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(PANEL_WIDTH * columns, PANEL_HEIGHT * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _palette(labels, sns) -> dict[str, tuple]:
    labels = list(dict.fromkeys(labels))
    return dict(zip(labels, sns.color_palette("tab10" if len(labels) <= 10 else "husl", len(labels))))


def _legend_right(fig, handles, labels, title=None) -> None:
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title=title)


def _unique_handles(fig) -> tuple[list, list]:
    seen = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen.keys())


STEPS_KEY, TIME_KEY, CONTINUOUS = "steps", "time", "continuous"


def _is_continuous(config: dict) -> bool:
    return config.get(TIME_KEY) == CONTINUOUS


def _has_steps(config: dict) -> bool:
    """A diffusion-like model: its config sets the number of steps or continuous time."""
    return STEPS_KEY in config or _is_continuous(config)


def _best_log_marginal(cells: pd.DataFrame) -> tuple[float, str] | None:
    """The exact log p(x) if any, else the highest estimate, with a legend word saying which."""
    logp = cells[cells["kind"] == "log_marginal"]
    if logp.empty:
        return None
    exact = logp[logp["method"] == "exact"]
    if not exact.empty:
        return float(exact["value"].iloc[0]), "exact"
    return float(logp["value"].max()), "estimate"


def bound_vs_k(summary: pd.DataFrame, plt, sns):
    """IWAE_K against K (log axis) per model, the ELBO at K = 1, log p(x) as a dashed line."""
    summary = summary[~summary["model_config"].map(_has_steps)]  # those are in bound_vs_steps
    bounds = summary[summary["kind"] == "bound"]
    if bounds.empty:
        return None
    datasets = sorted(bounds["dataset"].unique())
    fig, axes = _panels(len(datasets), plt)
    colors = _palette([label for label in sort_models(summary) if label in set(bounds["label"])], sns)
    for ax, dataset in zip(axes, datasets):
        mine = summary[summary["dataset"] == dataset]
        for label, color in colors.items():
            cells = mine[mine["label"] == label]
            iwae = cells[(cells["kind"] == "bound") & (cells["estimator"] == "iwae")].assign(K=lambda c: c["k"].astype(float))
            iwae = iwae.sort_values("K")
            if not iwae.empty:
                ax.errorbar(iwae["K"], iwae["value"], yerr=iwae["stderr"].fillna(0), color=color, marker="o",
                            ms=4, capsize=2, label=label)
            elbo = cells[(cells["kind"] == "bound") & (cells["column"] == "ELBO")]
            if not elbo.empty:
                ax.errorbar([1], elbo["value"], yerr=elbo["stderr"].fillna(0), color=color, marker="s", mfc="white",
                            ms=6, capsize=2, linestyle="none", label=label if iwae.empty else None)
            logp = _best_log_marginal(cells)
            if logp is not None:
                ax.axhline(logp[0], color=color, linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_title(dataset)
        ax.set_xlabel("K (importance samples, log scale)")
        ax.set_ylabel(f"bound ({NATS_LABEL})")
    handles, labels = _unique_handles(fig)
    Line2D = importlib.import_module("matplotlib.lines").Line2D
    handles += [Line2D([], [], color="grey", marker="s", mfc="white", linestyle="none"),
                Line2D([], [], color="grey", linestyle="--")]
    labels += ["ELBO (at K = 1)", "log p(x) (exact, else best estimate)"]
    _legend_right(fig, handles, labels, title="model")
    fig.suptitle("Bound vs number of importance samples (diffusion models: see bound_vs_steps)")
    return fig


def _gaps(summary: pd.DataFrame) -> pd.DataFrame:
    """log p(x) - bound for every bound column of every model that has log p(x)."""
    records = []
    for (dataset, label), cells in summary.groupby(["dataset", "label"], sort=False):
        logp = _best_log_marginal(cells)
        if logp is None:
            continue
        lp_stderr = cells.loc[cells["kind"] == "log_marginal", "stderr"].iloc[0]
        for _, bound in cells[cells["kind"] == "bound"].iterrows():
            records.append({"dataset": dataset, "label": label, "bound": bound["column"],
                            "gap": logp[0] - bound["value"], "stderr": float(np.hypot(lp_stderr, bound["stderr"]))})
    return pd.DataFrame.from_records(records)


def gap(summary: pd.DataFrame, plt, sns):
    """Horizontal grouped bars: gap to log p(x) per model (rows) and estimator (colour), a panel per dataset."""
    gaps = _gaps(summary)
    if gaps.empty:
        return None
    datasets = sorted(gaps["dataset"].unique())
    bounds = sorted(gaps["bound"].unique(), key=bound_order)
    order = sort_models(summary)
    heights = [0.8 + 0.14 * gaps.loc[gaps["dataset"] == d, "bound"].nunique() * gaps.loc[gaps["dataset"] == d, "label"].nunique()
               for d in datasets]
    fig, axes = plt.subplots(len(datasets), 1, figsize=(8.0, sum(heights) + 0.8),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    colors = _palette(bounds, sns)
    for ax, dataset in zip(axes[:, 0], datasets):
        mine = gaps[gaps["dataset"] == dataset]
        labels = [label for label in order if label in set(mine["label"])]
        present = [bound for bound in bounds if bound in set(mine["bound"])]
        width = 0.8 / len(present)
        for i, bound in enumerate(present):
            rows = mine[mine["bound"] == bound].set_index("label").reindex(labels)
            y = np.arange(len(labels)) + (i - (len(present) - 1) / 2) * width
            ax.barh(y, rows["gap"], width, xerr=rows["stderr"].fillna(0), color=colors[bound], label=bound,
                    capsize=2, error_kw={"linewidth": 0.8})
        ax.set_yticks(np.arange(len(labels)), labels)
        ax.invert_yaxis()  # first model on top
        ax.set_title(dataset)
        ax.set_xlabel(f"log p(x) - bound ({NATS_LABEL})")
    handles = dict(zip(*reversed(_unique_handles(fig))))
    _legend_right(fig, [handles[b] for b in bounds], bounds, title="bound")
    fig.suptitle("Gap to log p(x) (exact, else best estimate)")
    return fig


def _step_index(layer: str, position: int) -> int:
    """t of a VDM layer name like 'z_12' (its last integer), else its position."""
    numbers = re.findall(r"\d+", layer)
    return int(numbers[-1]) if numbers else position


def kl_layers(summary: pd.DataFrame, plt, sns):
    """KL per layer for models with more than one layer; a profile along t for many layers (VDM)."""
    kl = summary[summary["kind"] == "kl"]
    groups = [(key, cells) for key, cells in kl.groupby(["dataset", "label"], sort=True) if len(cells) > 1]
    if not groups:
        return None
    fig, axes = _panels(len(groups), plt)
    color = sns.color_palette("tab10")[0]
    for ax, ((dataset, label), cells) in zip(axes, groups):
        order = natural_sorted(cells["layer"])
        cells = cells.set_index("layer").loc[order]
        if len(order) >= KL_PROFILE_MIN_LAYERS:
            t = [_step_index(layer, i) for i, layer in enumerate(order, start=1)]
            ax.plot(t, cells["value"], color=color, marker="." if len(t) <= 100 else None)
            ax.fill_between(t, cells["value"] - cells["stderr"].fillna(0), cells["value"] + cells["stderr"].fillna(0),
                            color=color, alpha=0.25, linewidth=0)
            ax.set_xlabel("step t (layer z_t)")
        else:
            ax.bar(range(len(order)), cells["value"], yerr=cells["stderr"].fillna(0), color=color, capsize=3)
            ax.set_xticks(range(len(order)), order)
            ax.set_xlabel("layer")
        ax.set_title(f"{dataset}: {label}", fontsize="medium")
        ax.set_ylabel(f"KL ({NATS_LABEL})")
    fig.suptitle("KL per layer")
    return fig


def throughput(summary: pd.DataFrame, plt, sns):
    """Samples per second against K per estimator (colour) and device (line style), per model."""
    rows = summary[summary["kind"] == "throughput"].copy()
    if rows.empty:
        return None
    rows["K"] = rows["k"].astype(float)
    groups = list(rows.groupby(["dataset", "label"], sort=True))
    fig, axes = _panels(len(groups), plt)
    colors = _palette(sorted(rows["estimator"].unique()), sns)
    styles = dict(zip(sorted(rows["device"].unique()), DEVICE_LINESTYLES * 4))
    markers = dict(zip(sorted(rows["estimator"].unique()), ESTIMATOR_MARKERS * 4))
    for ax, ((dataset, label), cells) in zip(axes, groups):
        for (estimator, device), line in cells.groupby(["estimator", "device"], sort=True):
            line = line.sort_values("K")
            ax.errorbar(line["K"], line["value"], yerr=line["stderr"].fillna(0), color=colors[estimator],
                        linestyle=styles[device], marker=markers[estimator], ms=5, mfc="white", capsize=2, label=f"{estimator}, {device}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{dataset}: {label}", fontsize="medium")
        ax.set_xlabel("K (samples per example, log scale)")
        ax.set_ylabel("throughput (samples/s, log scale)")
    _legend_right(fig, *_unique_handles(fig), title="estimator, device")
    fig.suptitle("Throughput")
    return fig


def _steps_panels(summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Panels of models that have a `steps` key: one per (dataset, model, other config overrides)."""
    stepped = summary[summary["model_config"].map(_has_steps)]
    if stepped.empty or not stepped["model_config"].map(lambda c: STEPS_KEY in c and not _is_continuous(c)).any():
        return []
    rest = stepped["model_config"].map(
        lambda c: json.dumps({k: v for k, v in c.items() if k not in (STEPS_KEY, TIME_KEY)}, sort_keys=True))
    panels = []
    for (dataset, model, other), cells in stepped.assign(rest=rest).groupby(["dataset", "model", "rest"], sort=True):
        extra = ", ".join(f"{k}={v}" for k, v in json.loads(other).items())
        panels.append((f"{dataset}: {model}" + (f" ({extra})" if extra else ""), cells))
    return panels


def bound_vs_steps(summary: pd.DataFrame, plt, sns):
    """Bound against the number of steps T (log axis), with log p(x) and the continuous-time value."""
    panels = _steps_panels(summary)
    if not panels:
        return None
    fig, axes = _panels(len(panels), plt)
    bounds = sorted(summary.loc[summary["kind"] == "bound", "column"].unique(), key=bound_order)
    colors = _palette(bounds, sns)
    for ax, (title, cells) in zip(axes, panels):
        continuous = cells["model_config"].map(_is_continuous)
        discrete = cells[~continuous & (cells["kind"] == "bound")].copy()
        discrete["T"] = discrete["model_config"].map(lambda c: c[STEPS_KEY])
        for bound, line in discrete.groupby("column", sort=False):
            line = line.sort_values("T")
            ax.errorbar(line["T"], line["value"], yerr=line["stderr"].fillna(0), color=colors[bound], marker="o",
                        ms=4, capsize=2, label=f"{bound} (discrete T)")
        for _, ref in cells[continuous & (cells["kind"] == "bound")].iterrows():
            ax.axhline(ref["value"], color=colors[ref["column"]], linestyle=":", linewidth=1.5,
                       label=f"{ref['column']} (continuous time)")
        logp = _best_log_marginal(cells)
        if logp is not None:
            ax.axhline(logp[0], color="black", linestyle="--", linewidth=1, label=f"log p(x) ({logp[1]})")
        ax.set_xscale("log")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("steps T (log scale)")
        ax.set_ylabel(f"bound ({NATS_LABEL})")
    _legend_right(fig, *_unique_handles(fig))
    fig.suptitle("Bound vs number of diffusion steps")
    return fig


# file stem -> plot function; a function returns None when the results hold nothing to plot
PLOTS: dict[str, Callable] = {
    "bound_vs_k": bound_vs_k,
    "gap": gap,
    "kl_layers": kl_layers,
    "throughput": throughput,
    "bound_vs_steps": bound_vs_steps,
}


def render_plots(summary: pd.DataFrame) -> dict[str, bytes]:
    """{plot name: PNG bytes} for every plot the summary has data for."""
    plt, sns = plotting()
    images = {}
    for name, plot in PLOTS.items():
        fig = plot(summary, plt, sns)
        if fig is None:
            continue
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        images[name] = buffer.getvalue()
    return images
