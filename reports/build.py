"""build_report: run directories -> report files in the requested formats."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from reports.cells import summarize
from reports.document import html_document, latex_document, markdown_document
from reports.errors import ReportError
from reports.flags import flags_by_label, trust_flags
from reports.load import failed_rows, load_results, ok_rows
from reports.published import published_tables
from reports.render import tables_csv
from reports.schema import write_atomic
from reports.table import ComparisonTable, build_tables

if TYPE_CHECKING:  # the plotting module is imported lazily (tables need no plotting library)
    from reports.plots import Figures

DEFAULT_FORMATS = ("md", "html")
REPORT_SUBDIR = "report"


@dataclass
class ReportInputs:
    """Everything a format writer may need, computed once."""
    results: pd.DataFrame
    tables: list[ComparisonTable]
    failed: pd.DataFrame
    manifests: dict
    summary: pd.DataFrame | None = None
    flags: dict | None = None  # (dataset, row label) -> [(flag, detail), ...] (reports.flags)
    _figures: Figures | None = None

    def figures(self) -> Figures:
        """The plots as {name: {"png": bytes, "svg": bytes}}, and those not drawn with why (rendered once;
        ReportError without the [plot] extra)."""
        if self._figures is None:
            from reports.plots import render_figures  # lazy: tables need no plotting library
            self._figures = render_figures(self.summary, self.results, formats=("png", "svg"))
        return self._figures

    def images(self) -> dict[str, bytes]:
        """The plots as PNG bytes."""
        return {name: files["png"] for name, files in self.figures().files.items()}

    def not_drawn(self) -> dict[str, str]:
        """Plots left out on purpose: name -> why ({} without the [plot] extra)."""
        try:
            return self.figures().not_drawn
        except ReportError:
            return {}


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    """The whole file or, after a crash, the previous one (reports.schema.write_atomic)."""
    write_atomic(path, lambda f: f.write(payload))


def _write(path: Path, text: str) -> list[Path]:
    write_bytes_atomic(path, text.encode("utf-8"))
    return [path]


def _write_png(inputs: ReportInputs, out_dir: Path) -> list[Path]:
    """Each plot as PNG, with an SVG of it beside."""
    paths = []
    for name, files in inputs.figures().files.items():
        for fmt, payload in files.items():
            path = out_dir / f"{name}.{fmt}"
            write_bytes_atomic(path, payload)
            paths.append(path)
    return paths


def _write_html(inputs: ReportInputs, out_dir: Path) -> list[Path]:
    try:
        images, note = inputs.images(), None
    except ReportError as exc:  # the HTML report still holds the tables without the [plot] extra
        images, note = {}, f"No plots: {exc}"
    return _write(out_dir / "report.html", html_document(inputs.tables, inputs.manifests, inputs.failed, images, note,
                                                         summary=inputs.summary, flags=inputs.flags,
                                                         not_drawn=inputs.not_drawn()))


def _write_md(inputs: ReportInputs, out_dir: Path, plot_files: list[str]) -> list[Path]:
    """report.md, linking the plots: those written in this call, else written now beside it (where the
    [plot] extra is installed; without it the Markdown holds the tables only)."""
    written: list[Path] = []
    if not plot_files:
        try:
            written = _write_png(inputs, out_dir)
        except ReportError:
            written = []
        plot_files = [p.name for p in written if p.suffix == ".png"]
    text = markdown_document(inputs.tables, inputs.manifests, inputs.failed, plot_files, flags=inputs.flags,
                             not_drawn=inputs.not_drawn())
    return written + _write(out_dir / "report.md", text)


# format -> writer(inputs, out_dir, png file names written in this call) -> written paths
WRITERS: dict[str, Callable[[ReportInputs, Path, list[str]], list[Path]]] = {
    "png": lambda inputs, out_dir, _: _write_png(inputs, out_dir),
    "md": _write_md,
    "tex": lambda inputs, out_dir, _: _write(out_dir / "report.tex", latex_document(inputs.tables)),
    "csv": lambda inputs, out_dir, _: _write(out_dir / "comparison.csv", tables_csv(inputs.tables)),
    "html": lambda inputs, out_dir, _: _write_html(inputs, out_dir),
}
FORMATS = ("md", "html", "tex", "csv", "png")  # the choices, as shown to users
assert set(FORMATS) == set(WRITERS)


def check_formats(formats: Iterable[str]) -> list[str]:
    """The formats in writing order (png first, so Markdown can link the plots); ReportError on an unknown one."""
    formats = [f.strip().lower() for f in formats if f.strip()]
    unknown = sorted(set(formats) - set(WRITERS))
    if unknown:
        raise ReportError(f"unknown report format {', '.join(map(repr, unknown))}; choose from {', '.join(FORMATS)}")
    if not formats:
        raise ReportError(f"no report format given; choose from {', '.join(FORMATS)}")
    return [f for f in WRITERS if f in formats]


def build_report(run_dirs: list[Path], *, formats: Iterable[str] = DEFAULT_FORMATS,
                 out_dir: Path | None = None) -> list[Path]:
    """Write the report of the given run directories; returns the files written.

    formats: any of md, html, tex, csv, png. out_dir defaults to the first run directory's report/.
    Raises ReportError on bad input (no run directory, no results, unknown format, missing [plot]
    extra when png is asked for).
    """
    formats = check_formats(formats)
    run_dirs = [Path(d) for d in run_dirs]
    results = load_results(run_dirs)
    summary = summarize(results)
    tables = build_tables(results, summary)
    tables += published_tables(summary)  # empty unless a published row's model was measured
    if not tables:
        n_ok = len(ok_rows(results))
        raise ReportError(f"no results to report in {', '.join(map(str, run_dirs))}: "
                          f"{len(results)} rows, {n_ok} with status ok, none holding a bound or diagnostic")
    flags = flags_by_label(trust_flags(results, summary), summary)
    inputs = ReportInputs(results, tables, failed_rows(results), results.attrs.get("manifests", {}), summary, flags)
    out_dir = Path(out_dir) if out_dir is not None else run_dirs[0] / REPORT_SUBDIR
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for fmt in formats:
        written += WRITERS[fmt](inputs, out_dir, [p.name for p in written if p.suffix == ".png"])
    return written
