"""Collation of results into tables, reports and plots (pandas, numpy, seaborn only; no torch)."""
from reports.build import FORMATS, build_report
from reports.errors import ReportError
from reports.load import failed_rows, load_results, ok_rows
from reports.table import build_tables

__all__ = ["FORMATS", "ReportError", "build_report", "build_tables", "failed_rows", "load_results", "ok_rows"]
