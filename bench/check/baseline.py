"""Reading a run's rows and a baseline, and writing a baseline from a clean run (files via reports.schema).

A baseline belongs to one suite: it records the suite's name and a hash of its contents (the TOML as
parsed, from the run's manifest), and a run of another suite, or of the same suite edited since, is
refused: its cells would mostly be "missing", and what matched would be compared by accident.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from reports.schema import (
    RESULTS_FILE,
    ResultsFileError,
    read_jsonl,
    read_manifest,
    row_problem,
    upgrade_record,
    write_atomic,
)

from .cells import KEY_FIELDS, CellKey, CheckInputError, cell_key, describe_key, sort_key
from .compare import rows_by_key, with_khat_share
from .rules import KHAT_SHARE, policy_of

BASELINE_FORMAT = "elbo-bench-baseline"
BASELINE_FORMAT_VERSION = 2  # 1: without the suite's identity, replicates, khat_share, per-example values, timings
# Fields a baseline keeps for each cell, besides the key (khat_share: of the cell's IWAE weights, None elsewhere).
CELL_FIELDS = ("value", "stderr", "mc_stderr", "replicates", KHAT_SHARE, "per_example", "timing_s", "unit",
               "n_examples", "method", "label", "model_config")
REWRITE = "python -m bench check RUN_DIR --write-baseline FILE"


@dataclass(frozen=True)
class Baseline:
    cells: dict[CellKey, dict]
    suite: dict  # {"name": ..., "hash": ...} of the suite the baseline was written from (hash None if unknown)


def read_run_rows(run_dir: Path) -> list[dict]:
    """The rows of RUN_DIR/results.jsonl, in file order; CheckInputError when absent, empty or malformed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckInputError(f"run directory not found: {run_dir}")
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        raise CheckInputError(f"{run_dir} has no {RESULTS_FILE}: is it a run directory "
                              "(python -m bench run --out DIR)?")
    try:
        rows, torn = read_jsonl(path, check=row_problem)
    except ResultsFileError as error:
        raise CheckInputError(str(error)) from None
    if torn:
        # An interrupted run would pass with its unfinished cells merely "missing"; refuse it instead.
        raise CheckInputError(f"{path} ends in a torn line: the run was interrupted; "
                              f"finish it with python -m bench run --resume {run_dir}")
    for number, row in enumerate(rows, start=1):
        missing = [name for name in (*KEY_FIELDS, "value", "status") if name not in row]
        if missing:
            raise CheckInputError(f"{path}:{number} lacks the columns {', '.join(missing)}")
    if not rows:
        raise CheckInputError(f"{path} holds no results")
    return [upgrade_record(row) for row in rows]


def read_run_manifest(run_dir: Path) -> dict:
    try:
        return read_manifest(run_dir, required=True)
    except ResultsFileError as error:
        raise CheckInputError(str(error)) from None


def read_baseline(path: Path) -> Baseline:
    """The baseline's cells by key and its suite; CheckInputError when missing, malformed or of another format
    version."""
    path = Path(path)
    if not path.is_file():
        raise CheckInputError(f"baseline not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckInputError(f"baseline {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        raise CheckInputError(f"{path} is not an elbo-bench baseline (expected \"format\": \"{BASELINE_FORMAT}\"); "
                              f"write one with: python -m bench check RUN_DIR --write-baseline FILE")
    version = data.get("format_version")
    if version != BASELINE_FORMAT_VERSION:
        raise CheckInputError(f"baseline {path} has format version {version!r}; this check reads version "
                              f"{BASELINE_FORMAT_VERSION}: rewrite it ({REWRITE})")
    suite = data.get("suite")
    if not isinstance(suite, dict) or not isinstance(suite.get("name"), str):
        raise CheckInputError(f"baseline {path} does not say which suite it belongs to (expected \"suite\": "
                              f"{{\"name\": ..., \"hash\": ...}}); rewrite it ({REWRITE})")
    cells = data.get("cells")
    if not isinstance(cells, list) or not cells:
        raise CheckInputError(f"baseline {path} has no cells (expected a non-empty list under \"cells\")")
    by_key: dict[CellKey, dict] = {}
    for index, cell in enumerate(cells):
        missing = [name for name in (*KEY_FIELDS, "value") if name not in cell] if isinstance(cell, dict) \
            else ["(not an object)"]
        if missing:
            raise CheckInputError(f"baseline {path} cell {index} lacks {', '.join(missing)}")
        not_scalar = [name for name in KEY_FIELDS if isinstance(cell[name], (dict, list))]
        if not_scalar:
            raise CheckInputError(f"baseline {path} cell {index}: key {not_scalar[0]} holds "
                                  f"{json.dumps(cell[not_scalar[0]])[:60]}, expected a string, number or null")
        if not isinstance(cell["value"], (int, float)) or not math.isfinite(cell["value"]):
            raise CheckInputError(f"baseline {path} cell {index} ({describe_key(cell_key(cell))}) "
                                  f"has a non-numeric value {cell['value']!r}")
        if cell_key(cell) in by_key:
            raise CheckInputError(f"baseline {path} holds the cell {describe_key(cell_key(cell))} twice")
        by_key[cell_key(cell)] = cell
    return Baseline(by_key, {"name": suite["name"], "hash": suite.get("hash")})


def suite_identity(manifest: dict) -> dict:
    """{"name", "hash"} of a run's suite: the sha256 of its parsed contents as canonical JSON (None where the
    manifest does not hold the contents)."""
    suite = manifest.get("suite")
    if isinstance(suite, str):
        return {"name": suite, "hash": None}
    if not isinstance(suite, dict) or not isinstance(suite.get("name"), str):
        return {"name": None, "hash": None}
    contents = suite.get("contents")
    digest = None if contents is None else hashlib.sha256(
        json.dumps(contents, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"name": suite["name"], "hash": digest}


def check_same_suite(baseline: Baseline, manifest: dict, baseline_path: Path) -> None:
    """CheckInputError unless the run is of the baseline's suite, unchanged since the baseline was written."""
    run = suite_identity(manifest)
    if run["name"] != baseline.suite["name"]:
        raise CheckInputError(f"baseline {baseline_path} belongs to suite {baseline.suite['name']!r}, the run to "
                              f"suite {run['name']!r}: compare a run of the same suite")
    if baseline.suite["hash"] is not None and run["hash"] != baseline.suite["hash"]:
        raise CheckInputError(f"suite {run['name']!r} has changed since baseline {baseline_path} was written "
                              f"(contents hash {baseline.suite['hash']} -> {run['hash']}): rewrite the baseline "
                              f"({REWRITE})")


def baseline_from_run(rows: list[dict], manifest: dict) -> dict:
    """The baseline document of a clean run: every compared metric of every ok cell, sorted by key."""
    by_key = with_khat_share(rows_by_key(rows))
    failed = [key for key, row in by_key.items() if row.get("status") == "failed"]
    if failed:
        raise CheckInputError(f"the run has {len(failed)} failed cell(s), e.g. {describe_key(failed[0])}: "
                              f"a baseline must come from a clean run")
    kept = {key: row for key, row in by_key.items()
            if row.get("status") == "ok" and policy_of(row["metric"]) is not None}
    if not kept:
        raise CheckInputError("the run has no ok bound, KL or throughput cells to put in a baseline")
    cells = [{**{name: row[name] for name in KEY_FIELDS}, **{name: row.get(name) for name in CELL_FIELDS}}
             for key, row in sorted(kept.items(), key=lambda item: sort_key(item[0]))]
    provenance = {
        "run_id": manifest.get("run_id"),
        "git_commit": manifest.get("git_commit"),
        "versions": manifest.get("versions"),
        "device": manifest.get("device"),
        "device_name": manifest.get("device_name"),
        "threads": manifest.get("threads"),
        "command": manifest.get("command"),
        "started": manifest.get("started"),
        "finished": manifest.get("finished"),
    }
    suite = suite_identity(manifest)
    if suite["name"] is None:
        raise CheckInputError("the run's manifest does not name its suite: a baseline must say which suite it is of")
    return {"format": BASELINE_FORMAT, "format_version": BASELINE_FORMAT_VERSION, "suite": suite,
            "provenance": provenance, "cells": cells}


def write_baseline(run_dir: Path, path: Path) -> int:
    """Write the baseline of RUN_DIR to ``path`` (stable key order and indentation, so diffs read well)."""
    path = Path(path)
    if path.is_dir():
        raise CheckInputError(f"--write-baseline {path} is a directory; name a file, e.g. {path / 'baseline.json'}")
    document = baseline_from_run(read_run_rows(run_dir), read_run_manifest(run_dir))
    text = baseline_text(document)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: f.write(text.encode()))
    except OSError as error:
        raise CheckInputError(f"cannot write baseline {path}: {error.strerror or error}") from None
    return len(document["cells"])


def baseline_text(document: dict) -> str:
    """JSON with sorted keys and indent 1 (diffs read cell by cell), each list of numbers (per-example values,
    timings) on one line rather than one line a number."""
    lists: list[list] = []

    def stash(value: object) -> object:
        if isinstance(value, dict):
            return {key: stash(item) for key, item in value.items()}
        if isinstance(value, list) and value and all(isinstance(v, (int, float)) or v is None for v in value):
            lists.append(value)
            return f"@numbers {len(lists) - 1}@"
        return [stash(item) for item in value] if isinstance(value, list) else value

    text = json.dumps(stash(document), indent=1, sort_keys=True, default=str)
    return re.sub(r'"@numbers (\d+)@"', lambda match: json.dumps(lists[int(match[1])]), text) + "\n"
