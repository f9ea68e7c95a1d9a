"""Unit conversions done only here: nats per example -> bits per dimension, for discrete data.

The number of dimensions D comes from the rows themselves (the model's declared ``data_dim``).
Bits/dim is a code length, so it is given for discrete (Bernoulli-likelihood) data only: for a
density over continuous data it would depend on the units of x. Rows that do not carry their
structure (runs written before rows did) are reported in nats only.
"""
from __future__ import annotations

import math

import pandas as pd

NATS = "nats"
BITS_PER_DIM = "bits/dim"
NLL_NATS = "NLL nats"  # negative log-likelihood per example, beside published numbers
GAP_NATS = "gap nats"  # a model's log p(x) minus its bounds, nats per example (reports.gap)
DISCRETE_LIKELIHOODS = ("bernoulli",)

# How a kind of quantity converts to bits/dim: log-likelihoods (bounds, log p(x)) turn into a
# negative log-likelihood (-value / (D ln 2), lower is better); non-negative quantities in nats
# (gap, KL) keep their sign (value / (D ln 2)); anything else (counts, throughput) is left as is.
BITS_SIGN: dict[str, float] = {"bound": -1.0, "log_marginal": -1.0, "ais": -1.0, "gap": 1.0, "bdmc_gap": 1.0,
                               "kl": 1.0, "kl_total": 1.0}


def bits_per_dim_dims(cells: pd.DataFrame) -> int | None:
    """D of one dataset's cells when those that declare it agree on one D of discrete data; else None (nats only).

    Cells without a declaration (from runs written before rows carried one) neither give nor contradict it.
    """
    declared = cells.loc[cells["data_dim"].notna(), ["data_dim", "likelihood"]].drop_duplicates()
    if len(declared) != 1:
        return None
    data_dim, likelihood = declared.iloc[0]
    return int(data_dim) if likelihood in DISCRETE_LIKELIHOODS else None


def nats_to_bits_per_dim(value: float, stderr: float, dims: int, sign: float) -> tuple[float, float]:
    """(value, stderr) in nats per example -> bits per dimension; sign -1 turns a log-likelihood into an NLL."""
    scale = 1.0 / (dims * math.log(2.0))
    return sign * value * scale, stderr * scale
