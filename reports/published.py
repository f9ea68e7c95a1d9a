"""Published numbers beside measured ones (reports/data/published.csv, e.g. the IWAE paper's Table 1).

A published row is matched to the measured test log p(x) of the suite model its ``label`` names (the
`paper` and `mnist` suites use these labels) on its ``dataset``. The table shows both as negative
log-likelihoods in nats, and the difference measured - published where the published protocol is the
dataset's own; rows of another protocol (e.g. dynamic binarization) are shown, marked, without one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from reports.errors import ReportError
from reports.table import Column, ComparisonTable
from reports.units import NLL_NATS

PUBLISHED_FILE = Path(__file__).parent / "data" / "published.csv"
PUBLISHED_COLUMNS = ("source", "dataset", "protocol", "same_protocol", "layers", "objective", "k", "nll", "label")
MEASURED_SPLIT = "test"  # published numbers are test-set numbers

# Column ids; their notes (source, our model and how log p(x) was estimated, protocol) follow them.
PUBLISHED, MEASURED, DIFFERENCE = "published NLL", "measured NLL", "difference"


def load_published(path: Path = PUBLISHED_FILE) -> pd.DataFrame:
    """The published rows, checked: every column present, numbers numeric, same_protocol a boolean."""
    table = pd.read_csv(path, dtype={"same_protocol": str})
    missing = [c for c in PUBLISHED_COLUMNS if c not in table.columns]
    if missing:
        raise ReportError(f"{path}: missing column(s) {', '.join(missing)}")
    flags = table["same_protocol"].str.strip().str.lower()
    if not flags.isin(["true", "false"]).all():
        raise ReportError(f"{path}: same_protocol must be true or false")
    table["same_protocol"] = flags == "true"
    for column in ("layers", "k", "nll"):
        table[column] = pd.to_numeric(table[column], errors="raise")
    return table


def row_name(entry: pd.Series) -> str:
    protocol = "" if entry["same_protocol"] else f", {entry['protocol']}"
    return f"{entry['objective']} {int(entry['layers'])}L k={int(entry['k'])}{protocol}"


def published_tables(summary: pd.DataFrame, published: pd.DataFrame | None = None) -> list[ComparisonTable]:
    """One table per dataset that has measured test log p(x) for at least one published row."""
    published = load_published() if published is None else published
    if summary.empty:
        return []
    logp = summary[(summary["kind"] == "log_marginal") & (summary["split"] == MEASURED_SPLIT)]
    measured = {(row["dataset"], row["label"]): row for _, row in logp.iterrows()}
    tables = []
    for dataset, entries in published.groupby("dataset", sort=True):
        matched = [(entry, measured[(dataset, entry["label"])]) for _, entry in entries.iterrows()
                   if (dataset, entry["label"]) in measured]
        if matched:
            tables.append(_table(dataset, matched))
    return tables


def _table(dataset: str, matched: list[tuple[pd.Series, pd.Series]]) -> ComparisonTable:
    # Same-protocol rows first: they are the comparison; the others are context.
    matched = sorted(matched, key=lambda pair: (not pair[0]["same_protocol"], pair[0]["layers"],
                                                pair[0]["objective"], pair[0]["k"]))
    records = []
    for entry, cell in matched:
        name = row_name(entry)
        nll, stderr = -float(cell["value"]), float(cell["stderr"])
        estimate = f"IWAE-{int(cell['k'])}" if pd.notna(cell["k"]) else str(cell["method"])
        records.append((name, PUBLISHED, "published", float(entry["nll"]), np.nan, entry["source"]))
        records.append((name, MEASURED, "measured", nll, stderr, f"{entry['label']} ({estimate})"))
        if entry["same_protocol"]:
            records.append((name, DIFFERENCE, "difference", nll - float(entry["nll"]), stderr, "same protocol"))
        else:
            records.append((name, DIFFERENCE, "difference", np.nan, np.nan,
                            f"not compared: {entry['protocol']} is another protocol"))
    cells = pd.DataFrame.from_records(records, columns=["row", "column", "kind", "value", "stderr", "note"])
    cells["best"] = False  # nothing is marked: the point is the difference, not a winner
    columns = [Column(PUBLISHED, "published", None), Column(MEASURED, "measured", None),
               Column(DIFFERENCE, "difference", None)]
    rows = list(dict.fromkeys(cells["row"]))
    return ComparisonTable(dataset, MEASURED_SPLIT, NLL_NATS, rows, columns, cells)
