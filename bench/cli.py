"""The command line: `python -m bench list | run | report | check` (run: bench.run_command).

Bad input (unknown names, K < 1, a malformed suite, CUDA asked for but absent,
missing data, an output directory holding another run) gives one line on
stderr and exit status 2, and is found before any run directory is created.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .plan.suite import available_suites
from .run.evaluators import estimator_descriptions
from .run_command import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, add_run_arguments, run_command


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


# --- list -------------------------------------------------------------------------------------------

def _model_listing() -> dict[str, str]:
    import vaes

    return vaes.model_descriptions()


def _dataset_listing() -> dict[str, str]:
    from .data import dataset_descriptions

    return dataset_descriptions()


LISTINGS = {
    "models": _model_listing,
    "datasets": _dataset_listing,
    "estimators": estimator_descriptions,
    "suites": available_suites,
}


def _list(args: argparse.Namespace) -> int:
    sections = [args.what] if args.what else list(LISTINGS)
    for section in sections:
        entries = LISTINGS[section]()
        if len(sections) > 1:
            print(f"{section}:")
        width = max(map(len, entries), default=0)
        indent = "  " if len(sections) > 1 else ""
        for name, description in entries.items():
            print(f"{indent}{name:<{width}}  {description}")
    return EXIT_OK


# --- report and check: delegated to their own modules -------------------------------------------

DELEGATED = {
    "report": ("reports.cli", "build tables and plots from run directories"),
    "check": ("bench.check", "compare a run's bounds with a baseline (bound-tightness regression check)"),
}


def _add_delegated(subparsers, name: str) -> None:
    module_name, help_text = DELEGATED[name]
    sub = subparsers.add_parser(name, help=help_text, description=help_text)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # Keep --help and the other commands working; using this one says why it is unavailable.
        error = f"the {name} command is unavailable: {exc}"
        sub.add_argument("rest", nargs=argparse.REMAINDER)
        sub.set_defaults(handler=lambda args, argv: _unavailable(error))
        return
    module.add_arguments(sub)
    sub.set_defaults(handler=lambda args, argv: module.main(args))


def _unavailable(error: str) -> int:
    print(f"bench: error: {error}", file=sys.stderr)
    return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m bench", description="Benchmark variational bounds: ELBO, IWAE-K, KL terms, "
                                                          "log p(x) and their cost, across registered models.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    listing = subparsers.add_parser("list", help="what is registered: models, datasets, estimators, suites")
    listing.add_argument("what", nargs="?", choices=list(LISTINGS))
    listing.set_defaults(handler=lambda args, argv: _list(args))
    run = subparsers.add_parser("run", help="run a suite's matrix into a run directory")
    add_run_arguments(run)
    run.set_defaults(handler=run_command)
    for name in DELEGATED:
        _add_delegated(subparsers, name)
    return parser


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("bench").setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # a refused argument (its one line is printed) or --help: the status, returned
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    _configure_logging(getattr(args, "quiet", False))
    try:
        return args.handler(args, argv)
    except KeyboardInterrupt:  # before a run directory exists (a run in progress says how to resume it)
        print("bench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
