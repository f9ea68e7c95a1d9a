"""`python -m bench run`: its flags, their checks, and a run from the suite's plan to the report.

Bad input is found before any run directory is created and reported in one line (exit 2); a run
whose cells partly failed exits 1 after finishing every other cell; Ctrl-C ends the workers, prints
the command that finishes the run, and exits 130.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import shlex
import sys
from pathlib import Path

from .paths import utf8_problem
from .plan.keys import SuiteError
from .plan.numbers import THREADS_MAX, integer_problem, seed_problem, threads_problem
from .run.executors import EXECUTORS

EXECUTOR_NAMES = tuple(EXECUTORS)

log = logging.getLogger("bench")

EXIT_OK, EXIT_FAILED_CELLS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
SELECTION_FLAGS = ("suite", "models", "datasets", "estimators", "seed", "threads")


class UsageError(ValueError):
    """Bad command-line input: reported in one line with exit status 2."""


def _checked_integer(problem_of):
    """An argparse type: an integer judged by the same rule as the suites' (bench.plan.numbers)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        problem = problem_of(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _default_cache_dir() -> Path:
    from .data import cache_dir

    return cache_dir() / "checkpoints"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--all", action="store_true", help="run every cell of the suite (narrowed by the filters)")
    parser.add_argument("--suite", help="a shipped suite's name (see `list suites`) or a TOML file; default: default")
    parser.add_argument("--models", type=_csv, help="comma-separated model names or labels of the suite to keep")
    parser.add_argument("--datasets", type=_csv, help="comma-separated datasets of the suite to keep")
    parser.add_argument("--estimators", type=_csv, help="comma-separated estimators of the suite to keep")
    seed, threads = _checked_integer(seed_problem), _checked_integer(threads_problem)
    workers = _checked_integer(lambda n: integer_problem(n, 1, THREADS_MAX))
    parser.add_argument("--seed", type=seed, help="run this one seed instead of the suite's seeds")
    parser.add_argument("--threads", type=threads, help="torch threads of each fit, for training and evaluation "
                                                     "(overrides the suite's `threads`); default 1")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda; default auto")
    parser.add_argument("--executor", default="auto", choices=["auto", *EXECUTOR_NAMES],
                        help="where fits run: serial (this process), process (worker processes), ray (Ray tasks); "
                             "default auto: process when several fits can run at once on the cores, else serial")
    parser.add_argument("--workers", type=workers,
                        help="fits at once (process: worker processes; ray: tasks in flight); "
                             "default: as many as the cores hold at --threads each")
    parser.add_argument("--ray-address", metavar="ADDRESS",
                        help="with --executor ray: join this cluster (e.g. auto, or host:6379 after `ray start "
                             "--head`); default a local instance sized to this machine")
    parser.add_argument("--gpus-per-fit", type=float, default=1.0,
                        help="with --executor ray and a CUDA device: GPUs each fit asks for (0.5 puts two on one)")
    parser.add_argument("--out", type=Path, help="the run directory to create; default runs/<timestamp>-<suite>")
    parser.add_argument("--resume", type=Path, metavar="DIR",
                        help="finish the run in DIR: skip its finished cells, redo unfinished and failed ones")
    parser.add_argument("--data-dir", type=Path, help="folder holding downloaded data files (else $ELBO_BENCH_DATA)")
    parser.add_argument("--cache-dir", type=Path, help="checkpoint cache; default the user cache")
    parser.add_argument("--no-report", action="store_true", help="do not build the report at the end")
    parser.add_argument("--quiet", action="store_true", help="no progress bars and only warnings in the log")


def _check_filter_names(args: argparse.Namespace) -> None:
    """Filters naming nothing registered are typos: say which names exist.

    A model filter may also name a suite label; those are checked against the suite afterwards.
    """
    from .data import dataset_descriptions
    from .plan.choices import UnknownChoice, choose
    from .run.evaluators import ESTIMATORS

    known = {"dataset": ("datasets", dataset_descriptions()), "estimator": ("estimators", ESTIMATORS)}
    for what, (flag, table) in known.items():
        for name in getattr(args, flag) or ():
            try:
                choose(what, name, table)
            except UnknownChoice as exc:
                raise UsageError(f"--{flag}: {exc}") from None


def _resolve_device(name: str):
    from .run.device import resolve_device

    try:
        return resolve_device(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_executor_flags(args: argparse.Namespace) -> None:
    from .run.executors import check_available

    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be an integer >= 1, got {args.workers}")
    if args.executor == "serial" and args.workers not in (None, 1):
        raise UsageError("--executor serial runs one fit at a time; drop --workers or use --executor process")
    if args.ray_address is not None and args.executor != "ray":
        raise UsageError("--ray-address needs --executor ray")
    if not args.gpus_per_fit > 0:
        raise UsageError(f"--gpus-per-fit must be > 0, got {args.gpus_per_fit}")
    check_available(args.executor)


PATH_FLAGS = ("out", "resume", "data_dir", "cache_dir", "suite")


def _check_paths(args: argparse.Namespace) -> None:
    for flag in PATH_FLAGS:
        if getattr(args, flag) is not None:
            problem = utf8_problem(getattr(args, flag))
            if problem is not None:
                raise UsageError(f"--{flag.replace('_', '-')}: {problem}")


def _check_settings(device) -> None:
    """Environment settings are judged once, at the start, not by every cell that reads them."""
    from estimators.chunking import memory_budget_bytes

    try:
        memory_budget_bytes(device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _suite_record(suite) -> dict:
    return {"name": suite.name, "description": suite.description, "source": suite.source, "contents": suite.contents}


def _prepare_run(args: argparse.Namespace):
    """Everything is validated here; nothing is written. Returns (plan, run_dir, manifest or None, options)."""
    from .plan.fits import prepare
    from .plan.suite import load_suite, parse_suite, select
    from .store import check_new_run_dir, load_resumable_manifest

    _check_paths(args)
    device = _resolve_device(args.device)
    _check_settings(device)
    _check_executor_flags(args)
    if args.resume is not None:
        given = [f"--{flag}" for flag in SELECTION_FLAGS if getattr(args, flag) is not None] + (
            ["--out"] if args.out is not None else [])
        if given:
            raise UsageError(f"--resume takes the suite and filters from the run's manifest; drop {', '.join(given)}")
        manifest = load_resumable_manifest(args.resume)
        options = manifest.get("options", {})
        record = manifest["suite"]
        suite = parse_suite(record["contents"], source=record["source"], default_name=record["name"],
                            label=Path(record["source"]).name)
        suite = select(suite, **options.get("selection", {}))
        data_dir = args.data_dir or (Path(options["data_dir"]) if options.get("data_dir") else None)
        return prepare(suite, data_dir=data_dir), args.resume, device, options, data_dir

    if not args.all and not any(getattr(args, f) for f in ("models", "datasets", "estimators")):
        raise UsageError("nothing selected: pass --all to run the whole suite, or narrow it with "
                         "--models/--datasets/--estimators")
    _check_filter_names(args)
    suite = load_suite(args.suite or "default")
    selection = {"models": args.models, "datasets": args.datasets, "estimators": args.estimators, "seed": args.seed,
                 "threads": args.threads}
    suite = select(suite, **selection)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = args.out if args.out is not None else Path("runs") / f"{stamp}-{suite.name}"
    check_new_run_dir(run_dir)
    plan = prepare(suite, data_dir=args.data_dir)
    options = {"selection": selection, "data_dir": None if args.data_dir is None else str(args.data_dir),
               "device": args.device}
    return plan, run_dir, device, options, args.data_dir


def _usage_errors() -> tuple[type[BaseException], ...]:
    from .data import DataIntegrityError, DataNotFoundError
    from .run.executors import ExecutorUnavailable
    from .store import RunDirectoryError

    return UsageError, SuiteError, RunDirectoryError, DataNotFoundError, DataIntegrityError, ExecutorUnavailable


def run_command(args: argparse.Namespace, argv: list[str]) -> int:
    from . import provenance
    from .store import ResultsStore, RunDirectoryError

    try:
        plan, run_dir, device, options, _ = _prepare_run(args)
    except _usage_errors() as exc:
        print(f"bench run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    cache_dir = args.cache_dir or _default_cache_dir()
    settings = None  # a resume sizes its executor to the cells left, once the store is open
    try:
        if args.resume is not None:
            store = ResultsStore.resume(run_dir)
        else:
            settings = _executor_settings(args, plan, len(plan.fits), device, plan.suite.threads)
            options = {**options, "threads": settings.threads}  # a resume runs with the same threads
            manifest = provenance.manifest(run_dir.name, device=device, command=["python", "-m", "bench", *argv],
                                           suite=_suite_record(plan.suite), options=options)
            manifest.update(threads=settings.threads, executor=_executor_record(settings))
            store = ResultsStore.create(run_dir, manifest)
    except RunDirectoryError as exc:
        print(f"bench run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with store:
            outcome = _execute(args, plan, store, run_dir, device, cache_dir, settings)
    except OSError as exc:  # a full disk or lost permission mid-run: the finished cells are on disk
        print(f"bench run: error: cannot write to {run_dir} ({exc.strerror or exc}); the finished cells are kept: "
              f"make room or fix it, then finish the run with: {_resume_command(args, run_dir)}", file=sys.stderr)
        return EXIT_FAILED_CELLS
    if isinstance(outcome, int):
        return outcome
    summary = outcome
    if not args.no_report:
        _build_report(run_dir)
    return _print_summary(run_dir, plan, summary, quiet=args.quiet)


def _execute(args: argparse.Namespace, plan, store, run_dir: Path, device, cache_dir: Path, settings):
    """Run the pending cells into an open store; the summary, or the exit status when interrupted."""
    from . import provenance
    from .run.execute import execute, pending_tasks

    if settings is None:
        n_fits = len(pending_tasks(plan, store, device=device, cache_dir=None, progress=False))
        threads = store.manifest.get("options", {}).get("threads") or plan.suite.threads
        settings = _executor_settings(args, plan, n_fits, device, threads)
        log.info("resuming %s: %d cells finished, %d to go", run_dir, len(store.finished),
                 plan.n_cells - sum(c.cell_id in store.finished for f in plan.fits for c in f.cells))
        store.update_manifest(resumed=[*store.manifest.get("resumed", []), provenance.now()], finished=None)
    else:
        log.info("run %s: %d cells (%d model fits)", run_dir, plan.n_cells, len(plan.fits))
    log.info("executor %s: %s workers x %d threads", settings.name, settings.workers or "Ray's", settings.threads)
    try:
        summary = execute(plan, store, device=device, cache_dir=cache_dir, progress=not args.quiet,
                          settings=settings)
    except KeyboardInterrupt:
        print(f"bench run: interrupted; finish the run with: {_resume_command(args, run_dir)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    store.update_manifest(finished=provenance.now(), threads=settings.threads,
                          executor=_executor_record(settings), summary={
            "cells": plan.n_cells, "ok": summary.ok, "skipped": summary.skipped, "failed": len(summary.failed)})
    return summary


def _executor_settings(args: argparse.Namespace, plan, n_fits: int, device, threads: int | None):
    from .run.executors import configure

    return configure(args.executor, n_fits=n_fits, device=device, workers=args.workers, threads=threads,
                     ray_address=args.ray_address, gpus_per_fit=args.gpus_per_fit)


def _executor_record(settings) -> dict:
    return {"name": settings.name, "workers": settings.workers, "ray_address": settings.ray_address}


def _resume_command(args: argparse.Namespace, run_dir: Path) -> str:
    """The command that finishes an interrupted run with the same executor and cache."""
    command = ["python", "-m", "bench", "run", "--resume", str(run_dir)]
    for flag in ("executor", "workers", "ray_address", "cache_dir", "data_dir"):
        value = getattr(args, flag)
        if value is not None and not (flag == "executor" and value == "auto"):
            command += [f"--{flag.replace('_', '-')}", str(value)]
    return shlex.join(command)


def _build_report(run_dir: Path) -> None:
    try:
        from reports import build_report

        written = build_report([run_dir])
        log.info("report: %s", ", ".join(map(str, written)))
    except Exception as exc:  # noqa: BLE001  the results are on disk; a report can be rebuilt with `report`
        log.error("building the report failed (results are safe in %s; retry with `python -m bench report %s`): %s",
                  run_dir, run_dir, exc)


def _print_summary(run_dir: Path, plan, summary, *, quiet: bool) -> int:
    line = (f"{run_dir}: {plan.n_cells} cells, {summary.ok} ok, {summary.skipped} skipped, "
            f"{len(summary.failed)} failed")
    if not summary.failed:
        if not quiet:
            print(line)
        return EXIT_OK
    print(line, file=sys.stderr)
    for description, error in summary.failed:
        print(f"  failed: {description}: {error}", file=sys.stderr)
    return EXIT_FAILED_CELLS
