"""The gradient signal-to-noise plot: SNR against K, log-log, per network and gradient estimator, with the
least-squares slope of log SNR on log K (Rainforth et al.'s Theorem 1: -1/2 for the inference network's
reparameterized IWAE gradient, +1/2 for the generative network's).

It reads the result rows of the ``gradient_snr`` estimator (metric ``snr_<network>``, method
``<objective>/<estimator>``) rather than the summary, which holds bounds. Needs the [plot] extra.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

NETWORKS = ("inference", "generative")
SLOPE_FROM_K = 4  # the slope is fitted over K >= 4, the regime the theorem speaks of


def snr_slope(k: np.ndarray, snr: np.ndarray) -> float:
    """Least-squares slope of log SNR on log K over K >= SLOPE_FROM_K (nan with fewer than two such points)."""
    keep = (k >= SLOPE_FROM_K) & (snr > 0)
    if keep.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(k[keep]), np.log(snr[keep]), 1)[0])


def snr_table(results: pd.DataFrame, metric: str = "snr") -> pd.DataFrame:
    """Mean over seeds of ``<metric>_<network>`` per dataset, model label, network, method and K."""
    rows = results[(results["estimator"] == "gradient_snr") & (results["status"] == "ok")]
    rows = rows[rows["metric"].isin([f"{metric}_{network}" for network in NETWORKS])]
    if rows.empty:
        return pd.DataFrame(columns=["dataset", "label", "network", "method", "k", "value"])
    rows = rows.assign(network=rows["metric"].str.removeprefix(f"{metric}_"), k=rows["k"].astype(float))
    return rows.groupby(["dataset", "label", "network", "method", "k"], as_index=False)["value"].mean()


def gradient_snr(results: pd.DataFrame, plt, sns):
    """One panel per (dataset, model, network): SNR against K per gradient estimator, slope in the legend."""
    table = snr_table(results)
    if table.empty:
        return None
    panels = list(table.groupby(["dataset", "label", "network"], sort=True))
    columns = min(len(panels), 2)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.0 * columns, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    methods = sorted(table["method"].unique())
    colors = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    for ax, ((dataset, label, network), cells) in zip(axes.flat, panels):
        for method, line in cells.groupby("method", sort=True):
            line = line.sort_values("k")
            slope = snr_slope(line["k"].to_numpy(), line["value"].to_numpy())
            ax.plot(line["k"], line["value"], marker="o", ms=5, mfc="white", color=colors[method],
                    label=f"{method} (slope {slope:+.2f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{dataset}: {label}, {network} network", fontsize="medium")
        ax.set_xlabel("K (samples per example, log scale)")
        ax.set_ylabel("gradient SNR (mean over parameters)")
        ax.legend(fontsize="small", frameon=False)
    fig.suptitle(f"Gradient signal-to-noise ratio against K (slopes: least squares over K >= {SLOPE_FROM_K})")
    return fig
