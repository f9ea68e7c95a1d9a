"""The run directory: append-only rows, finished cells, the manifest, resume (files as in reports.schema).

Layout of ``<run_dir>``:
  results.jsonl   one ResultRow a line, flushed per row
  cells.jsonl     {"cell_id", "status"} appended once a cell's rows are on disk (fsync'ed before)
  manifest.json   provenance, rewritten atomically
  run.lock        held (fcntl.flock, exclusive) by the one process writing the run; holds its pid

A cell counts as finished only once its line is in cells.jsonl, so a process
killed at any moment (SIGKILL included) loses at most the cell in flight: on
resume, rows of unfinished (or failed) cells and a torn last line are dropped
by rewriting the file atomically before anything is appended.

One process writes a run directory: a new run and a resume both take the lock
before writing anything, and a second one stops with RunDirectoryError. The
kernel drops a flock when its holder dies, so a lock left by a killed process
is taken over by the next run without any clean-up.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Self

from reports.schema import (
    MANIFEST_FILE,
    RESULTS_FILE,
    SCHEMA_VERSION,
    STATUSES,
    JsonlAppender,
    ResultRow,
    ResultsFileError,
    read_jsonl,
    read_manifest,
    rewrite_jsonl,
    row_problem,
    write_manifest,
)

log = logging.getLogger(__name__)

CELLS_FILE = "cells.jsonl"
LOCK_FILE = "run.lock"


class RunDirectoryError(ValueError):
    """The run directory cannot be used (holds another run, or is not a run)."""


def check_new_run_dir(run_dir: Path) -> None:
    """A new run may use a directory that does not exist or is empty; anything else is refused."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunDirectoryError(f"output path {run_dir} exists and is not a directory; choose another --out")
    if (run_dir / MANIFEST_FILE).exists():
        try:
            run_id = (read_manifest(run_dir) or {}).get("run_id", "?")
        except ResultsFileError:
            run_id = "?"
        raise RunDirectoryError(f"output directory {run_dir} already holds run {run_id}; "
                                f"finish it with --resume {run_dir} or choose another --out")
    if any(path.name != LOCK_FILE for path in run_dir.iterdir()):
        raise RunDirectoryError(f"output directory {run_dir} is not empty and holds no run; choose another --out")


def cell_problem(record: dict) -> str | None:
    """What makes a cells.jsonl record unreadable, or None."""
    if not isinstance(record.get("cell_id"), str):
        return f"cell_id holds {json.dumps(record.get('cell_id'))[:60]}, expected a string"
    if record.get("status") not in STATUSES:
        return f"status holds {json.dumps(record.get('status'))[:60]}, expected one of {', '.join(STATUSES)}"
    return None


# What --resume reads from a manifest: key -> (JSON types, what it must be).
MANIFEST_TYPES = {"run_id": ((str,), "a string"), "suite": ((dict,), "an object"),
                  "options": ((dict,), "an object")}
SUITE_RECORD_TYPES = {"name": ((str,), "a string"), "source": ((str,), "a string"),
                      "contents": ((dict,), "an object")}


def manifest_problem(manifest: dict) -> str | None:
    """The key of a manifest that --resume cannot use, and why; None when it can."""
    for where, table, types in (("", manifest, MANIFEST_TYPES), ("suite.", manifest.get("suite"), SUITE_RECORD_TYPES)):
        for key, (allowed, expected) in types.items():
            if key == "options" and key not in table:
                continue
            if not isinstance(table.get(key), allowed):
                return f"key {where}{key} holds {json.dumps(table.get(key), default=str)[:60]}, expected {expected}"
    options = manifest.get("options", {})
    selection = options.get("selection") or {}
    for key, value in selection.items() if isinstance(selection, dict) else ():
        names = key in ("models", "datasets", "estimators") and isinstance(value, list) and all(
            isinstance(v, str) for v in value)
        number = key in ("seed", "threads") and isinstance(value, int) and not isinstance(value, bool)
        if not (value is None or names or number):
            return f"key options.selection.{key} holds {json.dumps(value, default=str)[:60]}, not a filter"
    for key, expected in (("selection", dict), ("data_dir", str), ("threads", int)):
        value = options.get(key)
        if value is not None and not isinstance(value, expected):
            return f"key options.{key} holds {json.dumps(value, default=str)[:60]}, expected {expected.__name__}"
    return None


def load_manifest(run_dir: Path) -> dict:
    """The manifest of an existing run (RunDirectoryError if ``run_dir`` is not a run)."""
    try:
        return read_manifest(run_dir, required=True)
    except ResultsFileError as exc:
        raise RunDirectoryError(f"{exc}; --resume takes a directory written by `python -m bench run`") from None


def load_resumable_manifest(run_dir: Path) -> dict:
    """The manifest of a run to resume: also RunDirectoryError when a key --resume reads is malformed."""
    manifest = load_manifest(run_dir)
    problem = manifest_problem(manifest)
    if problem is not None:
        raise RunDirectoryError(f"{Path(run_dir) / MANIFEST_FILE}: {problem}; the manifest is damaged")
    return manifest


def _missing_parents(run_dir: Path) -> list[Path]:
    """The directories, deepest first, that creating ``run_dir`` would make."""
    made = []
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            break
        made.append(path)
    return made


def _remove_made(made: list[Path], *files: Path) -> None:
    """Undo a run directory that could not be started: its files, then the directories made for it."""
    for path in files:
        path.unlink(missing_ok=True)
    for directory in made:
        try:
            directory.rmdir()
        except OSError:
            return


class RunLock:
    """The exclusive lock on a run directory, held from ``acquire`` until ``release`` (or the holder's death)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Take the lock or raise RunDirectoryError naming the process that holds it."""
        lock = cls(run_dir)
        fd = os.open(lock.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirectoryError(f"run directory {run_dir} is in use by process {holder} (another run or "
                                    f"resume of it); wait for that one to finish") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            os.close(fd)
            raise
        lock._fd = fd
        return lock

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


class ResultsStore:
    """Appends rows and cell completions durably; knows which cells a previous attempt finished."""

    def __init__(self, run_dir: Path, manifest: dict, finished: dict[str, str], lock: RunLock):
        self.run_dir = Path(run_dir)
        self.manifest = manifest
        self.finished = finished  # cell_id -> status of the cells already complete
        self._lock = lock
        self._results = JsonlAppender(self.run_dir / RESULTS_FILE)
        self._cells = JsonlAppender(self.run_dir / CELLS_FILE)

    @classmethod
    def create(cls, run_dir: Path, manifest: dict) -> ResultsStore:
        """A new run directory with its manifest; RunDirectoryError, leaving no directory, when it cannot be
        written (read-only location, no permission, full disk)."""
        run_dir = Path(run_dir)
        check_new_run_dir(run_dir)
        made = _missing_parents(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock.acquire(run_dir)
        except OSError as exc:
            _remove_made(made)
            raise RunDirectoryError(f"cannot create run directory {run_dir}: {exc.strerror or exc}") from None
        try:
            check_new_run_dir(run_dir)  # again under the lock: another run may have started since
            write_manifest(run_dir, manifest)
            return cls(run_dir, manifest, {}, lock)
        except OSError as exc:
            lock.release()
            _remove_made(made, run_dir / LOCK_FILE)
            raise RunDirectoryError(f"cannot write to run directory {run_dir}: {exc.strerror or exc}") from None
        except BaseException:
            lock.release()
            raise

    @classmethod
    def resume(cls, run_dir: Path) -> ResultsStore:
        """Reopen a run: keep the rows of cells that finished ok; drop the rest and any torn line."""
        run_dir = Path(run_dir)
        load_manifest(run_dir)  # a run directory, before a lock file is made in it
        try:
            lock = RunLock.acquire(run_dir)
        except OSError as exc:
            raise RunDirectoryError(f"cannot lock run directory {run_dir}: {exc.strerror or exc}") from None
        try:
            return cls._reopen(run_dir, lock)
        except OSError as exc:
            lock.release()
            raise RunDirectoryError(f"cannot rewrite the files of run directory {run_dir}: "
                                    f"{exc.strerror or exc}") from None
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _reopen(cls, run_dir: Path, lock: RunLock) -> ResultsStore:
        manifest = load_manifest(run_dir)
        try:
            cells, cells_torn = read_jsonl(run_dir / CELLS_FILE, check=cell_problem)
            rows, rows_torn = read_jsonl(run_dir / RESULTS_FILE, check=row_problem)
        except ResultsFileError as exc:
            raise RunDirectoryError(str(exc)) from None
        versions = sorted({r.get("schema_version", 1) for r in rows} - {SCHEMA_VERSION})
        if versions:  # one run directory holds one schema
            raise RunDirectoryError(f"{run_dir} holds rows of results schema version {versions[0]}; this version "
                                    f"writes {SCHEMA_VERSION}: start a new run instead of resuming it")
        done_ok = {c["cell_id"]: c["status"] for c in cells if c.get("status") != "failed"}
        kept = [r for r in rows if r.get("cell_id") in done_ok]
        if rows_torn or len(kept) != len(rows):
            log.info("resume: dropping %d rows of unfinished or failed cells%s", len(rows) - len(kept),
                     " and a torn last line" if rows_torn else "")
            rewrite_jsonl(run_dir / RESULTS_FILE, kept)
        if cells_torn or len(done_ok) != len(cells):
            rewrite_jsonl(run_dir / CELLS_FILE, [{"cell_id": c, "status": s} for c, s in done_ok.items()])
        return cls(run_dir, manifest, done_ok, lock)

    def append_row(self, row: ResultRow) -> None:
        self._results.append(row.to_record())

    def finish_cell(self, cell_id: str, status: str) -> None:
        """Mark a cell complete once its rows are durable (rows fsync'ed first, then the marker)."""
        self._results.sync()
        self._cells.append({"cell_id": cell_id, "status": status})
        self._cells.sync()
        self.finished[cell_id] = status

    def update_manifest(self, **fields) -> None:
        self.manifest.update(fields)
        write_manifest(self.run_dir, self.manifest)

    def close(self) -> None:
        """Close both files and release the lock, even when a file cannot flush (a full disk)."""
        try:
            self._results.close()
        finally:
            try:
                self._cells.close()
            finally:
                self._lock.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
