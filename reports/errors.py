"""The one error type of reports/: bad input (no results, unknown format, unreadable run directory)."""
from __future__ import annotations


class ReportError(ValueError):
    """Bad input to the report builder; the message names the problem and the choices."""
