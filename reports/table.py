"""The comparison table: model configs as rows, bounds and diagnostics as columns, one table
per (dataset, split) and unit (nats per example; bits/dim too for discrete data)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from reports.cells import CONTINUOUS_ELBO, LOSS_ELBO, bound_order, natural_sorted, sort_models, summarize
from reports.gap import LOG_MARGINAL_COLUMN, PAIRED, UNPAIRED
from reports.load import failed_rows
from reports.schema import method_settings
from reports.units import BITS_PER_DIM, BITS_SIGN, GAP_NATS, NATS, NLL_NATS, bits_per_dim_dims, nats_to_bits_per_dim

# Above this many KL layers (a VDM's z_1..z_T) the table shows their sum; the plot shows the profile.
MAX_KL_COLUMNS = 6

# Which way is better, per kind of column, in nats (None: neither, nothing is marked).
BETTER: dict[str, str] = {"bound": "max", "log_marginal": "max", "ais": "max", "throughput": "max"}
FLIPPED = {"max": "min", "min": "max"}


@dataclass(frozen=True)
class Column:
    id: str          # the column header, e.g. "IWAE_5"
    kind: str        # bound | log_marginal | note | gap | kl | active_units | throughput | seeds
    better: str | None


@dataclass
class ComparisonTable:
    dataset: str
    split: str
    unit: str                 # "nats" or "bits/dim"
    rows: list[str]           # model labels, in order
    columns: list[Column]
    cells: pd.DataFrame       # columns: row, column, kind, value, stderr, note, best
    # (row, column) -> why the row's model has no value there (an estimator not applicable to it, e.g. active
    # units of a model without posterior means): shown as a dash, never as a failure.
    not_applicable: dict[tuple[str, str], str] = field(default_factory=dict)
    part: str = ""            # which columns of a wide table this one holds ("bounds", "diagnostics"); "" all

    @property
    def title(self) -> str:
        part = f", {self.part}" if self.part else ""
        return f"{self.dataset} ({self.split}){part}, {UNIT_CAPTIONS[self.unit]}"

    @property
    def short_title(self) -> str:
        """"digits (test), nats: bounds", for a table of contents."""
        return f"{self.dataset} ({self.split}), {UNIT_SHORT[self.unit]}" + (f": {self.part}" if self.part else "")

    def cell(self, row: str, column: str) -> pd.Series:
        """The cell at (row label, column id); KeyError when the table has none there."""
        found = self.cells[(self.cells["row"] == row) & (self.cells["column"] == column)]
        if found.empty:
            raise KeyError((row, column))
        return found.iloc[0]


UNIT_CAPTIONS = {
    NATS: "nats per example (bounds and log p(x): higher is better)",
    BITS_PER_DIM: "bits/dim (bounds and log p(x) as negative log-likelihood: lower is better)",
    NLL_NATS: "test NLL in nats beside published numbers (lower is better; difference = measured - published)",
    GAP_NATS: ("gap = the model's own best log p(x) - each of its bounds, nats per example, with paired standard "
               "errors (per-example differences of cells that share examples and draws)"),
}

UNIT_SHORT = {NATS: "nats", BITS_PER_DIM: "bits/dim", NLL_NATS: "published NLL", GAP_NATS: "gap"}


def _kl_cells(s: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """KL cells and their column ids. A model with at most MAX_KL_COLUMNS layers gets a column per
    layer; one with more (a VDM's z_1..z_T) gets only "KL total" (the plot shows the profile): the
    measured total where the results hold one, else the sum of its layers with the sum of their
    stderrs (the bound for fully correlated layers, as all are measured on the same examples)."""
    kl = s[s["kind"] == "kl"].assign(note="")
    n_layers = kl.groupby("label")["column"].transform("size")
    few = kl[n_layers <= MAX_KL_COLUMNS]
    many = kl[n_layers > MAX_KL_COLUMNS]
    measured = s[(s["kind"] == "kl_total") & s["label"].isin(set(many["label"]))].assign(note="measured total")
    summed = (many[~many["label"].isin(set(measured["label"]))].groupby("label", sort=False)
              .agg(value=("value", "sum"), stderr=("stderr", "sum"), n_layers=("column", "size"))
              .reset_index())
    summed = summed.assign(column="KL total", kind="kl_total",
                           note=summed["n_layers"].map(lambda n: f"sum of {n} layers"))
    totals = pd.concat([measured, summed], ignore_index=True)
    columns = natural_sorted(few["column"].unique()) + (["KL total"] if not totals.empty else [])
    return pd.concat([few, totals], ignore_index=True), columns


def _active_unit_cells(s: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Active units: the total ("AU") for every model; per layer too for models with several layers."""
    au = s[s["kind"] == "active_units"].assign(note="")
    per_layer = au[au["column"] != "AU"]
    several = per_layer.groupby("label")["column"].transform("size") > 1
    cells = pd.concat([au[au["column"] == "AU"], per_layer[several]], ignore_index=True)
    return cells, natural_sorted(cells["column"].unique())


def _throughput(s: pd.DataFrame, rows: list[str]) -> tuple[list[dict], list[str]]:
    """The tightest bound's throughput on each device."""
    cells = []
    devices = sorted(s.loc[s["kind"] == "throughput", "device"].dropna().unique())
    for row in rows:
        mine = s[s["label"] == row]
        bounds = mine[mine["kind"] == "bound"]
        if bounds.empty:
            continue
        tightest = bounds.loc[bounds["value"].idxmax()]
        for device in devices:
            found = mine[mine["column"] == f"{tightest['column']}@{device}"]
            if not found.empty:
                cells.append({"row": row, "column": f"samples/s ({device})", "kind": "throughput",
                              "value": found["value"].iloc[0], "stderr": found["stderr"].iloc[0],
                              "note": f"at {tightest['column']}"})
    found = {cell["column"] for cell in cells}  # a device timed only at bounds other than the tightest: no column
    return cells, [column for column in (f"samples/s ({device})" for device in devices) if column in found]


def _log_marginal_note(cell: pd.Series) -> str:
    if cell["method"] == "exact":
        return "exact"
    if pd.notna(cell["k"]):
        return f"IWAE-{int(cell['k'])} estimate"
    name, settings = method_settings(cell["method"])
    described = ", ".join(f"{key} {value}" for key, value in settings.items())
    return f"{str(name).upper()} estimate ({described})" if settings else f"{name} estimate"


def _sampler_cells(s: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """AIS columns (note: the examples they average over, often fewer than the bounds') and one BDMC column
    per setting: the gap upper - lower, noted with the sandwich [lower, upper] in nats."""
    ais = s[s["kind"] == "ais"].copy()
    ais["note"] = ais["n_examples"].map(lambda n: f"{int(n)} examples" if pd.notna(n) else "")
    gaps = s[s["kind"] == "bdmc_gap"].copy()
    sides = s[s["kind"].isin(["bdmc_lower", "bdmc_upper"])].set_index(["label", "method", "kind"])["value"]

    def sandwich(gap: pd.Series) -> str:
        lower, upper = (sides.get((gap["label"], gap["method"], f"bdmc_{side}")) for side in ("lower", "upper"))
        if lower is None or upper is None:
            return ""
        return f"[{lower:.2f}, {upper:.2f}] nats, {int(gap['n_examples'])} simulated"

    gaps["note"] = [sandwich(gap) for _, gap in gaps.iterrows()]
    return (pd.concat([ais, gaps], ignore_index=True),
            natural_sorted(ais["column"].unique()) + natural_sorted(gaps["column"].unique()))


def _nats_table(s: pd.DataFrame, dataset: str, split: str) -> ComparisonTable:
    rows = sort_models(s)
    bounds = s[s["kind"] == "bound"]
    bound_ids = sorted(bounds["column"].unique(), key=bound_order)
    keep = s[s["kind"].isin(["bound", "log_marginal"])].copy()
    keep["note"] = ""
    logp = keep["kind"] == "log_marginal"
    keep.loc[logp, "note"] = keep[logp].apply(_log_marginal_note, axis=1)
    kl, kl_ids = _kl_cells(s)
    au, au_ids = _active_unit_cells(s)
    samplers, sampler_ids = _sampler_cells(s)
    derived, throughput_ids = _throughput(s, rows)
    seeds = s.groupby("label", sort=False)["n_seeds"].max().reset_index()
    seeds = seeds.rename(columns={"label": "row", "n_seeds": "value"})
    seeds = seeds.assign(column="seeds", kind="seeds", stderr=np.nan, note="")
    cells = pd.concat([
        seeds,
        keep.rename(columns={"label": "row"}),
        samplers.rename(columns={"label": "row"}),
        kl.rename(columns={"label": "row"}),
        au.rename(columns={"label": "row"}),
        pd.DataFrame.from_records(derived, columns=["row", "column", "kind", "value", "stderr", "note"]),
    ], ignore_index=True)[["row", "column", "kind", "value", "stderr", "note"]]
    cells["value"] = cells["value"].astype(float)
    cells["stderr"] = cells["stderr"].astype(float)
    column_ids = ["seeds", *bound_ids]
    if logp.any():
        column_ids.append("log p(x)")
    column_ids += sampler_ids + kl_ids + au_ids + throughput_ids
    kinds = cells.drop_duplicates("column").set_index("column")["kind"]
    columns = [Column(c, kinds[c], BETTER.get(kinds[c])) for c in column_ids]
    return ComparisonTable(dataset, split, NATS, rows, columns, cells)


def gap_table(s: pd.DataFrame, dataset: str, split: str) -> ComparisonTable | None:
    """Per model config: its reference log p(x) (exact, or its own best estimate) and the paired gap to each of
    its bounds (reports.gap); None where no model has one. Nothing is bold: each row has its own reference."""
    gaps = s[s["kind"] == "gap"]
    if gaps.empty:
        return None
    rows = [row for row in sort_models(s) if row in set(gaps["label"])]
    records = []
    for row in rows:
        mine = gaps[gaps["label"] == row]
        first = mine.iloc[0]
        source = s[(s["label"] == row) & ((s["kind"] == "log_marginal") if first["reference_column"] ==
                                          LOG_MARGINAL_COLUMN else (s["column"] == first["reference_column"]))]
        if not source.empty:
            records.append({"row": row, "column": LOG_MARGINAL_COLUMN, "kind": "log_marginal",
                            "value": source["value"].iloc[0], "stderr": source["stderr"].iloc[0],
                            "note": first["reference"] + ("" if (mine["pairing"] == PAIRED).all() else
                                                          f"; errors {UNPAIRED}")})
        records += [{"row": row, "column": gap["column"], "kind": "gap", "value": gap["value"],
                     "stderr": gap["stderr"], "note": gap["pairing"]} for _, gap in mine.iterrows()]
    cells = pd.DataFrame.from_records(records, columns=["row", "column", "kind", "value", "stderr", "note"])
    cells["value"] = cells["value"].astype(float)
    cells["stderr"] = cells["stderr"].astype(float)
    cells["best"] = False
    bound_ids = sorted(gaps["column"].unique(), key=bound_order)
    columns = [Column(LOG_MARGINAL_COLUMN, "log_marginal", None), *(Column(c, "gap", None) for c in bound_ids)]
    return ComparisonTable(dataset, split, GAP_NATS, rows, columns, cells)


def to_bits_per_dim(table: ComparisonTable, dims: int) -> ComparisonTable:
    """The same table in bits/dim: log-likelihoods become NLLs (-v / (D ln 2)), gap and KL scale by
    1 / (D ln 2), stderrs scale by 1 / (D ln 2); counts and throughput stay as they are."""
    cells = table.cells.copy()
    for kind, sign in BITS_SIGN.items():
        mine = cells["kind"] == kind
        converted = [nats_to_bits_per_dim(v, e, dims, sign)
                     for v, e in zip(cells.loc[mine, "value"], cells.loc[mine, "stderr"])]
        if converted:
            cells.loc[mine, ["value", "stderr"]] = np.array(converted, dtype=float)
    columns = [Column(c.id, c.kind, FLIPPED[c.better] if c.better and BITS_SIGN.get(c.kind, 1.0) < 0 else c.better)
               for c in table.columns]
    return ComparisonTable(table.dataset, table.split, BITS_PER_DIM, table.rows, columns, cells,
                           not_applicable=table.not_applicable)


def mark_best(table: ComparisonTable) -> ComparisonTable:
    """Set cells["best"]: the highest (or lowest, per column) value of each marked column; ties all marked."""
    best = pd.Series(False, index=table.cells.index)
    for column in table.columns if len(table.rows) > 1 else []:  # one row: nothing to be best among
        if column.better is None:
            continue
        mine = table.cells[(table.cells["column"] == column.id) & table.cells["value"].notna()]
        if mine.empty:
            continue
        extreme = mine["value"].max() if column.better == "max" else mine["value"].min()
        best[mine.index[np.isclose(mine["value"], extreme, rtol=1e-12, atol=0.0)]] = True
    table.cells["best"] = best
    return table


# A skipped estimator (its cell's row has status skipped: not applicable to the model) -> the table columns it
# would have filled; the row's model has a dash there, not a gap.
FILLS: dict[str, Callable[[Column], bool]] = {
    "active_units": lambda c: c.kind == "active_units",
    "kl_terms": lambda c: c.kind in ("kl", "kl_total"),
    "log_marginal": lambda c: c.kind == "log_marginal",
    "ais": lambda c: c.kind == "ais",
    "bdmc": lambda c: c.kind == "bdmc_gap",
    "diffusion_elbo": lambda c: c.id in (LOSS_ELBO, CONTINUOUS_ELBO),
}


def not_applicable(df: pd.DataFrame, s: pd.DataFrame, table: ComparisonTable) -> dict[tuple[str, str], str]:
    """(row, column) -> the skip's reason, for each column without a value that a skipped estimator of the row's
    model would have filled (FILLS)."""
    bad = failed_rows(df)
    skipped = bad[(bad["status"] == "skipped") & (bad["dataset"] == table.dataset) & (bad["split"] == table.split)]
    labels = s.drop_duplicates(["model", "config_hash"]).set_index(["model", "config_hash"])["label"]
    has_value = set(zip(table.cells.loc[table.cells["value"].notna(), "row"],
                        table.cells.loc[table.cells["value"].notna(), "column"]))
    found = {}
    for _, row in skipped.iterrows():
        label = labels.get((row["model"], row["config_hash"]))
        fills = FILLS.get(row["estimator"])
        if label is None or fills is None:
            continue
        for column in table.columns:
            if fills(column) and (label, column.id) not in has_value:
                found[(label, column.id)] = str(row["error"] or "not applicable to this model")
    return found


def build_tables(df: pd.DataFrame, summary: pd.DataFrame | None = None) -> list[ComparisonTable]:
    """Every comparison table of a results frame: per (dataset, split) in nats, and in bits/dim for discrete data.

    ``summary`` is ``summarize(df)``, where the caller has it already (it costs seconds on a full run)."""
    summary = summarize(df) if summary is None else summary
    tables = []
    if summary.empty:
        return tables
    for (dataset, split), s in summary.groupby(["dataset", "split"], sort=True):
        nats = _nats_table(s, dataset, split)
        nats.not_applicable = not_applicable(df, s, nats)
        tables.append(mark_best(nats))
        dims = bits_per_dim_dims(s)
        if dims is not None:
            tables.append(mark_best(to_bits_per_dim(nats, dims)))
        gaps = gap_table(s, dataset, split)
        if gaps is not None:
            tables.append(gaps)
    return tables
