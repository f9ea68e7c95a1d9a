"""Bound-tightness regression check: `python -m bench check RUN_DIR --baseline FILE`.

Compares every bound of a run (results.jsonl) with a committed baseline, cell by
cell, and exits 1 when a bound got looser than the noise allows, 0 otherwise,
2 on bad input. `--write-baseline FILE` turns a clean run into a baseline.

Cells match on (dataset, split, model, config_hash, estimator, k, seed, metric).
What is compared depends on the metric (METRIC_POLICIES):

* bounds (elbo, iwae, log_marginal, diffusion_elbo) are higher-is-better: a drop larger than the
  tolerance is a regression, a rise larger than it an improvement;
* KL terms (kl, kl/<layer>) and the diffusion ELBO's parts are neither better nor worse when they move, so a
  significant change is shown as information and never fails;
* throughput (throughput, examples_per_s) is compared as a run/baseline ratio,
  only when --throughput-ratio is given: timings depend on the machine and its
  load, so by default CI never fails on time.

The tolerance of a bound is  floor + z * sqrt(se_baseline^2 + se_run^2)  where
se is the Monte Carlo standard error (mc_stderr) when both sides have one, else
the standard error over examples (stderr):

* Monte Carlo error first: a run and its baseline evaluate the same examples
  (same dataset seed and split), so the example-to-example spread is common to
  both and cancels in their difference; what differs is the Monte Carlo draws.
  The over-examples stderr is the fallback where no Monte Carlo error exists
  (a single-draw ELBO); it is larger, so the fallback errs towards passing.
* z = 4 by default: the check tests on the order of a hundred cells at once, and
  a one-sided 4-sigma test keeps the chance of a false alarm per cell near 3e-5
  (well under 1% for the whole suite); it also leaves room for the delta-method
  IWAE error, which understates the error when the weights are heavy-tailed.
* floor = 0.05 nats per example by default: results of a trained model are not
  bit-for-bit across BLAS builds, thread counts and platforms, and a rounding
  difference early in training moves the final bound by a few hundredths of a
  nat. 0.05 nats is far below the gaps the benchmark exists to resolve (ELBO vs
  IWAE-K differ by tenths to whole nats) and below the 0.5-nat loosening the
  tests inject.

A cell present on only one side is reported (and fails only with --fail-on-missing);
when a model's config_hash differs between the two sides the report says "model
config changed", since every cell of that model then shows up as missing on both
sides. A failed cell (status "failed") in the run is a regression: a bound that
cannot be computed is not tight.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from .store import MANIFEST_FILE, RESULTS_FILE, read_jsonl

BASELINE_FORMAT = "elbo-bench-baseline"
BASELINE_FORMAT_VERSION = 1

# Defaults of the tolerance; the module docstring says why each has its value.
DEFAULT_Z = 4.0
DEFAULT_FLOOR_NATS = 0.05

KEY_FIELDS = ("dataset", "split", "model", "config_hash", "estimator", "k", "seed", "metric")
# Fields a baseline keeps for each cell, besides the key.
CELL_FIELDS = ("value", "stderr", "mc_stderr", "unit", "n_examples", "method", "label", "model_config")

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT = 0, 1, 2


class CheckInputError(ValueError):
    """Bad input to the check (a missing or malformed file); reported as one line, exit status 2."""


CellKey = tuple  # values of KEY_FIELDS, in that order


def cell_key(row: dict) -> CellKey:
    return tuple(row.get(name) for name in KEY_FIELDS)


def describe_key(key: CellKey) -> str:
    """A compact, readable name of a cell: dataset/split model[hash] estimator k=.. seed=.. metric."""
    cell = dict(zip(KEY_FIELDS, key))
    k = "-" if cell["k"] is None else cell["k"]
    config = str(cell["config_hash"])[:8]
    return (f"{cell['dataset']}/{cell['split']} {cell['model']}[{config}] {cell['estimator']} "
            f"k={k} seed={cell['seed']} {cell['metric']}")


def _sort_key(key: CellKey) -> tuple:
    # None-safe ordering (k is null for exact log p(x)), so baselines and tables are deterministic.
    return tuple((value is None, type(value).__name__, "" if value is None else value) for value in key)


# ---------------------------------------------------------------------------------------------
# Reading runs and baselines


def _read_json(path: Path, what: str) -> object:
    if not path.is_file():
        raise CheckInputError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckInputError(f"{what} {path} is not valid JSON: {error}") from None


def read_run_rows(run_dir: Path) -> list[dict]:
    """The rows of RUN_DIR/results.jsonl, in file order; CheckInputError when absent, empty or malformed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckInputError(f"run directory not found: {run_dir}")
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        raise CheckInputError(f"{run_dir} has no {RESULTS_FILE}: is it a run directory (python -m bench run --out DIR)?")
    try:
        rows, torn = read_jsonl(path)
    except ValueError as error:
        raise CheckInputError(str(error)) from None
    if torn:
        # An interrupted run would pass with its unfinished cells merely "missing"; refuse it instead.
        raise CheckInputError(f"{path} ends in a torn line: the run was interrupted; "
                              f"finish it with python -m bench run --resume {run_dir}")
    for number, row in enumerate(rows, start=1):
        missing = [name for name in (*KEY_FIELDS, "value", "status") if name not in row] if isinstance(row, dict) \
            else ["(not an object)"]
        if missing:
            raise CheckInputError(f"{path}:{number} lacks the columns {', '.join(missing)}")
    if not rows:
        raise CheckInputError(f"{path} holds no results")
    return rows


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


def read_manifest(run_dir: Path) -> dict:
    manifest = _read_json(Path(run_dir) / MANIFEST_FILE, "run manifest")
    if not isinstance(manifest, dict):
        raise CheckInputError(f"run manifest {Path(run_dir) / MANIFEST_FILE} is not a JSON object")
    return manifest


def read_baseline(path: Path) -> dict[CellKey, dict]:
    """Baseline cells by key; CheckInputError when missing, malformed or of another format version."""
    data = _read_json(Path(path), "baseline")
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        raise CheckInputError(f"{path} is not an elbo-bench baseline (expected \"format\": \"{BASELINE_FORMAT}\"); "
                              f"write one with: python -m bench check RUN_DIR --write-baseline FILE")
    version = data.get("format_version")
    if version != BASELINE_FORMAT_VERSION:
        raise CheckInputError(f"baseline {path} has format version {version!r}; this check reads version "
                              f"{BASELINE_FORMAT_VERSION}: rewrite it with --write-baseline")
    cells = data.get("cells")
    if not isinstance(cells, list) or not cells:
        raise CheckInputError(f"baseline {path} has no cells (expected a non-empty list under \"cells\")")
    by_key: dict[CellKey, dict] = {}
    for index, cell in enumerate(cells):
        missing = [name for name in (*KEY_FIELDS, "value") if name not in cell] if isinstance(cell, dict) \
            else ["(not an object)"]
        if missing:
            raise CheckInputError(f"baseline {path} cell {index} lacks {', '.join(missing)}")
        if not isinstance(cell["value"], (int, float)) or not math.isfinite(cell["value"]):
            raise CheckInputError(f"baseline {path} cell {index} ({describe_key(cell_key(cell))}) "
                                  f"has a non-numeric value {cell['value']!r}")
        if cell_key(cell) in by_key:
            raise CheckInputError(f"baseline {path} holds the cell {describe_key(cell_key(cell))} twice")
        by_key[cell_key(cell)] = cell
    return by_key


# ---------------------------------------------------------------------------------------------
# Comparing one cell


@dataclass(frozen=True)
class Settings:
    z: float = DEFAULT_Z
    floor: float = DEFAULT_FLOOR_NATS  # nats per example
    throughput_ratio: float | None = None  # fail when run/baseline throughput falls below it; None: off
    fail_on_missing: bool = False


@dataclass(frozen=True)
class Finding:
    kind: str  # one of FINDING_KINDS
    key: CellKey
    baseline: float | None
    run: float | None
    change: float | None  # run - baseline (nats) for bounds and KL, run / baseline for throughput
    tolerance: float | None  # allowed drop (nats), or the ratio threshold for throughput
    note: str = ""


# The sections of the report, in print order, with whether a finding of that kind fails the check.
FINDING_KINDS = {
    "regression": True,
    "improvement": False,
    "missing in run": False,
    "new in run": False,
    "information": False,
}


def noise_scale(baseline: dict, run: dict) -> tuple[float, str]:
    """sqrt(se_b^2 + se_r^2) and which standard error it used (see the module docstring for the order)."""
    for column in ("mc_stderr", "stderr"):
        sides = (baseline.get(column), run.get(column))
        if all(isinstance(side, (int, float)) and math.isfinite(side) for side in sides):
            return math.hypot(*sides), column
    return 0.0, "floor only"


def bound_tolerance(baseline: dict, run: dict, settings: Settings) -> tuple[float, float, str]:
    """(allowed change in nats, the combined standard error, which standard error it is)."""
    scale, source = noise_scale(baseline, run)
    return settings.floor + settings.z * scale, scale, source


def _not_finite(run: dict) -> bool:
    return not isinstance(run["value"], (int, float)) or not math.isfinite(run["value"])


def _not_finite_finding(kind: str, baseline: dict, run: dict) -> Finding:
    return Finding(kind, cell_key(run), baseline["value"], None, None, None, f"value {run['value']!r} is not finite")


def compare_bound(baseline: dict, run: dict, settings: Settings) -> Finding | None:
    if _not_finite(run):
        return _not_finite_finding("regression", baseline, run)
    key = cell_key(run)
    tolerance, scale, source = bound_tolerance(baseline, run, settings)
    change = run["value"] - baseline["value"]
    kind = "regression" if change < -tolerance else "improvement" if change > tolerance else None
    if kind is None:
        return None
    z = f" (z = {change / scale:+.1f})" if scale > 0 else ""
    return Finding(kind, key, baseline["value"], run["value"], change, tolerance, f"tolerance from {source}{z}")


def compare_information(baseline: dict, run: dict, settings: Settings) -> Finding | None:
    """KL terms: a significant change either way is worth a look, never a failure."""
    if _not_finite(run):
        return _not_finite_finding("information", baseline, run)
    key = cell_key(run)
    tolerance, _, source = bound_tolerance(baseline, run, settings)
    change = run["value"] - baseline["value"]
    if abs(change) <= tolerance:
        return None
    return Finding("information", key, baseline["value"], run["value"], change, tolerance,
                   f"KL moved (tolerance from {source}); not a failure")


def compare_throughput(baseline: dict, run: dict, settings: Settings) -> Finding | None:
    """Throughput as a ratio (only when asked for): below settings.throughput_ratio is a regression."""
    key = cell_key(run)
    if _not_finite(run) or baseline["value"] <= 0:
        return Finding("information", key, baseline["value"], run["value"], None, settings.throughput_ratio,
                       "throughput not comparable (non-positive or non-finite)")
    ratio = run["value"] / baseline["value"]
    if ratio >= settings.throughput_ratio:
        return None
    return Finding("regression", key, baseline["value"], run["value"], ratio, settings.throughput_ratio,
                   f"throughput fell to {ratio:.2f}x of the baseline (threshold {settings.throughput_ratio:.2f}x)")


Comparison = Callable[[dict, dict, Settings], "Finding | None"]

# How each metric is compared; metrics not listed (ess, reconstruction, timings in seconds, memory,
# active units, training time) are diagnostics, not bounds, and are neither stored nor compared.
METRIC_POLICIES: dict[str, Comparison] = {
    "elbo": compare_bound,
    "iwae": compare_bound,
    "log_marginal": compare_bound,
    "diffusion_elbo": compare_bound,
    "kl": compare_information,
    "throughput": compare_throughput,
    "examples_per_s": compare_throughput,
}
# Metrics with a part after the '/': per-layer KL ("kl/<layer>") and the diffusion ELBO's parts
# (reconstruction, prior, diffusion) move without being better or worse on their own.
PART_POLICIES: dict[str, Comparison] = {"kl": compare_information, "diffusion_elbo": compare_information}


def policy_of(metric: object) -> Comparison | None:
    """The comparison for a metric: METRIC_POLICIES by name, PART_POLICIES for "<name>/<part>"."""
    if not isinstance(metric, str):
        return None
    name, _, part = metric.partition("/")
    return (PART_POLICIES if part else METRIC_POLICIES).get(name)


def active_comparison(metric: object, settings: Settings) -> Comparison | None:
    """The comparison this check runs for a metric: timings only when --throughput-ratio is given."""
    comparison = policy_of(metric)
    if comparison is compare_throughput and settings.throughput_ratio is None:
        return None
    return comparison


# ---------------------------------------------------------------------------------------------
# Comparing a run with a baseline


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
        if self.settings.fail_on_missing:
            fails |= {"missing in run", "new in run"}
        return any(finding.kind in fails for finding in self.findings)


def _config_changes(missing: list[CellKey], new: list[CellKey]) -> dict[tuple, str]:
    """(dataset, split, model) -> "baseline h1 -> run h2" where the model's config_hash differs between sides."""
    def hashes(keys: list[CellKey]) -> dict[tuple, set]:
        found: dict[tuple, set] = defaultdict(set)
        for key in keys:
            cell = dict(zip(KEY_FIELDS, key))
            found[(cell["dataset"], cell["split"], cell["model"])].add(str(cell["config_hash"]))
        return found

    old, now = hashes(missing), hashes(new)
    return {model: f"baseline {', '.join(sorted(old[model]))} -> run {', '.join(sorted(now[model]))}"
            for model in sorted(set(old) & set(now))}


def compare(baseline: dict[CellKey, dict], run_rows: list[dict], settings: Settings) -> CheckResult:
    run = rows_by_key(row for row in run_rows if row.get("status") != "skipped")
    findings: list[Finding] = []
    # A failed cell may carry no metric; it covers every baseline metric of the same cell.
    failed_cells = {key[:-1] for key, row in run.items() if row.get("status") == "failed"}
    compared = 0
    for key in sorted(run, key=_sort_key):
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
    for key in sorted(baseline, key=_sort_key):
        if key not in run and key[:-1] not in failed_cells and active_comparison(key[-1], settings) is not None:
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


# ---------------------------------------------------------------------------------------------
# Plain-text report


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
             (f"tolerance: {settings.floor:g} nats + {settings.z:g} x combined standard error "
              f"(Monte Carlo when present, else over examples); throughput ratio: {ratio}")]
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
    # The conventional closing line of a test runner, so CI logs read the same as pytest's.
    regressions = result.count("regression")
    lines.append(f"check: {result.compared - regressions} passed, {regressions} failed")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Writing a baseline


def _suite_name(manifest: dict) -> str | None:
    suite = manifest.get("suite")
    if isinstance(suite, dict):
        return suite.get("name")
    return suite if isinstance(suite, str) else None


def baseline_from_run(rows: list[dict], manifest: dict) -> dict:
    """The baseline document of a clean run: every compared metric of every ok cell, sorted by key."""
    by_key = rows_by_key(rows)
    failed = [key for key, row in by_key.items() if row.get("status") == "failed"]
    if failed:
        raise CheckInputError(f"the run has {len(failed)} failed cell(s), e.g. {describe_key(failed[0])}: "
                              f"a baseline must come from a clean run")
    kept = {key: row for key, row in by_key.items()
            if row.get("status") == "ok" and policy_of(row["metric"]) is not None}
    if not kept:
        raise CheckInputError("the run has no ok bound, KL or throughput cells to put in a baseline")
    cells = [{**{name: row[name] for name in KEY_FIELDS}, **{name: row.get(name) for name in CELL_FIELDS}}
             for key, row in sorted(kept.items(), key=lambda item: _sort_key(item[0]))]
    provenance = {
        "run_id": manifest.get("run_id"),
        "git_commit": manifest.get("git_commit"),
        "versions": manifest.get("versions"),
        "device": manifest.get("device"),
        "device_name": manifest.get("device_name"),
        "threads": manifest.get("threads"),
        "suite": _suite_name(manifest),
        "command": manifest.get("command"),
        "started": manifest.get("started"),
        "finished": manifest.get("finished"),
    }
    return {"format": BASELINE_FORMAT, "format_version": BASELINE_FORMAT_VERSION, "provenance": provenance,
            "cells": cells}


def write_baseline(run_dir: Path, path: Path) -> int:
    """Write the baseline of RUN_DIR to ``path`` (stable key order and indentation, so diffs read well)."""
    document = baseline_from_run(read_run_rows(run_dir), read_manifest(run_dir))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    return len(document["cells"])


# ---------------------------------------------------------------------------------------------
# Command line


def _non_negative(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a ratio in (0, 1], got {text} (e.g. 0.5: fail below half)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m bench check`."""
    parser.add_argument("run_dir", type=Path, help="a run directory (holding results.jsonl and manifest.json)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--baseline", type=Path, metavar="FILE", help="compare the run with this baseline")
    target.add_argument("--write-baseline", type=Path, metavar="FILE", help="write a baseline from the run")
    parser.add_argument("--z", type=_non_negative, default=DEFAULT_Z,
                        help=f"z-score of the tolerance on the combined standard error (default {DEFAULT_Z:g})")
    parser.add_argument("--floor", type=_non_negative, default=DEFAULT_FLOOR_NATS, metavar="NATS",
                        help=f"absolute tolerance added to it, nats per example (default {DEFAULT_FLOOR_NATS:g})")
    parser.add_argument("--throughput-ratio", type=_ratio, default=None, metavar="R",
                        help="fail when throughput falls below R x the baseline (default: off, never fail on time)")
    parser.add_argument("--fail-on-missing", action="store_true",
                        help="fail when a cell is present on one side only (default: report it)")


def run_check(run_dir: Path, baseline_path: Path, settings: Settings) -> tuple[CheckResult, str]:
    baseline = read_baseline(baseline_path)
    result = compare(baseline, read_run_rows(run_dir), settings)
    return result, render(result, run_dir, baseline_path)


def main(args: argparse.Namespace) -> int:
    """Exit status: 0 pass, 1 regression, 2 bad input."""
    try:
        if args.write_baseline is not None:
            count = write_baseline(args.run_dir, args.write_baseline)
            print(f"wrote {count} cells to {args.write_baseline}")
            return EXIT_OK
        settings = Settings(z=args.z, floor=args.floor, throughput_ratio=args.throughput_ratio,
                            fail_on_missing=args.fail_on_missing)
        result, text = run_check(args.run_dir, args.baseline, settings)
    except CheckInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(text)
    return EXIT_REGRESSION if result.failed else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
