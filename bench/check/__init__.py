"""Bound-tightness regression check: `python -m bench check RUN_DIR --baseline FILE`.

Compares every bound of a run (results.jsonl) with a committed baseline, cell by
cell, and exits 1 when a bound moved beyond the noise (looser: a regression;
tighter: the baseline is stale and must be rewritten) or a baseline cell is
missing from the run, 0 otherwise, 2 on bad input (a run of another suite, or
nothing compared). `--write-baseline FILE` turns a clean run into a baseline.

Cells match on (dataset, split, model, config_hash, estimator, k, seed, metric).

cells.py     which run row matches which baseline cell
rules.py     how each metric is compared, and the tolerance of a bound (why z = 4 and 0.05 nats)
compare.py   a run against a baseline: findings
baseline.py  reading runs and baselines, writing a baseline
render.py    the plain-text report
cli.py       the command line
"""
from .baseline import (
    BASELINE_FORMAT,
    BASELINE_FORMAT_VERSION,
    Baseline,
    baseline_from_run,
    check_same_suite,
    read_baseline,
    read_run_rows,
    suite_identity,
    write_baseline,
)
from .cells import KEY_FIELDS, CheckInputError, cell_key, describe_key
from .cli import add_arguments, build_parser, main, run_check
from .compare import CheckResult, compare
from .render import render
from .rules import (
    METRIC_POLICIES,
    Finding,
    Settings,
    compare_bound,
    compare_information,
    compare_throughput,
    policy_of,
    slower_p_value,
)

__all__ = [
    "BASELINE_FORMAT",
    "BASELINE_FORMAT_VERSION",
    "KEY_FIELDS",
    "METRIC_POLICIES",
    "Baseline",
    "CheckInputError",
    "CheckResult",
    "Finding",
    "Settings",
    "add_arguments",
    "baseline_from_run",
    "build_parser",
    "cell_key",
    "check_same_suite",
    "compare",
    "compare_bound",
    "compare_information",
    "compare_throughput",
    "describe_key",
    "main",
    "policy_of",
    "read_baseline",
    "read_run_rows",
    "render",
    "run_check",
    "slower_p_value",
    "suite_identity",
    "write_baseline",
]
