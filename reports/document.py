"""Whole report documents: Markdown, LaTeX and a self-contained HTML page (plots as base64 PNG)."""
from __future__ import annotations

import base64
import html

import pandas as pd

from reports.render import html_table, latex_table, markdown_table, tex_escape
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
                      plot_files: list[str]) -> str:
    parts = ["# elbo-bench report", "", SEED_NOTE, "Best value per column in bold.", ""]
    for table in tables:
        parts += [f"## {table.title}", "", markdown_table(table), ""]
    if plot_files:
        parts += ["## Plots", ""] + [f"![{name}]({name})" for name in plot_files] + [""]
    parts += ["## Provenance", ""]
    for run_dir, fields in provenance(manifests):
        parts += [f"### {run_dir}", ""] + [f"- **{field}**: {text}" for field, text in fields] + [""]
    parts += _markdown_failed(failed)
    return "\n".join(parts)


def _markdown_failed(failed: pd.DataFrame) -> list[str]:
    if failed.empty:
        return ["## Failed cells", "", "None.", ""]
    table = failed_table(failed)
    lines = ["## Failed cells", "", "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(v.replace("|", "\\|").replace("\n", " ") for v in row) + " |"
              for row in table.itertuples(index=False)]
    return [*lines, ""]


# ---- LaTeX

def latex_document(tables: list[ComparisonTable]) -> str:
    """The tables as LaTeX fragments (needs \\usepackage{booktabs})."""
    header = ["% elbo-bench comparison tables; needs \\usepackage{booktabs}", f"% {tex_escape(SEED_NOTE)}", ""]
    return "\n".join(header + [latex_table(t) + "\n" for t in tables])


# ---- HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
caption { text-align: left; font-weight: bold; padding: 0.3em 0; }
th, td { border-bottom: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child, table.meta td, table.failed td { text-align: left; }
thead th { border-bottom: 2px solid #444; }
img { max-width: 100%; display: block; margin: 1em 0; }
"""


def html_document(tables: list[ComparisonTable], manifests: dict, failed: pd.DataFrame,
                  images: dict[str, bytes], plot_note: str | None) -> str:
    parts = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\"><title>elbo-bench report</title>",
             f"<style>{STYLE}</style></head><body>", "<h1>elbo-bench report</h1>",
             f"<p>{html.escape(SEED_NOTE)} Best value per column in bold.</p>"]
    for table in tables:
        parts.append(html_table(table))
    parts.append("<h2>Plots</h2>")
    if plot_note:
        parts.append(f"<p>{html.escape(plot_note)}</p>")
    for name, png in images.items():
        encoded = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><img alt=\"{html.escape(name)}\" src=\"data:image/png;base64,{encoded}\">"
                     f"<figcaption>{html.escape(name)}</figcaption></figure>")
    parts.append("<h2>Provenance</h2>")
    for run_dir, fields in provenance(manifests):
        rows = "".join(f"<tr><th>{html.escape(f)}</th><td>{html.escape(t)}</td></tr>" for f, t in fields)
        parts.append(f"<table class=\"meta\"><caption>{html.escape(run_dir)}</caption>{rows}</table>")
    parts.append("<h2>Failed cells</h2>")
    if failed.empty:
        parts.append("<p>None.</p>")
    else:
        table = failed_table(failed)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
                       for row in table.itertuples(index=False))
        parts.append(f"<table class=\"failed\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    parts.append("</body></html>")
    return "\n".join(parts)
