"""Writers of the comparison tables: Markdown, LaTeX (booktabs), HTML fragments, and tidy CSV.
Each writer takes the tables and returns text; the best entry of a column is bold."""
from __future__ import annotations

import html
import io
from dataclasses import replace

import pandas as pd

from reports.formatting import cell_parts, plain_text
from reports.table import ComparisonTable

NOTE_COLUMNS = {"log p(x)": "log p(x) from", "published NLL": "source",
                "measured NLL": "our model", "difference": "protocol"}
# Columns named by their settings (AIS and BDMC) carry a note by kind.
NOTE_KINDS = {"ais": "on", "bdmc_gap": "BDMC [lower, upper]"}


NOT_APPLICABLE = "–"  # a cell of an estimator that does not apply to the row's model (its row was skipped)


def _note_header(column) -> str | None:
    return NOTE_COLUMNS.get(column.id) or NOTE_KINDS.get(column.kind)


# ---- Wide tables in parts

# About the characters of a table row that fit a 1400 px window in the HTML page (table text at 0.78 of 16 px: a
# digit about 7 px, a cell's padding about 2 characters); Markdown and LaTeX split at the same place.
TABLE_CHARS = 165
CELL_PAD = 2
# Which columns go together when a table is too wide: the bounds with their reference, the sampling estimates of
# log p(x), the diagnostics; any other kind of column follows in a last part.
PARTS = (("bounds", ("seeds", "bound", "log_marginal")), ("log p(x) by AIS and BDMC", ("ais", "bdmc_gap")),
         ("diagnostics", ("kl", "kl_total", "active_units", "throughput")))


def _column_chars(table: ComparisonTable, column) -> int:
    """Characters one column (with its note column) takes: its widest cell, or its header's longest word
    (headers may wrap between words, numbers never)."""
    mine = table.cells[(table.cells["column"] == column.id) & table.cells["value"].notna()]
    texts = [plain_text(cell, table.unit) for _, cell in mine.iterrows()]
    words = column.id.split()
    width = max([len(t) for t in texts] + [len(w) for w in words]) + CELL_PAD
    note = _note_header(column)
    if note:
        notes = [str(n) for n in mine["note"]] if "note" in mine else []
        width += max([len(n) for n in notes] + [len(w) for w in note.split()]) + CELL_PAD
    return width


def split_wide(table: ComparisonTable) -> list[ComparisonTable]:
    """The table as it is where it fits TABLE_CHARS; else in parts (PARTS, each cut again where it alone is too
    wide), every part with all rows, the row labels repeated."""
    widths = {column.id: _column_chars(table, column) for column in table.columns}
    labels = max([len(row) for row in table.rows] + [len("model")]) + CELL_PAD
    if labels + sum(widths.values()) <= TABLE_CHARS:
        return [table]
    kinds = {kind: name for name, members in PARTS for kind in members}
    groups: dict[str, list] = {}
    for column in table.columns:
        groups.setdefault(kinds.get(column.kind, "more"), []).append(column)
    parts = []
    for name, columns in groups.items():
        chunks, used = [[]], labels
        for column in columns:
            if chunks[-1] and used + widths[column.id] > TABLE_CHARS:
                chunks.append([])
                used = labels
            chunks[-1].append(column)
            used += widths[column.id]
        for i, chunk in enumerate(chunks, start=1):
            ids = {column.id for column in chunk}
            parts.append(replace(table, columns=chunk, cells=table.cells[table.cells["column"].isin(ids)],
                                 part=name if len(chunks) == 1 else f"{name} ({i} of {len(chunks)})"))
    return parts


def shown_tables(tables: list[ComparisonTable]) -> list[ComparisonTable]:
    """The tables as documents show them: wide ones in parts (split_wide)."""
    return [part for table in tables for part in split_wide(table)]


def _grid(table: ComparisonTable, render_cell, render_note, render_na=lambda reason: NOT_APPLICABLE
          ) -> tuple[list[str], list[list[str]]]:
    """Header and body rows of a table, each cell rendered by the given functions (a column not applicable to the
    row's model by render_na, from its reason); the log p(x) source (or a gap table's reference) follows its column
    as a short note."""
    header = ["model"]
    for column in table.columns:
        header.append(column.id)
        if _note_header(column):
            header.append(_note_header(column))
    body = []
    for row in table.rows:
        line = [row]
        for column in table.columns:
            try:
                cell = table.cell(row, column.id)
            except KeyError:
                cell = None
            empty = cell is None or pd.isna(cell["value"])  # e.g. no difference across protocols
            reason = table.not_applicable.get((row, column.id))
            line.append(render_cell(cell, table.unit) if not empty else "" if reason is None else render_na(reason))
            if _note_header(column):
                line.append("" if cell is None else render_note(cell["note"]))
        body.append(line)
    return header, body


# ---- Markdown

def _md_cell(cell: pd.Series, unit: str) -> str:
    text = plain_text(cell, unit)
    return f"**{text}**" if cell["best"] else text


MD_SPECIALS = "\\`*_[]<>|#"


def md_escape(text: str) -> str:
    """Text as Markdown shows it literally: its specials (\\ ` * _ [ ] < > | #) backslash-escaped."""
    return "".join("\\" + char if char in MD_SPECIALS else char for char in str(text))


def markdown_table(table: ComparisonTable, flags: dict | None = None) -> str:
    """The table in Markdown; labels and notes escaped, numbers bold where best, trust flags after the label."""
    header, body = _grid(table, _md_cell, md_escape)
    lines = ["| " + " | ".join(map(md_escape, header)) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for line in body:
        names = [name for name, _ in (flags or {}).get((table.dataset, line[0]), [])]
        label = md_escape(line[0]) + (f" ({', '.join(names)})" if names else "")
        lines.append("| " + " | ".join([label, *line[1:]]) + " |")
    return "\n".join(lines)


# ---- LaTeX (booktabs)

TEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    return "".join(TEX_SPECIALS.get(char, char) for char in str(text))


def _tex_cell(cell: pd.Series, unit: str) -> str:
    """$v \\pm e$; the best in \\mathbf inside math mode (\\textbf around $...$ leaves math unbold)."""
    value, stderr = cell_parts(cell, unit)
    text = value if stderr is None else f"{value} \\pm {stderr}"
    return f"$\\mathbf{{{text}}}$" if cell["best"] else f"${text}$"


def latex_table(table: ComparisonTable) -> str:
    header, body = _grid(table, _tex_cell, tex_escape, lambda reason: "--")
    lines = [
        r"\begin{table}[ht]", r"\centering", r"\small",
        f"\\caption{{{tex_escape(table.title)}; mean $\\pm$ standard error over examples and seeds, best in bold}}",
        r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
        " & ".join(map(tex_escape, header)) + r" \\", r"\midrule",
    ]
    lines += [" & ".join([tex_escape(line[0]), *line[1:]]) + r" \\" for line in body]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


# ---- HTML

def _html_cell(cell: pd.Series, unit: str) -> str:
    """The cell's text (value and its stderr kept on one line) with its value for sorting in data-v."""
    value, stderr = cell_parts(cell, unit)
    text = html.escape(value if stderr is None else f"{value} ± {stderr}")
    text = f"<strong>{text}</strong>" if cell["best"] else text
    return f"<td class=\"num\" data-v=\"{float(cell['value'])!r}\">{text}</td>"


def _html_flags(flags: list[tuple[str, str]]) -> str:
    return " ".join(f"<span class=\"flag\" title=\"{html.escape(detail)}\">{html.escape(name)}</span>"
                    for name, detail in flags)


def _html_not_applicable(reason: str) -> str:
    return f"<td class=\"na\" title=\"not applicable: {html.escape(reason)}\">{NOT_APPLICABLE}</td>"


def html_table(table: ComparisonTable, flags: dict | None = None) -> str:
    """A sortable table (the page's script sorts on a header click); a row's trust flags under its label."""
    header, body = _grid(table, _html_cell, lambda note: f"<td class=\"note\">{html.escape(note)}</td>",
                         _html_not_applicable)
    mine = {row: (flags or {}).get((table.dataset, row), []) for row in table.rows}
    out = [f"<table class=\"comparison sortable\">\n<caption>{html.escape(table.title)}</caption>",
           "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>", "<tbody>"]
    for line in body:
        cells = [c if c.startswith("<td") else "<td></td>" for c in line[1:]]
        flagged = f"<div class=\"flags\">{_html_flags(mine[line[0]])}</div>" if mine[line[0]] else ""
        out.append("<tr><th scope=\"row\">" + html.escape(line[0]) + flagged + "</th>" + "".join(cells) + "</tr>")
    out.append("</tbody>\n</table>")
    return "\n".join(out)


# ---- CSV (tidy: one row per cell, numbers unformatted)

CSV_COLUMNS = ["dataset", "split", "unit", "model", "column", "kind", "value", "stderr", "note", "best"]


def tables_csv(tables: list[ComparisonTable]) -> str:
    frames = [t.cells.rename(columns={"row": "model"}).assign(dataset=t.dataset, split=t.split, unit=t.unit)
              for t in tables]
    buffer = io.StringIO()
    pd.concat(frames, ignore_index=True)[CSV_COLUMNS].to_csv(buffer, index=False)
    return buffer.getvalue()
