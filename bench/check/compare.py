"""A run compared with a baseline, cell by cell: findings sorted into the report's sections."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace

from .cells import KEY_FIELDS, CellKey, CheckInputError, cell_key, describe_key, sort_key
from .rules import FINDING_KINDS, KHAT_SHARE, Finding, Settings, active_comparison


def rows_by_key(rows: Iterable[dict]) -> dict[CellKey, dict]:
    """One row per cell; a cell written twice (two suite entries with one model config) is bad input."""
    by_key: dict[CellKey, dict] = {}
    for row in rows:
        key = cell_key(row)
        if key in by_key:
            labels = sorted({str(by_key[key].get("label")), str(row.get("label"))})
            raise CheckInputError(f"the run holds the cell {describe_key(key)} twice (labels {', '.join(labels)}): "
                                  f"entries of one model need distinct configs to be told apart")
        by_key[key] = row
    return by_key


@dataclass(frozen=True)
class CheckResult:
    findings: list[Finding]
    compared: int  # cells present on both sides and compared
    config_changes: list[str]  # "dataset/split model: baseline abc -> run def"
    settings: Settings

    def count(self, kind: str) -> int:
        return sum(finding.kind == kind for finding in self.findings)

    @property
    def failed(self) -> bool:
        fails = {kind for kind, fails in FINDING_KINDS.items() if fails}
        if self.settings.fail_on_new:
            fails.add("new in run")
        return any(finding.kind in fails for finding in self.findings)


def _config_changes(missing: list[CellKey], new: list[CellKey]) -> dict[tuple, str]:
    """(dataset, split, model) -> "baseline h1 -> run h2" where the model's config_hash differs between sides."""
    def hashes(keys: list[CellKey]) -> dict[tuple, set]:
        found: dict[tuple, set] = defaultdict(set)
        for key in keys:
            cell = dict(zip(KEY_FIELDS, key, strict=True))
            found[(cell["dataset"], cell["split"], cell["model"])].add(str(cell["config_hash"]))
        return found

    old, now = hashes(missing), hashes(new)
    return {model: f"baseline {', '.join(sorted(old[model]))} -> run {', '.join(sorted(now[model]))}"
            for model in sorted(set(old) & set(now))}


def with_khat_share(rows: dict[CellKey, dict]) -> dict[CellKey, dict]:
    """Each row with the khat_share of its cell (the value of the cell's khat_share row; None without one)."""
    shares = {key[:-1]: row.get("value") for key, row in rows.items() if key[-1] == KHAT_SHARE}
    return {key: {**row, KHAT_SHARE: shares.get(key[:-1])} for key, row in rows.items()}


def compare(baseline: dict[CellKey, dict], run_rows: list[dict], settings: Settings) -> CheckResult:
    run = with_khat_share(rows_by_key(row for row in run_rows if row.get("status") != "skipped"))
    findings: list[Finding] = []
    # A failed cell may carry no metric nor method; it covers every baseline metric of the same cell.
    failed_cells = {key[:-2] for key, row in run.items() if row.get("status") == "failed"}
    compared = 0
    for key in sorted(run, key=sort_key):
        row = run[key]
        if row.get("status") == "failed":
            findings.append(Finding("regression", key, baseline.get(key, {}).get("value"), None, None, None,
                                    f"failed: {row.get('error') or 'no error message'}"))
            continue
        comparison = active_comparison(row["metric"], settings)
        if comparison is None:
            continue
        if key not in baseline:
            findings.append(Finding("new in run", key, None, row["value"], None, None, "not in the baseline"))
            continue
        compared += 1
        finding = comparison(baseline[key], row, settings)
        if finding is not None:
            findings.append(finding)
    for key in sorted(baseline, key=sort_key):
        if key not in run and key[:-2] not in failed_cells and active_comparison(key[-1], settings) is not None:
            findings.append(Finding("missing in run", key, baseline[key]["value"], None, None, None,
                                    "not in the run"))
    missing = [f.key for f in findings if f.kind == "missing in run"]
    new = [f.key for f in findings if f.kind == "new in run"]
    changes = _config_changes(missing, new)
    if changes:
        findings = [replace(f, note="model config changed")
                    if f.kind in ("missing in run", "new in run") and (f.key[0], f.key[1], f.key[2]) in changes
                    else f for f in findings]
    config_lines = [f"{dataset}/{split} {model}: {text}" for (dataset, split, model), text in changes.items()]
    return CheckResult(findings, compared, config_lines, settings)
