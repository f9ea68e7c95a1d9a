"""`python -m bench check RUN_DIR --baseline FILE` (or `--write-baseline FILE`).

Exit status: 0 pass, 1 regression, 2 bad input.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .baseline import REWRITE, check_same_suite, read_baseline, read_run_manifest, read_run_rows, write_baseline
from .cells import CheckInputError, check_utf8_path
from .compare import CheckResult, compare
from .render import render
from .rules import DEFAULT_FLOOR_NATS, DEFAULT_THROUGHPUT_ALPHA, DEFAULT_Z, Settings

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT = 0, 1, 2


def _non_negative(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a ratio in (0, 1], got {text} (e.g. 0.5: fail below half)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m bench check`."""
    parser.add_argument("run_dir", type=Path, help="a run directory (holding results.jsonl and manifest.json)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--baseline", type=Path, metavar="FILE", help="compare the run with this baseline")
    target.add_argument("--write-baseline", type=Path, metavar="FILE", help="write a baseline from the run")
    parser.add_argument("--z", type=_non_negative, default=DEFAULT_Z,
                        help=f"z-score of the tolerance on the combined standard error (default {DEFAULT_Z:g})")
    parser.add_argument("--floor", type=_non_negative, default=DEFAULT_FLOOR_NATS, metavar="NATS",
                        help=f"absolute tolerance added to it, nats per example (default {DEFAULT_FLOOR_NATS:g})")
    parser.add_argument("--throughput-ratio", type=_ratio, default=None, metavar="R",
                        help="fail when throughput falls below R x the baseline (default: off, never fail on time)")
    parser.add_argument("--throughput-alpha", type=_ratio, default=DEFAULT_THROUGHPUT_ALPHA, metavar="P",
                        help="level of the one-sided Mann-Whitney U test on the timing samples that a throughput "
                             f"drop must also pass (default {DEFAULT_THROUGHPUT_ALPHA:g})")
    parser.add_argument("--fail-on-new", action="store_true",
                        help="also fail when the run has cells the baseline lacks (cells of the baseline missing "
                             "from the run always fail)")


def run_check(run_dir: Path, baseline_path: Path, settings: Settings) -> tuple[CheckResult, str]:
    """The comparison and its report; CheckInputError when the run is of another suite or nothing was compared."""
    baseline = read_baseline(baseline_path)
    result = compare(baseline.cells, read_run_rows(run_dir), settings)
    check_same_suite(baseline, read_run_manifest(run_dir), baseline_path)
    if result.compared == 0 and not result.count("regression"):
        raise CheckInputError(f"0 cells compared: the run {run_dir} shares no compared cell with the "
                              f"{len(baseline.cells)} cells of {baseline_path} (another seed, other models, or "
                              f"changed configs?); run the baseline's suite as it was, or rewrite the baseline "
                              f"({REWRITE})")
    return result, render(result, run_dir, baseline_path)


def main(args: argparse.Namespace) -> int:
    """Exit status: 0 pass, 1 regression, 2 bad input."""
    try:
        for what, path in (("RUN_DIR", args.run_dir), ("--baseline", args.baseline),
                           ("--write-baseline", args.write_baseline)):
            if path is not None:
                check_utf8_path(path, what)
        if args.write_baseline is not None:
            count = write_baseline(args.run_dir, args.write_baseline)
            print(f"wrote {count} cells to {args.write_baseline}")
            return EXIT_OK
        settings = Settings(z=args.z, floor=args.floor, throughput_ratio=args.throughput_ratio,
                            throughput_alpha=args.throughput_alpha, fail_on_new=args.fail_on_new)
        result, text = run_check(args.run_dir, args.baseline, settings)
    except CheckInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(text)
    return EXIT_REGRESSION if result.failed else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench check",
                                     description="Compare a run's bounds with a baseline (bound-tightness check).")
    add_arguments(parser)
    return parser
