"""Cell text: mean +- stderr, with as many decimals as the stderr justifies."""
from __future__ import annotations

import math

import pandas as pd

# Decimals when a cell has no stderr to size them (per unit system, or per kind).
DEFAULT_DECIMALS = {"nats": 2, "bits/dim": 4, "NLL nats": 2, "gap nats": 2}
KIND_DECIMALS = {"seeds": 0, "active_units": 0, "throughput": 0}
MAX_DECIMALS = 6


def decimals_for(stderr: float, default: int) -> int:
    """Two significant digits of the stderr (0.045 -> 3 decimals; 1234 -> 0)."""
    if not math.isfinite(stderr) or stderr <= 0:
        return default
    return min(max(1 - math.floor(math.log10(stderr)), 0), MAX_DECIMALS)


def cell_parts(cell: pd.Series, unit: str) -> tuple[str, str | None]:
    """(value text, stderr text or None) of one table cell."""
    default = KIND_DECIMALS.get(cell["kind"], DEFAULT_DECIMALS[unit])
    digits = decimals_for(cell["stderr"], default)
    value = f"{cell['value']:.{digits}f}"
    stderr = f"{cell['stderr']:.{digits}f}" if math.isfinite(cell["stderr"]) else None
    return value, stderr


def plain_text(cell: pd.Series, unit: str, plus_minus: str = "±") -> str:
    value, stderr = cell_parts(cell, unit)
    return value if stderr is None else f"{value} {plus_minus} {stderr}"
