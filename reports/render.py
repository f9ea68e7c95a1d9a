"""Writers of the comparison tables: Markdown, LaTeX (booktabs), HTML fragments, and tidy CSV.
Each writer takes the tables and returns text; the best entry of a column is bold."""
from __future__ import annotations

import html
import io

import pandas as pd

from reports.formatting import cell_parts, plain_text
from reports.table import ComparisonTable

NOTE_COLUMNS = {"log p(x)": "log p(x) from", "published NLL": "source",
                "measured NLL": "our model", "difference": "protocol"}
# Columns named by their settings (AIS and BDMC) carry a note by kind.
NOTE_KINDS = {"ais": "on", "bdmc_gap": "BDMC [lower, upper]"}


def _note_header(column) -> str | None:
    return NOTE_COLUMNS.get(column.id) or NOTE_KINDS.get(column.kind)


def _grid(table: ComparisonTable, render_cell, render_note) -> tuple[list[str], list[list[str]]]:
    """Header and body rows of a table, each cell rendered by the given functions; the
    log p(x) source (or a gap table's reference) follows its column as a short note."""
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
            line.append("" if empty else render_cell(cell, table.unit))
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
    header, body = _grid(table, _tex_cell, tex_escape)
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


def html_table(table: ComparisonTable, flags: dict | None = None) -> str:
    """A sortable table (the page's script sorts on a header click); a flags column where trust flags apply."""
    header, body = _grid(table, _html_cell, lambda note: f"<td class=\"note\">{html.escape(note)}</td>")
    mine = {row: (flags or {}).get((table.dataset, row), []) for row in table.rows}
    flagged = any(mine.values())
    names = [header[0], *(["flags"] if flagged else []), *header[1:]]
    out = [f"<table class=\"comparison sortable\">\n<caption>{html.escape(table.title)}</caption>",
           "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in names) + "</tr></thead>", "<tbody>"]
    for line in body:
        cells = [c if c.startswith("<td") else "<td></td>" for c in line[1:]]
        flag_cell = [f"<td class=\"flags\">{_html_flags(mine[line[0]])}</td>"] if flagged else []
        out.append("<tr><th scope=\"row\">" + html.escape(line[0]) + "</th>" + "".join(flag_cell + cells) + "</tr>")
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
