"""The append-only results store of one run directory.

Layout of ``<run_dir>``:
  results.jsonl   one tidy row per measurement (ROW_COLUMNS), flushed per row
  cells.jsonl     {"cell_id", "status"} appended once a cell's rows are on disk (fsync'ed before)
  manifest.json   provenance, rewritten atomically (temporary file, fsync, rename)

A cell counts as finished only once its line is in cells.jsonl, so a process
killed at any moment (SIGKILL included) loses at most the cell in flight: on
resume, rows of unfinished (or failed) cells and a torn last line are dropped
by rewriting the file atomically before anything is appended.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Self

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
CELLS_FILE = "cells.jsonl"
MANIFEST_FILE = "manifest.json"

ROW_COLUMNS = (
    "run_id", "cell_id", "dataset", "split", "model", "label", "config_hash", "model_config", "seed", "estimator",
    "k", "metric", "method", "value", "stderr", "mc_stderr", "unit", "n_examples", "device", "wall_s", "status",
    "error",
)
STATUSES = ("ok", "failed", "skipped")


class RunDirectoryError(ValueError):
    """The run directory cannot be used (holds another run, or is not a run)."""


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON so that readers see the old file or the new one, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """The complete JSON lines of ``path`` and whether a torn (unterminated or unparsable) last line was seen."""
    if not path.exists():
        return [], False
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines[-1] != b""  # a complete file ends with a newline
    records = []
    for number, line in enumerate(lines[:-1]):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) - 2 and not torn:
                torn = True  # the last line was cut inside a multi-byte write yet ends with "\n" by chance
                continue
            raise ValueError(f"{path}: line {number + 1} is not JSON (the file is corrupt beyond a torn last line)")
    return records, torn


def read_results(run_dir: Path) -> list[dict]:
    """Every complete row of a run (a torn last line is ignored)."""
    rows, torn = read_jsonl(Path(run_dir) / RESULTS_FILE)
    if torn:
        log.warning("%s: ignoring a torn last line (the run was interrupted mid-write)", run_dir)
    return rows


def _rewrite_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def check_new_run_dir(run_dir: Path) -> None:
    """A new run may use a directory that does not exist or is empty; anything else is refused."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunDirectoryError(f"output path {run_dir} exists and is not a directory; choose another --out")
    manifest = run_dir / MANIFEST_FILE
    if manifest.exists():
        run_id = _manifest_field(manifest, "run_id")
        raise RunDirectoryError(f"output directory {run_dir} already holds run {run_id}; "
                                f"finish it with --resume {run_dir} or choose another --out")
    if any(run_dir.iterdir()):
        raise RunDirectoryError(f"output directory {run_dir} is not empty and holds no run; choose another --out")


def load_manifest(run_dir: Path) -> dict:
    """The manifest of an existing run (RunDirectoryError if ``run_dir`` is not a run)."""
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        raise RunDirectoryError(f"{run_dir} is not a run directory (no {MANIFEST_FILE}); "
                                "--resume takes a directory written by `python -m bench run`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunDirectoryError(f"{path} is not valid JSON: {exc}") from None


def _manifest_field(path: Path, name: str) -> str:
    try:
        return str(json.loads(path.read_text()).get(name, "?"))
    except (OSError, json.JSONDecodeError):
        return "?"


def _json_number(value: object) -> object:
    """JSON has no NaN or infinity: store them as null (a failed row carries the reason)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ResultsStore:
    """Appends rows and cell completions durably; knows which cells a previous attempt finished."""

    def __init__(self, run_dir: Path, manifest: dict, finished: dict[str, str]):
        self.run_dir = Path(run_dir)
        self.manifest = manifest
        self.finished = finished  # cell_id -> status of the cells already complete
        # Held open for the whole run (closed by close() / the context manager): one append handle per file.
        self._results = open(self.run_dir / RESULTS_FILE, "a")  # noqa: SIM115
        self._cells = open(self.run_dir / CELLS_FILE, "a")  # noqa: SIM115

    @classmethod
    def create(cls, run_dir: Path, manifest: dict) -> ResultsStore:
        run_dir = Path(run_dir)
        check_new_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / MANIFEST_FILE, manifest)
        return cls(run_dir, manifest, {})

    @classmethod
    def resume(cls, run_dir: Path) -> ResultsStore:
        """Reopen a run: keep the rows of cells that finished ok; drop the rest and any torn line."""
        run_dir = Path(run_dir)
        manifest = load_manifest(run_dir)
        cells, cells_torn = read_jsonl(run_dir / CELLS_FILE)
        done_ok = {c["cell_id"]: c["status"] for c in cells if c.get("status") != "failed"}
        rows, rows_torn = read_jsonl(run_dir / RESULTS_FILE)
        kept = [r for r in rows if r.get("cell_id") in done_ok]
        if rows_torn or len(kept) != len(rows):
            log.info("resume: dropping %d rows of unfinished or failed cells%s", len(rows) - len(kept),
                     " and a torn last line" if rows_torn else "")
            _rewrite_jsonl(run_dir / RESULTS_FILE, kept)
        if cells_torn or len(done_ok) != len(cells):
            _rewrite_jsonl(run_dir / CELLS_FILE, [{"cell_id": c, "status": s} for c, s in done_ok.items()])
        return cls(run_dir, manifest, done_ok)

    def append_row(self, row: dict) -> None:
        if tuple(row) != ROW_COLUMNS:
            missing = set(ROW_COLUMNS) ^ set(row)
            raise ValueError(f"row columns differ from ROW_COLUMNS: {sorted(missing)}" if missing
                             else "row columns are out of order")
        if row["status"] not in STATUSES:
            raise ValueError(f"row status {row['status']!r} is not one of {STATUSES}")
        clean = {key: _json_number(value) for key, value in row.items()}
        self._results.write(json.dumps(clean) + "\n")
        self._results.flush()

    def finish_cell(self, cell_id: str, status: str) -> None:
        """Mark a cell complete once its rows are durable (rows fsync'ed first, then the marker)."""
        os.fsync(self._results.fileno())
        self._cells.write(json.dumps({"cell_id": cell_id, "status": status}) + "\n")
        self._cells.flush()
        os.fsync(self._cells.fileno())
        self.finished[cell_id] = status

    def update_manifest(self, **fields) -> None:
        self.manifest.update(fields)
        write_json_atomic(self.run_dir / MANIFEST_FILE, self.manifest)

    def close(self) -> None:
        self._results.close()
        self._cells.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
