"""The one named-choice lookup of bench: a name in a table, or one line naming the choices."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


class UnknownChoice(ValueError):
    """A name that is not among the choices; the message lists them."""


def choose(what: str, name: str, table: Mapping[str, T]) -> T:
    """``table[name]``, or UnknownChoice: "unknown <what> '<name>'; choices: a, b, c" (the table's order)."""
    try:
        return table[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name from a malformed file
        raise UnknownChoice(f"unknown {what} {name!r}; choices: {', '.join(table)}") from None
