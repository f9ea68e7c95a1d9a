"""The results contract: the row, the JSON Lines files, the manifest and atomic writes (no torch).

``bench`` writes a run directory through this module and ``bench check`` and
``reports`` read it through this module, so the three agree on one definition.

Layout of a run directory:
  results.jsonl   one ``ResultRow`` a line (its ``to_record()``), appended and flushed per row
  cells.jsonl     {"cell_id", "status"} per finished cell (bench/store.py keeps it)
  manifest.json   provenance (a JSON object), rewritten atomically

JSON Lines rule, the same for every reader: a complete file ends with a newline. A
last line without one, or a last line that does not parse, is *torn* (a writer
stopped mid-line): it is left out and reported as torn. A line that does not parse
anywhere else, or that is not a JSON object, means the file is corrupt
(``ResultsFileError``). Blank lines are ignored.

Rows written before ``schema_version`` existed are version 1; ``upgrade_record``
fills the columns they lack with None, so old run directories still load.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self

SCHEMA_VERSION = 3  # 1: rows without schema_version, structure and timing_s; 2: without replicates, per_example
RESULTS_FILE = "results.jsonl"
# per_example values are rounded to this many decimals (1e-6 nats: far below any Monte Carlo error, and it
# keeps a row of 10,000 examples near 120 kB).
PER_EXAMPLE_DECIMALS = 6
MANIFEST_FILE = "manifest.json"
STATUSES = ("ok", "failed", "skipped")

# What a model declares about itself (vaes.base.ModelStructure), as rows carry it.
STRUCTURE_FIELDS = ("family", "latent_layers", "data_dim", "likelihood", "diffusion_steps", "continuous_time")


class ResultsFileError(ValueError):
    """A results or manifest file that cannot be read as one; the message names the file and line."""


@dataclass(frozen=True)
class ResultRow:
    """One measurement: a tidy row of results.jsonl. Values in nats per example unless ``unit`` says otherwise."""

    run_id: str
    cell_id: str  # hash of what the cell computes (bench.plan), stable across runs and machines
    dataset: str
    split: str  # "train" for a fit's training row, else the split evaluated
    model: str  # registered model name
    label: str  # the suite entry's row label
    config_hash: str  # of the evaluated model's config
    model_config: dict  # the suite's overrides of the model's config
    structure: dict | None  # STRUCTURE_FIELDS, from the model itself; None if it does not declare them
    seed: int
    estimator: str  # an estimator of bench's table, or "train"
    k: int | None  # draws per example; None where the estimator draws none (or has no K)
    metric: str  # e.g. "elbo", "kl/z1", "throughput"
    method: str | None  # how a log p(x) was computed: "exact", "iwae", or method_text("ais", settings) (below)
    value: float | None  # None (null) for failed and skipped rows, and for non-finite numbers
    stderr: float | None  # standard error over examples
    mc_stderr: float | None  # Monte Carlo standard error of the mean
    replicates: int | None  # independent replicates whose mean is the value (their spread gives mc_stderr); None: one
    unit: str | None
    n_examples: int | None
    device: str
    wall_s: float | None  # seconds of the measurement (for timing rows: the median of timing_s)
    timing_s: tuple[float, ...] | None  # timing rows: seconds of each timed repeat, for significance tests
    # Bounds and log p(x): each example's value (rounded to PER_EXAMPLE_DECIMALS), in the split's order, so that two
    # cells of one fit (common random numbers: same examples, same seed) can be compared example by example.
    per_example: tuple[float, ...] | None
    status: str  # one of STATUSES
    error: str | None  # why a row failed or was skipped
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"row status {self.status!r} is not one of {', '.join(STATUSES)}")
        if self.structure is not None and tuple(self.structure) != STRUCTURE_FIELDS:
            raise ValueError(f"row structure has fields {list(self.structure)}; expected {list(STRUCTURE_FIELDS)}")

    @classmethod
    def from_record(cls, record: dict) -> Self:
        """A row from a record holding exactly the current columns (ValueError naming any missing or extra)."""
        missing, extra = set(ROW_COLUMNS) - set(record), set(record) - set(ROW_COLUMNS)
        if missing or extra:
            raise ValueError(f"row columns differ from the schema: missing {sorted(missing)}, extra {sorted(extra)}")
        return cls(**record)

    def to_record(self) -> dict:
        """The JSON object written for this row (non-finite numbers as null: JSON has neither NaN nor inf)."""
        record = {name: getattr(self, name) for name in ROW_COLUMNS}
        for name in ("timing_s", "per_example"):
            values = getattr(self, name)
            record[name] = None if values is None else [_finite(v) for v in values]
        return {name: _finite(value) for name, value in record.items()}


ROW_COLUMNS = tuple(f.name for f in dataclasses.fields(ResultRow))


# --- the method column ------------------------------------------------------------------------------
# "exact" and "iwae" (with K in the k column) name a log p(x) by themselves. A sampler whose value depends on
# settings other than K writes them beside its name, e.g. "ais(steps=1000, chains=16, leapfrog=10,
# schedule=sigmoid, init=prior)" for AIS and "bdmc(...)" for the BDMC rows, so a row says how it was made.

def method_text(name: str, settings: dict) -> str:
    """'name(key=value, ...)' in the settings' order; the name alone without settings."""
    if not settings:
        return name
    return f"{name}({', '.join(f'{key}={value}' for key, value in settings.items())})"


def method_settings(text: str | None) -> tuple[str | None, dict[str, str]]:
    """The inverse of ``method_text``: (name, {key: value text}); (text, {}) for a bare name, (None, {}) for None."""
    if not isinstance(text, str):
        return None, {}
    name, paren, rest = text.partition("(")
    if not paren or not rest.endswith(")"):
        return text, {}
    pairs = (part.partition("=") for part in rest[:-1].split(", ") if part)
    return name, {key: value for key, _, value in pairs}


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def upgrade_record(record: dict) -> dict:
    """A record of any schema version with every current column (the ones it predates as None)."""
    upgraded = {name: record.get(name) for name in ROW_COLUMNS}
    upgraded["schema_version"] = record.get("schema_version", 1)
    return {**record, **upgraded}


# --- JSON Lines -------------------------------------------------------------------------------------

def read_jsonl(path: Path, check: Callable[[dict], str | None] | None = None) -> tuple[list[dict], bool]:
    """The complete records of ``path`` and whether a torn last line was left out (see the module docstring).

    ``check(record)`` says what is wrong with a record of the right JSON but the wrong shape (None: nothing);
    it becomes a ResultsFileError naming the line. A missing file reads as no records.
    """
    path = Path(path)
    if not path.exists():
        return [], False
    lines = path.read_bytes().split(b"\n")
    torn = lines[-1].strip() != b""  # a complete file ends with a newline
    complete = [(number, line) for number, line in enumerate(lines[:-1], start=1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(complete):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if position == len(complete) - 1 and not torn:
                torn = True  # cut inside a write that happened to end in a newline
                continue
            raise ResultsFileError(f"{path}: line {number} is not JSON ({exc}); the file is corrupt beyond a "
                                   "torn last line") from None
        if not isinstance(record, dict):
            raise ResultsFileError(f"{path}: line {number} is not a JSON object")
        problem = None if check is None else check(record)
        if problem is not None:
            raise ResultsFileError(f"{path}: line {number}: {problem}")
        records.append(record)
    return records, torn


def rewrite_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Replace ``path`` with exactly these records, atomically."""
    write_atomic(path, lambda f: f.writelines((json.dumps(r) + "\n").encode() for r in records))


class JsonlAppender:
    """Appends records to one JSON Lines file, a flush per record; ``sync`` makes them durable."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "a")  # noqa: SIM115  held open until close()

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def sync(self) -> None:
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


# The JSON types a row's columns may hold, checked on reading (a column a record lacks is left to its reader).
_TEXT, _INT, _NUMBER, _LIST, _OBJECT = (str,), (int,), (int, float), (list,), (dict,)
ROW_TYPES = {
    "run_id": _TEXT, "cell_id": _TEXT, "dataset": _TEXT, "split": _TEXT, "model": _TEXT, "label": _TEXT,
    "config_hash": _TEXT, "model_config": _OBJECT, "structure": _OBJECT, "seed": _INT, "estimator": _TEXT,
    "k": _INT, "metric": _TEXT, "method": _TEXT, "value": _NUMBER, "stderr": _NUMBER, "mc_stderr": _NUMBER,
    "replicates": _INT, "unit": _TEXT, "n_examples": _INT, "device": _TEXT, "wall_s": _NUMBER,
    "timing_s": _LIST, "per_example": _LIST, "status": _TEXT, "error": _TEXT, "schema_version": _INT,
}
def row_problem(record: dict) -> str | None:
    """What makes a results record unreadable as a row (a column of the wrong JSON type), or None.

    Null passes everywhere: which columns a row must fill is its reader's rule (upgrade_record, the check)."""
    for name, types in ROW_TYPES.items():
        if record.get(name) is None:
            continue
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, types):
            return f"column {name} holds {json.dumps(value)[:60]}, expected {_type_names(types)}"
        if name in ("timing_s", "per_example") and not all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in value):
            return f"column {name} holds a value that is not a number"
    if record.get("status") is not None and record["status"] not in STATUSES:
        return f"column status holds {record['status']!r}, expected one of {', '.join(STATUSES)}"
    return None


def _type_names(types: tuple[type, ...]) -> str:
    return {_TEXT: "a string", _INT: "an integer", _NUMBER: "a number", _LIST: "a list",
            _OBJECT: "an object"}[types]


def read_rows(run_dir: Path) -> tuple[list[dict], bool]:
    """The upgraded records of ``run_dir``'s results.jsonl, and whether a torn last line was left out."""
    records, torn = read_jsonl(Path(run_dir) / RESULTS_FILE, check=row_problem)
    return [upgrade_record(r) for r in records], torn


# --- manifest ---------------------------------------------------------------------------------------

def read_manifest(run_dir: Path, *, required: bool = False) -> dict | None:
    """The run's manifest; when it has none, None (or ResultsFileError if ``required``); ResultsFileError
    when it is not a JSON object."""
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        if required:
            raise ResultsFileError(f"{run_dir} is not a run directory (no {MANIFEST_FILE})")
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsFileError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ResultsFileError(f"{path} is not a JSON object")
    return manifest


def write_manifest(run_dir: Path, manifest: dict) -> None:
    write_json(Path(run_dir) / MANIFEST_FILE, manifest, indent=2)


# --- atomic writes ----------------------------------------------------------------------------------

def write_json(path: Path, payload: object, *, indent: int) -> None:
    """JSON with sorted keys and a final newline, written atomically."""
    text = json.dumps(payload, indent=indent, sort_keys=True, default=str) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    Readers see the old file or the new one, never a torn one. The temporary name is unique per
    call (mkstemp), so two processes writing the same path never share one; it is removed on failure.
    """
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
