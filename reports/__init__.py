"""Collation of results into tables, reports and plots (pandas, numpy, seaborn only; no torch)."""
