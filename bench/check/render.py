"""The check's plain-text report: one section per kind of finding, then a verdict line."""
from __future__ import annotations

from pathlib import Path

from .cells import describe_key
from .compare import CheckResult
from .rules import FINDING_KINDS, Finding, compare_throughput, policy_of


def _number(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None) -> str:
    return "" if value is None else f"{value:+.4f}"


def format_table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """Columns padded to their widest entry; the columns in ``right`` (numbers) right-aligned."""
    widths = [max(len(line[column]) for line in [header, *rows]) for column in range(len(header))]
    def line(cells: list[str]) -> str:
        padded = [cell.rjust(width) if column in right else cell.ljust(width)
                  for column, (cell, width) in enumerate(zip(cells, widths))]
        return "  ".join(padded).rstrip()
    return [line(header), line(["-" * width for width in widths]), *map(line, rows)]


def _finding_row(finding: Finding) -> list[str]:
    is_ratio = policy_of(finding.key[-1]) is compare_throughput
    change = "" if finding.change is None else f"{finding.change:.2f}x" if is_ratio else _signed(finding.change)
    tolerance = "" if finding.tolerance is None else f"{finding.tolerance:.2f}x" if is_ratio \
        else _number(finding.tolerance)
    return [describe_key(finding.key), _number(finding.baseline), _number(finding.run), change, tolerance,
            finding.note]


def render(result: CheckResult, run_dir: Path, baseline_path: Path) -> str:
    settings = result.settings
    ratio = "off" if settings.throughput_ratio is None else f"{settings.throughput_ratio:g}x"
    lines = [f"bench check: {run_dir} against {baseline_path}",
             (f"tolerance: {settings.floor:g} nats + {settings.z:g} x the standard error of the change (paired over "
              f"examples where both sides keep them, else Monte Carlo, else over examples); throughput ratio: {ratio}"
              + ("" if settings.throughput_ratio is None else
                 f" and a Mann-Whitney U test at level {settings.throughput_alpha:g}"))]
    for text in result.config_changes:
        lines.append(f"model config changed: {text} (its cells show as missing on both sides)")
    header = ["cell", "baseline", "run", "change", "tolerance", "note"]
    for kind in FINDING_KINDS:
        section = [finding for finding in result.findings if finding.kind == kind]
        if not section:
            continue
        lines += ["", f"{kind.upper()} ({len(section)})"]
        lines += format_table(header, [_finding_row(finding) for finding in section], right={1, 2, 3, 4})
    counts = ", ".join(f"{result.count(kind)} {kind}" for kind in FINDING_KINDS)
    verdict = "FAIL" if result.failed else "PASS"
    lines += ["", f"{verdict}: {result.compared} cells compared; {counts}"]
    stale = [kind for kind in ("improvement", "missing in run") if result.count(kind)]
    if stale:
        counted = " and ".join(f"{result.count(kind)} {kind}" for kind in stale)
        lines.append(f"the baseline is stale ({counted}): if the change is intended, rewrite the baseline "
                     f"(python -m bench check {run_dir} --write-baseline {baseline_path}) and say why in the commit")
    # The conventional closing line of a test runner, so CI logs read the same as pytest's.
    failed = result.count("regression") + result.count("improvement")  # the compared cells that fail
    lines.append(f"check: {result.compared - failed} passed, {failed} failed")
    return "\n".join(lines)
