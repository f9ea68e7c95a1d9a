"""Read run directories (results.jsonl + manifest.json) into one tidy pandas DataFrame."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from reports.errors import ReportError

RESULTS_FILE = "results.jsonl"
MANIFEST_FILE = "manifest.json"

# The results-row schema written by bench/store.py (see the shared contracts).
RESULT_COLUMNS = (
    "run_id", "cell_id", "dataset", "split", "model", "config_hash", "model_config", "seed",
    "estimator", "k", "metric", "method", "value", "stderr", "mc_stderr", "unit", "n_examples",
    "device", "wall_s", "status", "error",
)
FLOAT_COLUMNS = ("value", "stderr", "mc_stderr", "wall_s")
OK = "ok"


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON Lines file. A torn last line (a run killed mid-write) is skipped;
    a bad line anywhere else means the file is corrupt and raises ReportError."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break  # torn last line: the row in flight when the run stopped
            raise ReportError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def load_manifest(run_dir: Path) -> dict:
    """The run's manifest.json, or {} when the run has none (provenance then shows as missing)."""
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc.msg})") from None
    if not isinstance(manifest, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return manifest


def config_key(config: object) -> str:
    """A hashable, canonical text of a model_config dict (for grouping and labels)."""
    return json.dumps(config if config is not None else {}, sort_keys=True)


def load_results(run_dirs: list[Path]) -> pd.DataFrame:
    """All rows of the given run directories, one row per measurement, every status kept.

    Columns: the results-row schema, plus `run_dir` (str) and `config_key` (canonical JSON of
    model_config). `k` is a nullable integer. The manifests are in `df.attrs["manifests"]`
    ({run_dir: manifest}). Tables use only status == "ok" rows (`ok_rows`); `failed_rows` lists
    the rest.
    """
    if not run_dirs:
        raise ReportError("no run directory given: pass at least one directory holding results.jsonl")
    frames, manifests = [], {}
    for run_dir in map(Path, run_dirs):
        results = run_dir / RESULTS_FILE
        if not results.is_file():
            raise ReportError(f"{run_dir}: no {RESULTS_FILE} (is this a run directory written by `python -m bench run`?)")
        rows = read_jsonl(results)
        manifests[str(run_dir)] = load_manifest(run_dir)
        frame = pd.DataFrame(rows, columns=None if rows else list(RESULT_COLUMNS))
        frame["run_dir"] = str(run_dir)
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)
    for column in RESULT_COLUMNS:
        if column not in df.columns:
            df[column] = None
    for column in FLOAT_COLUMNS:
        df[column] = pd.to_numeric(df[column], errors="coerce").astype(float)
    df["k"] = pd.to_numeric(df["k"], errors="coerce").astype("Int64")
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
    df["model_config"] = df["model_config"].map(lambda c: c if isinstance(c, dict) else {})
    df["config_key"] = df["model_config"].map(config_key)
    df.attrs["manifests"] = manifests
    return df


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that tables and plots are built from."""
    return df[df["status"] == OK]


def failed_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with a status other than ok, less those whose (cell, metric) later succeeded (a resumed
    run may retry a failed cell)."""
    succeeded = set(zip(df.loc[df["status"] == OK, "cell_id"], df.loc[df["status"] == OK, "metric"]))
    retried = pd.Series([key in succeeded for key in zip(df["cell_id"], df["metric"])], index=df.index, dtype=bool)
    bad = df[(df["status"] != OK) & ~retried]
    return bad.drop_duplicates(subset=["cell_id", "metric", "status", "error"])
