"""seaborn/matplotlib plots of a results summary (reports.cells.summarize), each as PNG bytes.

Needs the [plot] extra; imported lazily so that tables work without it. Every plot is in nats
per example (bounds, gap, KL) or samples per second, with the unit on its axis.

"As one step becomes many": every model config gets a place on one axis, read from the structure
the model declared in its rows (reports import no model code): a diffusion model's T (its steps
in discrete time; for a continuous-time model, the T of the trajectories it was evaluated over),
any other model's L (its latent layers). Configs of one model that differ only in that place form
a *series* (one line), ordered VAE -> HVAE -> diffusion.
"""
from __future__ import annotations

import importlib
import io
import json
import math
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from reports.cells import CONTINUOUS_ELBO, bound_order, natural_sorted, sort_models
from reports.errors import ReportError
from reports.gradient_plots import gradient_snr

PLOT_EXTRA_HINT = "pip install 'elbo-bench[plot]'"
PANEL_WIDTH, PANEL_HEIGHT, MAX_COLUMNS = 5.0, 3.8, 3
DEVICE_LINESTYLES = ("-", "--", ":", "-.")
ESTIMATOR_MARKERS = ("s", "o", "^", "D", "v")
NATS_LABEL = "nats per example"
GAP_COLUMNS = 2


def plotting():
    """(pyplot, seaborn) with the non-interactive Agg backend; ReportError if the [plot] extra is missing."""
    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
        sns = importlib.import_module("seaborn")
    except ImportError as exc:
        raise ReportError(f"png output needs seaborn and matplotlib ({exc}); "
                          f"install them with {PLOT_EXTRA_HINT}") from None
    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def _panels(n: int, plt, width: float = PANEL_WIDTH, height: float = PANEL_HEIGHT, share: bool = False):
    columns = min(n, MAX_COLUMNS)
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False,
                             sharex=share, sharey=share)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def stable_color(label: str, sns) -> tuple:
    """One fixed colour per label in every plot of every report: a stable hash of the label into tab20
    (Python's hash() is salted per process; crc32 is not)."""
    colors = sns.color_palette("tab10") + sns.color_palette("tab20")[1::2]
    return colors[zlib.crc32(str(label).encode()) % len(colors)]


def _palette(labels, sns) -> dict[str, tuple]:
    """Each label's stable colour; where two labels of one plot hash to one colour, the later one (in the
    order given) takes the next free colour of the palette."""
    colors = sns.color_palette("tab10") + sns.color_palette("tab20")[1::2]
    palette, taken = {}, set()
    for label in dict.fromkeys(labels):
        index = colors.index(stable_color(label, sns))
        while index in taken and len(taken) < len(colors):
            index = (index + 1) % len(colors)
        taken.add(index)
        palette[label] = colors[index]
    return palette


def _axis_values(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells whose values may set an axis: those of rows without a trust flag (reports.flags), where
    render_plots marked them; all cells otherwise."""
    if "sets_axis" not in cells.columns or not cells["sets_axis"].any():
        return cells
    return cells[cells["sets_axis"]]


def _fit_ylim(ax, values: pd.Series, stderrs: pd.Series | None = None) -> None:
    """A linear y range around these values (with their error bars) and a 8% margin."""
    values = values.astype(float)
    errors = stderrs.astype(float).fillna(0) if stderrs is not None else 0
    low, high = float((values - errors).min()), float((values + errors).max())
    if not (math.isfinite(low) and math.isfinite(high)):
        return
    pad = max(0.08 * (high - low), 0.05)
    ax.set_ylim(low - pad, high + pad)


def _legend_right(fig, handles, labels, title=None) -> None:
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title=title)


def _unique_handles(fig) -> tuple[list, list]:
    seen = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen.keys())


@dataclass(frozen=True)
class NotDrawn:
    """A plot left out on purpose, with the reason the report gives in its place."""
    reason: str


@dataclass
class Figures:
    """The rendered plots: name -> format -> bytes; and the plots not drawn, name -> reason."""
    files: dict[str, dict[str, bytes]]
    not_drawn: dict[str, str]


MIN_PLACES = 2  # bound_vs_steps: a series needs bounds at this many values of T or L to draw a line


# Families in the order the gap plot lists them: one stochastic layer -> a hierarchy of L -> a diffusion of T steps.
ONE_LAYER, HIERARCHY, DIFFUSION = 0, 1, 2
AXIS_NAME = {ONE_LAYER: "L", HIERARCHY: "L", DIFFUSION: "T"}
LOG_P_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.2}
CONTINUOUS_STYLE = {"linestyle": "-.", "linewidth": 1.3}
# Bounds span from ~1e7 nats off (one diffusion step) to ~0.01: a symmetric log axis, linear within 1 nat.
SYMLOG_NATS = {"linthresh": 1.0, "linscale": 0.5}
SYMLOG_MIN_DECADES = 1.5  # a narrower range reads better on a linear axis (a symlog one would show one tick)
ZOOM_DECADES = 0.7  # the zoomed panel under a symlog one: from the top down this many decades (-1.7 -> ~-9)
CONFIG_KEYS = ["dataset", "model", "config_hash"]


def is_diffusion(rows: pd.DataFrame) -> pd.Series:
    """Rows of a diffusion model, as the model declares it: diffusion steps T, or continuous time."""
    return rows["diffusion_steps"].notna() | rows["continuous_time"].eq(True)


def _axis_value(config: pd.Series, kl_layers: int) -> float:
    """T of a diffusion (its steps; in continuous time the T of the trajectories evaluated), L of any
    other model (its latent layers; the KL layers measured where the rows do not say); NaN if unknown."""
    if config["diffusion"]:
        steps = config["diffusion_steps"]
        if pd.isna(steps):
            steps = config["latent_layers"] - 1 if pd.notna(config["latent_layers"]) else np.nan
        return float(steps)
    if pd.notna(config["latent_layers"]):
        return float(config["latent_layers"])
    return float(kl_layers) if kl_layers else np.nan


def _axis_keys(group: pd.DataFrame) -> set[str]:
    """Config keys that follow the place on the axis within one kind of model: they vary across its
    configs, and configs at the same x agree on them (``steps`` of a VDM, ``n_layers`` and the
    per-layer sizes of a hierarchy). Configs that differ only in these form one series."""
    xs = ["nan" if np.isnan(x) else x for x in group["x"]]
    if len(set(xs)) < 2:
        return set()
    configs = list(group["model_config"])
    axis = set()
    for key in {key for config in configs for key in config}:
        values = [repr(config.get(key)) for config in configs]
        at_x: dict = {}
        if len(set(values)) > 1 and all(at_x.setdefault(x, v) == v for x, v in zip(xs, values, strict=True)):
            axis.add(key)
    return axis


def placed(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with each config's family (ONE_LAYER, HIERARCHY or DIFFUSION), axis value x (T or L,
    NaN if unknown) and series name. A family counts as a hierarchy when one of its configs has L > 1."""
    configs = summary.drop_duplicates(CONFIG_KEYS)[[*CONFIG_KEYS, "model_config", "family", "latent_layers",
                                                     "diffusion_steps", "continuous_time"]].copy()
    configs = configs.rename(columns={"family": "declared_family"})
    configs["diffusion"] = is_diffusion(configs)
    kl = summary[summary["kind"] == "kl"].groupby(CONFIG_KEYS)["layer"].nunique()
    configs["x"] = [_axis_value(config, int(kl.get(tuple(config[CONFIG_KEYS]), 0))) for _, config in configs.iterrows()]
    # A kind of model: its declared family (the model name where rows do not say), and continuous time or not.
    kinds = [configs["dataset"], configs["declared_family"].fillna(configs["model"]),
             configs["continuous_time"].eq(True)]
    deep = configs.groupby(kinds)["x"].transform("max") > 1
    configs["family"] = np.where(configs["diffusion"], DIFFUSION, np.where(deep, HIERARCHY, ONE_LAYER))
    series_keys = pd.Series("", index=configs.index)
    for _, group in configs.groupby([*kinds, configs["model"]], sort=False):
        axis = _axis_keys(group)
        for index, config in zip(group.index, group["model_config"], strict=True):
            series_keys[index] = json.dumps({k: v for k, v in config.items() if k not in axis}, sort_keys=True,
                                            default=str)
    configs["series_key"] = series_keys
    names = []
    for _, row in configs.iterrows():
        mine = configs[(configs["dataset"] == row["dataset"]) & (configs["model"] == row["model"])]
        keys = [json.loads(k) for k in mine["series_key"].unique()]
        varying = sorted({k for d in keys for k in d if len({repr(e.get(k)) for e in keys}) > 1})
        own = json.loads(row["series_key"])
        extra = ", ".join(f"{k}={own[k]}" for k in varying if k in own)
        names.append(f"{row['model']} ({extra})" if extra else row["model"])
    configs["series"] = names
    configs["x"] = configs["x"].astype(float)
    # "family" becomes the place in the gap plot's order (ONE_LAYER, HIERARCHY, DIFFUSION).
    return summary.drop(columns="family").merge(configs[[*CONFIG_KEYS, "x", "family", "series"]], on=CONFIG_KEYS,
                                                how="left")


def _point_name(series: str, family: int, x: float) -> str:
    if family == ONE_LAYER:
        return series
    return f"{series} {AXIS_NAME[family]}={'?' if np.isnan(x) else f'{x:g}'}"


def _reference_log_marginal(cells: pd.DataFrame) -> tuple[float, float, str] | None:
    """The dataset's log p(x): an exact value if any model has one, else the highest estimate; with its origin."""
    logp = cells[cells["kind"] == "log_marginal"]
    if logp.empty:
        return None
    exact = logp[logp["method"] == "exact"]
    best = exact.iloc[0] if not exact.empty else logp.loc[logp["value"].idxmax()]
    if best["method"] == "exact":
        how = "exact"
    else:
        k = f"-{int(best['k'])}" if pd.notna(best["k"]) else ""
        how = f"best estimate: {best['label']}, {str(best['method']).upper()}{k}"
    return float(best["value"]), float(np.nan_to_num(best["stderr"])), how


def _best_log_marginal(cells: pd.DataFrame) -> tuple[float, str] | None:
    """The exact log p(x) if any, else the highest estimate, with a legend word saying which."""
    reference = _reference_log_marginal(cells)
    return None if reference is None else (reference[0], "exact" if reference[2] == "exact" else "estimate")


def bound_vs_k(summary: pd.DataFrame, plt, sns):
    """IWAE_K against K (log axis) per model, the ELBO at K = 1, log p(x) as a dashed line."""
    summary = summary[~is_diffusion(summary)]  # diffusion models: see bound_vs_steps
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
            iwae = cells[(cells["kind"] == "bound") & (cells["estimator"] == "iwae")]
            iwae = iwae.assign(K=lambda c: c["k"].astype(float))
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
        shown = mine[mine["kind"].isin(["bound", "log_marginal"]) & mine["label"].isin(colors)]
        if len(_axis_values(shown)) < len(shown):  # flagged rows are drawn but do not set the axis
            _fit_ylim(ax, _axis_values(shown)["value"], _axis_values(shown)["stderr"])
        ax.set_title(dataset)
        ax.set_xlabel("K (importance samples, log scale)")
        ax.set_ylabel(f"bound ({NATS_LABEL})")
    handles, labels = _unique_handles(fig)
    Line2D = importlib.import_module("matplotlib.lines").Line2D
    handles += [Line2D([], [], color="grey", marker="s", mfc="white", linestyle="none"),
                Line2D([], [], color="grey", linestyle="--")]
    labels += ["ELBO (at K = 1)", "log p(x) (exact, else best estimate)"]
    _legend_right(fig, handles, labels, title="model")
    fig.suptitle("How much does each bound tighten with more importance samples K? "
                 "(diffusion models: see bound_vs_steps; flagged rows do not set the axes)")
    return fig


def _to_symlog(value: float) -> float:
    """About where matplotlib's symlog axis puts a value, in decades (linear within linthresh)."""
    return float(np.sign(value) * np.log10(1 + abs(value) / SYMLOG_NATS["linthresh"]))


def _from_symlog(position: float) -> float:
    return float(np.sign(position) * SYMLOG_NATS["linthresh"] * (10 ** abs(position) - 1))


def _symlog_span(low: float, high: float) -> float:
    return _to_symlog(high) - _to_symlog(low)


def _symlog_limits(low: float, high: float) -> tuple[float, float]:
    """5% margins in symlog space (matplotlib's own margins would reach far past zero)."""
    pad = max(0.05 * _symlog_span(low, high), 0.05)
    return _from_symlog(_to_symlog(low) - pad), _from_symlog(_to_symlog(high) + pad)


def _bound_styles(columns) -> dict[str, dict]:
    """Line styles by bound: the ELBO solid, the largest-K IWAE dotted; other K are left to bound_vs_k."""
    iwae = sorted((c for c in columns if c.startswith("IWAE_")), key=bound_order)
    styles = {"ELBO": {"linestyle": "-", "marker": "o", "mfc": None}}
    if iwae:
        styles[iwae[-1]] = {"linestyle": ":", "marker": "^", "mfc": "white"}
    return styles


def _series_order(points: pd.DataFrame) -> list[str]:
    order = points.drop_duplicates("series").sort_values(["family", "series"])
    return list(order["series"])


def _style_legend(styles: dict[str, dict], continuous: bool, logp: str | None):
    Line2D = importlib.import_module("matplotlib.lines").Line2D
    handles = [Line2D([], [], color="grey", linestyle=s["linestyle"], marker=s["marker"], mfc=s["mfc"] or "grey")
               for s in styles.values()]
    labels = [f"{name} ({'T-step trajectories' if name == 'ELBO' else 'largest K'})" for name in styles]
    if continuous:
        handles.append(Line2D([], [], color="grey", **CONTINUOUS_STYLE))
        labels.append("ELBO_inf: continuous time (T = inf)")
    if logp:
        handles.append(Line2D([], [], **LOG_P_STYLE))
        labels.append("log p(x)")
    return handles, labels


def _draw_steps_panel(ax, bounds: pd.DataFrame, colors: dict, styles: dict, reference) -> bool:
    """One dataset's series on ax; True when a continuous-time ELBO_inf line was drawn."""
    has_continuous = False
    for series in _series_order(bounds):
        cells = bounds[bounds["series"] == series]
        color = colors[series]
        one_layer = cells["family"].iloc[0] == ONE_LAYER  # a point at L = 1, drawn larger and on top
        for column, style in styles.items():
            line = cells[(cells["column"] == column) & cells["x"].notna()].sort_values("x")
            if not line.empty:
                ax.errorbar(line["x"], line["value"], yerr=line["stderr"].fillna(0), color=color,
                            linestyle=style["linestyle"], marker="s" if one_layer else style["marker"],
                            mfc=style["mfc"] or color, ms=8 if one_layer else 5, capsize=2,
                            zorder=3 if one_layer else 2)
            unplaced = cells[(cells["column"] == column) & cells["x"].isna()]
            for value in unplaced["value"]:  # a continuous-time model whose trajectory T was not recorded
                ax.axhline(value, color=color, linestyle=style["linestyle"], linewidth=1)
        limit = cells[cells["column"] == CONTINUOUS_ELBO]
        if not limit.empty:  # the same L_inf on every T row of a continuous-time model
            ax.axhline(float(limit["value"].mean()), color=color, **CONTINUOUS_STYLE)
            has_continuous = True
    if reference is not None:
        ax.axhline(reference[0], **LOG_P_STYLE)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("diffusion steps T  /  hierarchy layers L (log scale)")
    return has_continuous


def bound_vs_steps(summary: pd.DataFrame, plt, sns):
    """Bound against T (diffusion steps) and L (hierarchy layers) on one log axis, a column per dataset.

    Colour: the series (a model whose configs differ only in T or L); style: the bound (ELBO, the
    largest-K IWAE, the continuous-time ELBO_inf as a horizontal line); log p(x) dashed black. A range
    of many decades gets a symlog axis and, below it, the same panel zoomed (linear) on its top decade.

    Only datasets where some series has bounds at MIN_PLACES or more places on the axis get a panel (a model at
    one T or L is drawn there as a reference point); with none, the plot is not drawn and NotDrawn says why: a
    few isolated points answer nothing about steps, and bound_vs_k and gap show those bounds.
    """
    points = placed(summary)
    stepped = points["family"] == DIFFUSION
    if not stepped.any() and not (points["x"] >= 2).any():
        return None
    bounds = points[(points["kind"] == "bound") & points["x"].notna()]
    places = bounds.groupby(["dataset", "series"])["x"].nunique()
    datasets = sorted({dataset for (dataset, _), n in places.items() if n >= MIN_PLACES})
    if not datasets:
        alone = bounds[bounds["family"] != ONE_LAYER].drop_duplicates(["dataset", "series", "x"])
        names = sorted({_point_name(p["series"], p["family"], p["x"]) for _, p in alone.iterrows()})
        return NotDrawn(f"no model of these runs has bounds at {MIN_PLACES} or more diffusion steps T or hierarchy "
                        f"layers L (each sits at one place: {', '.join(names)}), so no line could show a bound "
                        "changing with T or L. bound_vs_k and gap show these bounds; the steps suite varies T and L.")
    series_order = _series_order(points[points["dataset"].isin(datasets)])
    colors = _palette(series_order, sns)
    styles = _bound_styles(points.loc[points["kind"] == "bound", "column"].unique())
    panels = []
    for dataset in datasets:
        mine = points[points["dataset"] == dataset]
        bounds = mine[mine["kind"] == "bound"]
        reference = _reference_log_marginal(mine)
        shown = [*_axis_values(bounds[bounds["column"].isin([*styles, CONTINUOUS_ELBO])])["value"],
                 *([reference[0]] if reference else [])]
        panels.append((dataset, bounds, reference, min(shown), max(shown)))
    zoomed = [_symlog_span(low, high) > SYMLOG_MIN_DECADES for *_, low, high in panels]
    rows = 2 if any(zoomed) else 1
    fig, axes = plt.subplots(rows, len(panels), figsize=(6.5 * len(panels), 4.6 * rows), squeeze=False)
    has_continuous = False
    for column, ((dataset, bounds, reference, low, high), wide) in enumerate(zip(panels, zoomed)):
        ax = axes[0, column]
        has_continuous |= _draw_steps_panel(ax, bounds, colors, styles, reference)
        title = dataset if reference is None else f"{dataset}\nlog p(x) = {reference[0]:.3g} ({reference[2]})"
        ax.set_title(title, fontsize="medium")
        ax.set_ylabel(f"bound ({NATS_LABEL}, {'symlog' if wide else 'linear'} scale)")
        if wide:
            ax.set_yscale("symlog", **SYMLOG_NATS)
            ax.set_ylim(_symlog_limits(low, high))
        else:  # the range of the rows that may set it (a row below the uniform model is drawn off the axis)
            pad = max(0.08 * (high - low), 0.05)
            ax.set_ylim(low - pad, high + pad)
        if rows == 1:
            continue
        zoom = axes[1, column]
        if not wide:
            zoom.set_visible(False)
            continue
        _draw_steps_panel(zoom, bounds, colors, styles, reference)
        top = _from_symlog(_to_symlog(high) + 0.03)
        bottom = _from_symlog(_to_symlog(high) - ZOOM_DECADES)
        zoom.set_ylim(bottom, top)
        zoom.set_title(f"{dataset}, zoomed on the top {ZOOM_DECADES:g} decades", fontsize="medium")
        zoom.set_ylabel(f"bound ({NATS_LABEL}, linear scale)")
    Line2D = importlib.import_module("matplotlib.lines").Line2D
    shown_series = [s for s in series_order if s in set(points.loc[points["dataset"].isin(datasets), "series"])]
    series_handles = [Line2D([], [], color=colors[s], linewidth=6) for s in shown_series]
    style_handles, style_labels = _style_legend(styles, has_continuous,
                                                "log p(x)" if any(p[2] for p in panels) else None)
    if (points.loc[points["dataset"].isin(datasets) & (points["kind"] == "bound"), "family"] == ONE_LAYER).any():
        style_handles.append(Line2D([], [], color="grey", marker="s", ms=8, linestyle="none"))
        style_labels.append("one-layer model (at L = 1)")
    blank = Line2D([], [], linestyle="none")
    _legend_right(fig, [*series_handles, blank, *style_handles], [*shown_series, "", *style_labels],
                  title="series (colour), bound (style)")
    fig.suptitle("Does the bound improve with more steps? A diffusion's T and a hierarchy's L on one axis")
    return fig


def _gap_rows(points: pd.DataFrame) -> pd.DataFrame:
    """One bar group per config that has a gap (reports.gap): every bound's paired gap to the config's own log p(x)."""
    gaps = points[points["kind"] == "gap"]
    records = [{"row": f"{_point_name(cell['series'], cell['family'], cell['x'])} [{cell['reference']}]",
                "bound": cell["column"], "family": cell["family"], "series": cell["series"], "x": cell["x"],
                "gap": cell["value"], "gap_stderr": cell["stderr"]} for _, cell in gaps.iterrows()]
    rows = pd.DataFrame.from_records(records)
    if rows.empty:
        return rows
    return rows.sort_values(["family", "series", "x"], na_position="last", kind="stable")


def gap(summary: pd.DataFrame, plt, sns):
    """Each config's own log p(x) minus each of its bounds, VAE -> HVAE by L -> diffusion by T, a panel per dataset.

    The quantity of the report's gap table (reports.gap): the reference is the config's own exact log p(x),
    else its own best estimate (named in brackets after the config), never another model's; error bars are
    the paired standard errors. So a bar is the variational gap of that bound on that model.
    """
    points = placed(summary)
    panels = []
    for dataset in sorted(points["dataset"].unique()):
        rows = _gap_rows(points[points["dataset"] == dataset])
        if not rows.empty:
            panels.append((dataset, rows))
    if not panels:
        return None
    heights = [0.6 + 0.3 * rows["row"].nunique() for _, rows in panels]
    # at most GAP_COLUMNS panels side by side, so the figure stays readable at a page's width
    columns = min(len(panels), GAP_COLUMNS)
    fig, axes = plt.subplots(math.ceil(len(panels) / columns), columns,
                             figsize=(6.5 * columns, (max(heights) + 1.2) * math.ceil(len(panels) / columns)),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    bounds = sorted({b for _, rows in panels for b in rows["bound"]}, key=bound_order)
    colors = _palette(bounds, sns)
    for ax, (dataset, rows) in zip(axes.flat, panels):
        names = list(dict.fromkeys(rows["row"]))
        present = [b for b in bounds if b in set(rows["bound"])]
        width = 0.8 / len(present)
        for i, bound in enumerate(present):
            mine = rows[rows["bound"] == bound].drop_duplicates("row").set_index("row").reindex(names)
            y = np.arange(len(names)) + (i - (len(present) - 1) / 2) * width
            ax.barh(y, mine["gap"], width, xerr=mine["gap_stderr"].fillna(0), color=colors[bound], label=bound,
                    capsize=2, error_kw={"linewidth": 0.8})
        ax.set_yticks(np.arange(len(names)), names, fontsize="small")
        ax.set_ylim(len(names) - 0.5, -0.5)  # first row on top
        ax.set_xscale("symlog", linthresh=0.1, linscale=0.5)
        # A gap below 0 is an estimate's noise (or a reference that is itself a bound); the axis shows it.
        ax.set_xlim(left=min(0.0, float(rows["gap"].min()) * 1.5))
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(dataset, fontsize="medium")
        ax.set_xlabel(f"own log p(x) - bound ({NATS_LABEL}, symlog scale)\nbars: +- paired standard error")
    handles = dict(zip(*reversed(_unique_handles(fig))))
    _legend_right(fig, [handles[b] for b in bounds if b in handles], [b for b in bounds if b in handles],
                  title="bound")
    fig.suptitle("How far is each bound below the model's own log p(x) [reference]?")
    return fig


def _step_position(layer: str, position: int) -> int:
    """t index of a diffusion layer name like 'z12' (its last integer), else its position."""
    numbers = re.findall(r"\d+", layer)
    return int(numbers[-1]) if numbers else position


def _kl_profile(ax, cells: pd.DataFrame, sns) -> int | None:
    """One line per T: the KL of the step t -> t - 1/T, times T (nats per unit time), at the step's middle.

    The layer with the highest index is the top one, z_1 ~ q(z_1 | x) (its KL is the prior term, not a step):
    left out. T x KL makes the lines of different T comparable: they tend to the continuous-time
    integrand as T grows.
    """
    colors = importlib.import_module("matplotlib.colors")
    cm = importlib.import_module("matplotlib.cm")
    profiles = []
    for _, mine in cells.groupby("config_hash", sort=False):
        index = np.array([_step_position(layer, i) for i, layer in enumerate(mine["layer"])])
        top = int(index.max())
        steps = mine[index < top].assign(i=index[index < top]).sort_values("i")
        if not steps.empty:
            profiles.append((top, steps))
    if not profiles:
        return None
    norm = colors.LogNorm(min(t for t, _ in profiles), max(max(t for t, _ in profiles), 2))
    for top, steps in sorted(profiles, key=lambda item: item[0]):
        t = (steps["i"] + 0.5) / top
        per_time = steps["value"] * top
        positive = per_time > 0  # a Monte Carlo KL near 0 can come out negative: not drawable on a log axis
        ax.plot(t[positive], per_time[positive], color=cm.viridis(norm(top)), marker="." if top <= 32 else None)
    ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.set_xlabel("time t of the step (t = 0: data)")
    ax.set_ylabel("T x KL of the step (nats per unit t)")
    ticks = sorted({top for top, _ in profiles})
    if len(ticks) == 1:  # one T: said in the panel's title (kl_layers), no colorbar
        return ticks[0]
    bar = ax.figure.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, pad=0.02)
    bar.ax.minorticks_off()
    bar.set_ticks(ticks, labels=[str(t) for t in ticks])
    bar.set_label("trajectory steps T (log scale)")
    return None


def _kl_depth(ax, cells: pd.DataFrame, sns) -> None:
    """One line per config: KL of each layer against its depth (1 = next to the data)."""
    configs = cells.drop_duplicates("config_hash").sort_values("x", na_position="last")
    shades = sns.color_palette("viridis", len(configs))
    width = 0.8 / len(configs)
    most = 0
    for i, (color, (_, config)) in enumerate(zip(shades, configs.iterrows())):
        mine = cells[cells["config_hash"] == config["config_hash"]]
        order = natural_sorted(mine["layer"])
        mine = mine.set_index("layer").loc[order]
        depth = np.arange(1, len(order) + 1) + (i - (len(configs) - 1) / 2) * width  # a bar per layer: categories
        ax.bar(depth, mine["value"], width, yerr=mine["stderr"].fillna(0), color=color, capsize=2,
               label=_point_name(config["series"], config["family"], config["x"]))
        most = max(most, len(order))
    ax.set_xticks(np.arange(1, most + 1), [f"layer {layer}" for layer in range(1, most + 1)])
    ax.set_xlabel("layer l (1: next to the data)")
    ax.set_ylabel(f"KL ({NATS_LABEL})")
    ax.legend(fontsize="x-small")


def kl_layers(summary: pd.DataFrame, plt, sns):
    """KL per stochastic layer, a panel per (dataset, series): the per-step profile along t for a diffusion
    (one line per T), KL against depth for a hierarchy (one line per L). Series with one layer are left out."""
    points = placed(summary)
    kl = points[points["kind"] == "kl"]
    groups = [(key, cells) for key, cells in kl.groupby(["dataset", "series"], sort=True)
              if cells.groupby("config_hash")["layer"].nunique().max() > 1]
    if not groups:
        return None
    groups.sort(key=lambda item: (item[0][0], item[1]["family"].iloc[0], item[0][1]))
    fig, axes = _panels(len(groups), plt)
    for ax, ((dataset, series), cells) in zip(axes, groups):
        if cells["family"].iloc[0] == DIFFUSION:
            single = _kl_profile(ax, cells, sns)
            ax.set_title(f"{dataset}: {series}, KL per step" + (f" (T = {single})" if single else ""),
                         fontsize="medium")
        else:
            _kl_depth(ax, cells, sns)
            ax.set_title(f"{dataset}: {series}, KL per layer", fontsize="medium")
    fig.suptitle("Where does the KL go? Per diffusion step along t (top layer z_1 left out), per hierarchy layer")
    return fig


def _median_and_iqr(line: pd.DataFrame) -> tuple[pd.Series, list[pd.Series]]:
    """The points and (lower, upper) bar lengths of throughput cells: the median of the timed calls and their
    interquartile range (reports.cells.throughput_quartiles); where the rows hold no timed calls, the cell's value
    and its standard error over seeds."""
    centre = line["q2"].fillna(line["value"])
    fallback = line["stderr"].fillna(0)
    below = (centre - line["q1"]).where(line["q1"].notna(), fallback)
    above = (line["q3"] - centre).where(line["q3"].notna(), fallback)
    return centre, [below, above]


def throughput(summary: pd.DataFrame, plt, sns):
    """Samples per second against K per estimator (colour) and device (line style), per model: the median of the
    timed calls with their interquartile range as bars, every panel on one shared scale."""
    rows = summary[summary["kind"] == "throughput"].copy()
    if rows.empty:
        return None
    rows["K"] = rows["k"].astype(float)
    groups = list(rows.groupby(["dataset", "label"], sort=True))
    fig, axes = _panels(len(groups), plt, share=True)  # one scale for all: panels compare by eye
    colors = _palette(sorted(rows["estimator"].unique()), sns)
    styles = dict(zip(sorted(rows["device"].unique()), DEVICE_LINESTYLES * 4))
    markers = dict(zip(sorted(rows["estimator"].unique()), ESTIMATOR_MARKERS * 4))
    for ax, ((dataset, label), cells) in zip(axes, groups):
        for (estimator, device), line in cells.groupby(["estimator", "device"], sort=True):
            line = line.sort_values("K")
            ax.errorbar(line["K"], *_median_and_iqr(line), color=colors[estimator],
                        linestyle=styles[device], marker=markers[estimator], ms=4, mfc="white", capsize=4,
                        label=f"{estimator}, {device}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        # On a log axis of decades a spread of a few percent hides behind the marker: the title says how wide.
        spread = ((cells["q3"] - cells["q1"]) / cells["q2"]).max()
        said = f"\nIQR up to {spread:.0%} of the median" if pd.notna(spread) else ""
        ax.set_title(f"{dataset}: {label}{said}", fontsize="medium")
        ax.set_xlabel("K (samples per example, log scale)")
        ax.set_ylabel("throughput (samples/s, log scale)")
    _legend_right(fig, *_unique_handles(fig), title="estimator, device")
    fig.suptitle("How many samples per second does each estimator draw, as K grows? (median of the timed calls, "
                 "bars: interquartile range; all panels on one scale)")
    return fig


# file stem -> plot function; a function returns None when the results hold nothing to plot
PLOTS: dict[str, Callable] = {
    "bound_vs_k": bound_vs_k,
    "gap": gap,
    "kl_layers": kl_layers,
    "throughput": throughput,
    "bound_vs_steps": bound_vs_steps,
}


# file stem -> plot function of the result rows themselves (quantities the summary does not hold)
ROW_PLOTS: dict[str, Callable] = {
    "gradient_snr": gradient_snr,
}


def render_plots(summary: pd.DataFrame, results: pd.DataFrame | None = None) -> dict[str, bytes]:
    """{plot name: PNG bytes} for every plot the summary (and the result rows, where given) has data for."""
    return {name: files["png"] for name, files in render_figures(summary, results).files.items()}


def render_figures(summary: pd.DataFrame, results: pd.DataFrame | None = None,
                   formats: tuple[str, ...] = ("png",)) -> Figures:
    """Every plot the summary (and the result rows) has data for, as {format: bytes}: PNG for pages, SVG beside
    it for print; and the reason for each plot left out on purpose (NotDrawn). Rows with a trust flag
    (reports.flags) are drawn but do not set axes."""
    plt, sns = plotting()
    if results is not None and not summary.empty:
        from reports.flags import axis_labels, flags_by_label, trust_flags
        flagged = flags_by_label(trust_flags(results, summary), summary)
        allowed = {(d, label) for d in summary["dataset"].unique() for label in axis_labels(summary, flagged, d)}
        summary = summary.assign(sets_axis=[key in allowed for key in zip(summary["dataset"], summary["label"])])
    figures = [(name, plot(summary, plt, sns)) for name, plot in PLOTS.items()]
    if results is not None:
        figures += [(name, plot(results, plt, sns)) for name, plot in ROW_PLOTS.items()]
    images, not_drawn = {}, {}
    for name, fig in figures:
        if isinstance(fig, NotDrawn):
            not_drawn[name] = fig.reason
            continue
        if fig is None:
            continue
        fig.tight_layout()
        images[name] = {}
        for fmt in formats:
            buffer = io.BytesIO()
            fig.savefig(buffer, format=fmt, dpi=110, bbox_inches="tight")
            images[name][fmt] = buffer.getvalue()
        plt.close(fig)
    return Figures(images, not_drawn)
