"""Whole report documents: Markdown and LaTeX here; the self-contained HTML page in reports.page."""
from __future__ import annotations

import pandas as pd

from reports.page import html_page
from reports.render import latex_table, markdown_table, md_escape, shown_tables, tex_escape
from reports.table import ComparisonTable

PROVENANCE_FIELDS = ("run_id", "git_commit", "versions", "device", "device_name", "threads", "command",
                     "started", "finished")
FAILED_COLUMNS = ["dataset", "model", "config_hash", "seed", "estimator", "k", "metric", "status", "error"]
SEED_NOTE = ("Mean ± standard error over examples and seeds: mean over seeds; "
             "stderr = sqrt(mean of squared per-seed stderrs + variance of seed means / seeds).")


def _field_text(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "" if value is None else str(value)


def provenance(manifests: dict[str, dict]) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(run dir, [(field, text), ...]), ...] from the manifests."""
    return [(run_dir, [(field, _field_text(manifest.get(field))) for field in PROVENANCE_FIELDS]
             if manifest else [("manifest", "missing (no manifest.json)")])
            for run_dir, manifest in manifests.items()]


def failed_table(failed: pd.DataFrame) -> pd.DataFrame:
    table = failed.reindex(columns=FAILED_COLUMNS).astype(object)
    table["config_hash"] = table["config_hash"].astype(str).str[:8]
    return table.map(lambda v: "" if v is None or v is pd.NA or (isinstance(v, float) and v != v) else str(v))


# ---- Markdown

def markdown_document(tables: list[ComparisonTable], manifests: dict, failed: pd.DataFrame,
                      plot_files: list[str], flags: dict | None = None, not_drawn: dict[str, str] | None = None) -> str:
    parts = ["# elbo-bench report", "", SEED_NOTE, "Best value per column in bold; trust flags in brackets after a "
             "model (see the HTML report's definitions).", ""]
    for table in shown_tables(tables):  # wide tables in parts
        parts += [f"## {md_escape(table.title)}", "", markdown_table(table, flags), ""]
    if plot_files or not_drawn:
        parts += ["## Plots", ""] + [f"![{name}]({name})" for name in plot_files] + [""]  # our own file names
        parts += [f"- {md_escape(name)} not drawn: {md_escape(reason)}" for name, reason in (not_drawn or {}).items()]
        parts += [""] if not_drawn else []
    parts += ["## Provenance", ""]
    for run_dir, fields in provenance(manifests):
        parts += [f"### {md_escape(run_dir)}", ""] + [f"- **{field}**: {md_escape(text)}" for field, text in fields]
        parts += [""]
    parts += _markdown_failed(failed)
    return "\n".join(parts)


def _markdown_failed(failed: pd.DataFrame) -> list[str]:
    if failed.empty:
        return ["## Failed and not-applicable cells", "", "None.", ""]
    table = failed_table(failed)
    lines = ["## Failed and not-applicable cells", "", "| " + " | ".join(table.columns) + " |",
             "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(md_escape(v).replace("\n", " ") for v in row) + " |"
              for row in table.itertuples(index=False)]
    return [*lines, ""]


# ---- LaTeX

def latex_document(tables: list[ComparisonTable]) -> str:
    """The tables as LaTeX fragments (needs \\usepackage{booktabs})."""
    header = ["% elbo-bench comparison tables; needs \\usepackage{booktabs}", f"% {tex_escape(SEED_NOTE)}", ""]
    return "\n".join(header + [latex_table(t) + "\n" for t in shown_tables(tables)])


# ---- HTML

def html_document(tables: list[ComparisonTable], manifests: dict, failed: pd.DataFrame,
                  images: dict[str, bytes], plot_note: str | None, *, summary: pd.DataFrame | None = None,
                  flags: dict | None = None, not_drawn: dict[str, str] | None = None) -> str:
    """The self-contained HTML page (reports.page)."""
    return html_page(tables, manifests, failed_table(failed) if not failed.empty else None, images, plot_note,
                     summary=summary, flags=flags or {}, provenance=provenance(manifests), seed_note=SEED_NOTE,
                     not_drawn=not_drawn or {})
