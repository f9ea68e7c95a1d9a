"""The identity of a cell in a check: which row of a run matches which cell of a baseline."""
from __future__ import annotations

from bench.paths import utf8_problem


class CheckInputError(ValueError):
    """Bad input to the check (a missing or malformed file); reported as one line, exit status 2."""


def check_utf8_path(path: object, what: str) -> None:
    problem = utf8_problem(path)
    if problem is not None:
        raise CheckInputError(f"{what}: {problem}")


# Cells match on these fields (a model is identified by its config_hash, so a changed config is a new cell;
# the method tells apart two entries of one estimator, e.g. AIS from the prior and from q, or log p(x) exact
# against IWAE-K).
KEY_FIELDS = ("dataset", "split", "model", "config_hash", "estimator", "k", "seed", "method", "metric")  # metric last

CellKey = tuple  # values of KEY_FIELDS, in that order


def cell_key(row: dict) -> CellKey:
    return tuple(row.get(name) for name in KEY_FIELDS)


def describe_key(key: CellKey) -> str:
    """A compact, readable name of a cell: dataset/split model[hash] estimator k=.. seed=.. metric [method]."""
    cell = dict(zip(KEY_FIELDS, key, strict=True))
    k = "-" if cell["k"] is None else cell["k"]
    config = str(cell["config_hash"])[:8]
    method = "" if cell["method"] is None else f" [{cell['method']}]"
    return (f"{cell['dataset']}/{cell['split']} {cell['model']}[{config}] {cell['estimator']} "
            f"k={k} seed={cell['seed']} {cell['metric']}{method}")


def sort_key(key: CellKey) -> tuple:
    """None-safe ordering (k is null for exact log p(x)), so baselines and tables are deterministic."""
    return tuple((value is None, type(value).__name__, "" if value is None else value) for value in key)
