"""Read run directories (through reports.schema) into one tidy pandas DataFrame."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from reports.errors import ReportError
from reports.schema import RESULTS_FILE, ROW_COLUMNS, STRUCTURE_FIELDS, ResultsFileError, read_manifest, read_rows

FLOAT_COLUMNS = ("value", "stderr", "mc_stderr", "wall_s")
# The model's declared structure, one column each; NaN / None for rows written before rows carried it.
INTEGER_STRUCTURE = ("latent_layers", "data_dim", "diffusion_steps")
OK = "ok"


def config_key(config: object) -> str:
    """A hashable, canonical text of a model_config dict (for grouping and labels)."""
    return json.dumps(config if config is not None else {}, sort_keys=True)


def _read_run(run_dir: Path) -> tuple[list[dict], dict]:
    if not (run_dir / RESULTS_FILE).is_file():
        raise ReportError(f"{run_dir}: no {RESULTS_FILE} (is this a run directory written by `python -m bench run`?)")
    try:
        rows, _ = read_rows(run_dir)  # a torn last line (a run killed mid-write) is left out
        manifest = read_manifest(run_dir) or {}  # without one, provenance shows as missing
    except ResultsFileError as exc:
        raise ReportError(str(exc)) from None
    return rows, manifest


def _structure_columns(df: pd.DataFrame) -> None:
    """The row's ``structure`` object spread into one column per field (family, data_dim, ...)."""
    structures = df["structure"].map(lambda s: s if isinstance(s, dict) else {})
    for name in STRUCTURE_FIELDS:
        df[name] = structures.map(lambda s, name=name: s.get(name))
    for name in INTEGER_STRUCTURE:
        df[name] = pd.to_numeric(df[name], errors="coerce").astype("Int64")


def load_results(run_dirs: list[Path]) -> pd.DataFrame:
    """All rows of the given run directories, one row per measurement, every status kept.

    Columns: the results-row schema (reports.schema.ROW_COLUMNS), the model's structure one
    field a column (STRUCTURE_FIELDS), plus `run_dir` (str) and `config_key` (canonical JSON of
    model_config). `k` is a nullable integer. The manifests are in `df.attrs["manifests"]`
    ({run_dir: manifest}). Tables use only status == "ok" rows (`ok_rows`); `failed_rows` lists
    the rest.
    """
    if not run_dirs:
        raise ReportError("no run directory given: pass at least one directory holding results.jsonl")
    frames, manifests = [], {}
    for run_dir in map(Path, run_dirs):
        rows, manifests[str(run_dir)] = _read_run(run_dir)
        frame = pd.DataFrame(rows, columns=list(ROW_COLUMNS) if not rows else None)
        frame["run_dir"] = str(run_dir)
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)
    for column in FLOAT_COLUMNS:
        df[column] = pd.to_numeric(df[column], errors="coerce").astype(float)
    df["k"] = pd.to_numeric(df["k"], errors="coerce").astype("Int64")
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
    df["model_config"] = df["model_config"].map(lambda c: c if isinstance(c, dict) else {})
    df["config_key"] = df["model_config"].map(config_key)
    _structure_columns(df)
    df.attrs["manifests"] = manifests
    return df


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that tables and plots are built from."""
    return df[df["status"] == OK]


def failed_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with a status other than ok, less those whose (cell, metric) later succeeded (a resumed
    run may retry a failed cell)."""
    succeeded = set(zip(df.loc[df["status"] == OK, "cell_id"], df.loc[df["status"] == OK, "metric"], strict=True))
    retried = pd.Series([key in succeeded for key in zip(df["cell_id"], df["metric"], strict=True)], index=df.index,
                        dtype=bool)
    bad = df[(df["status"] != OK) & ~retried]
    return bad.drop_duplicates(subset=["cell_id", "metric", "status", "error"])
