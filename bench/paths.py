"""Paths the command line takes: one rule for their names, wherever they are given."""
from __future__ import annotations

from pathlib import Path


def utf8_problem(path: Path | str) -> str | None:
    """Paths go into JSON, logs and reports as text: why a name that is not valid UTF-8 cannot, or None."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return f"the path {str(path).encode('utf-8', 'surrogateescape')!r} is not valid UTF-8; choose a name in UTF-8"
    return None
