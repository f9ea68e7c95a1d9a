"""`python -m bench report DIR [DIR ...] [--format md,html,tex,csv,png] [--out DIR]`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reports.build import DEFAULT_FORMATS, FORMATS, build_report
from reports.errors import ReportError

EXIT_BAD_INPUT = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="DIR", help="run directories holding results.jsonl")
    parser.add_argument("--format", default=",".join(DEFAULT_FORMATS), dest="formats",
                        help=f"comma-separated formats among {','.join(FORMATS)} (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the first DIR's report/)")


def main(args: argparse.Namespace) -> int:
    try:
        written = build_report(args.run_dirs, formats=args.formats.split(","), out_dir=args.out)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for path in written:
        print(path)
    return 0
