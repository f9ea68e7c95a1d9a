"""Validation helpers for suite files: each checks one value and names its key path in the error.

"suite smoke.toml: models[2].config.latent_dim must be an integer, got 'a'"
"""
from __future__ import annotations

from collections.abc import Mapping

from bench.run.evaluators import Param

from .choices import UnknownChoice, choose
from .numbers import integer_problem, seed_problem


class SuiteError(ValueError):
    """A suite that cannot run; the message names the suite and the key."""


class KeyChecker:
    """Checks the values of one suite file (``label`` names it in every error)."""

    def __init__(self, label: str):
        self.label = label

    def fail(self, key: str, problem: str) -> SuiteError:
        return SuiteError(f"suite {self.label}: {key} {problem}")

    def choice(self, value: object, key: str, what: str, table: Mapping, verb: str = "names an") -> object:
        """``table[value]`` via bench's one named-choice lookup; the error reads "<key> names an unknown ..."."""
        try:
            return choose(what, value, table)
        except UnknownChoice as exc:
            raise self.fail(key, f"{verb} {exc}") from None

    def table(self, value: object, key: str, allowed: tuple[str, ...] | None) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, got {value!r}")
        if allowed is not None:
            for name in value:
                if name not in allowed:
                    where = f"{key}.{name}" if key else name
                    raise self.fail(where, f"is not a known key; choices: {', '.join(allowed)}")
        return value

    def array_of_tables(self, value: object, key: str) -> list[tuple[str, dict]]:
        """A non-empty [[key]] array as (entry key, entry table) pairs, each entry required to have a name."""
        if not isinstance(value, list) or not value:
            raise self.fail(key, f"must be a non-empty array of tables ([[{key}]])")
        entries = []
        for i, entry in enumerate(value):
            entry_key = f"{key}[{i}]"
            self.table(entry, entry_key, None)
            if "name" not in entry:
                raise self.fail(f"{entry_key}.name", "is missing")
            entries.append((entry_key, entry))
        return entries

    def string(self, value: object, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"must be a non-empty string, got {value!r}")
        return value

    def integer(self, value: object, key: str, minimum: int | None = None, maximum: int | None = None) -> int:
        problem = integer_problem(value, minimum, maximum)
        if problem is not None:
            raise self.fail(key, problem)
        return value

    def seed(self, value: object, key: str) -> int:
        problem = seed_problem(value)
        if problem is not None:
            raise self.fail(key, problem)
        return value

    def positive(self, value: object, key: str) -> int:
        return self.integer(value, key, minimum=1)

    def replicates(self, value: object, key: str) -> int:
        """Independent replicates of an estimate: at least 2, the fewest whose spread gives an error."""
        return self.integer(value, key, minimum=2)

    def non_negative(self, value: object, key: str) -> int:
        return self.integer(value, key, minimum=0)

    def number(self, value: object, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"must be a number, got {value!r}")
        return float(value)

    def boolean(self, value: object, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {value!r}")
        return value

    def array(self, value: object, key: str) -> list:
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, got {value!r}")
        return value

    def names(self, value: object, key: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(key, f"must be a non-empty list of names, got {value!r}")
        names = tuple(self.string(v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(set(names)) != len(names):
            raise self.fail(key, f"lists a name twice: {list(names)}")
        return names

    def k_grid(self, value: object, key: str) -> tuple[int, ...]:
        """An integer K >= 1 or a non-empty list of them: where every K of a run is validated."""
        values = value if isinstance(value, list) else [value]
        if not values:
            raise self.fail(key, "must be an integer >= 1 or a non-empty list of them, got []")
        where = (lambda i: f"{key}[{i}]") if isinstance(value, list) else (lambda i: key)
        return tuple(self.positive(v, where(i)) for i, v in enumerate(values))

    def param(self, value: object, key: str, spec: Param) -> object:
        checkers = {"k-grid": self.k_grid, "k": self.positive, "replicates": self.replicates, "str": self.string,
                    "float": self.number,
                    "setting": lambda v, _: v}  # the estimator's own check judges it (EstimatorKind.check)
        checked = checkers[spec.type](value, key)
        if spec.choices is not None and checked not in spec.choices:
            raise self.fail(key, f"must be one of {', '.join(spec.choices)}, got {value!r}")
        return checked

    def settings(self, value: object, key: str, defaults: dict, types: dict) -> dict:
        given = self.table(value, key, tuple(defaults))
        merged = dict(defaults)
        for name, v in given.items():
            merged[name] = types[name](v, f"{key}.{name}")
        return merged
