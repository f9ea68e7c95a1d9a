"""The ranges of the numbers a run takes, judged alike wherever they come from (suite, command line, environment).

Each check returns the problem as text (None when the value is fine), so the suite's
KeyChecker and the command line's argument types word their errors their own way
around one rule.
"""
from __future__ import annotations

import math

# torch.manual_seed takes seeds below 2**64, but a seed is also offset (seed + 1 for the validation draws)
# and stored as a signed 64-bit integer by numpy and JSON readers: keep it a non-negative int64.
SEED_MAX = 2**63 - 1
# A thread count beyond any machine: a typo, not a setting.
THREADS_MAX = 4096


def integer_problem(value: object, minimum: int | None = None, maximum: int | None = None) -> str | None:
    """Why ``value`` is not an integer in [minimum, maximum], or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an integer, got {value!r}"
    if minimum is not None and value < minimum:
        return f"must be an integer >= {minimum}, got {value!r}"
    if maximum is not None and value > maximum:
        low = "" if minimum is None else f"{minimum} <= "
        return f"must be an integer {low}n <= {maximum}, got {value!r}"
    return None


def seed_problem(value: object) -> str | None:
    return integer_problem(value, 0, SEED_MAX)


def threads_problem(value: object) -> str | None:
    return integer_problem(value, 1, THREADS_MAX)


def megabytes_problem(text: str) -> str | None:
    """Why a setting in megabytes (an environment variable's text) is not a finite positive number, or None."""
    try:
        value = float(text)
    except ValueError:
        return f"must be a number of megabytes, got {text!r}"
    if not math.isfinite(value) or value <= 0:
        return f"must be a finite number of megabytes > 0, got {text!r}"
    return None
