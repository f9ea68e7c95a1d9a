"""The results store: rows on disk per row, cells finished only once marked, torn lines and partial cells dropped."""
from __future__ import annotations

import json

import pytest

from bench.store import CELLS_FILE, ResultsStore, RunDirectoryError, check_new_run_dir
from reports.schema import (
    MANIFEST_FILE,
    RESULTS_FILE,
    ROW_COLUMNS,
    SCHEMA_VERSION,
    ResultRow,
    read_jsonl,
    read_rows,
)


def _record(cell_id: str, metric: str, value: float | None = 1.0, status: str = "ok") -> dict:
    record = dict.fromkeys(ROW_COLUMNS)
    record.update(run_id="r", cell_id=cell_id, metric=metric, value=value, status=status,
                  schema_version=SCHEMA_VERSION)
    return record


def _row(cell_id: str, metric: str, value: float | None = 1.0, status: str = "ok") -> ResultRow:
    return ResultRow.from_record(_record(cell_id, metric, value, status))


def test_rows_are_on_disk_before_the_store_closes(tmp_path):
    store = ResultsStore.create(tmp_path / "run", {"run_id": "run"})
    store.append_row(_row("a", "elbo", -3.5))
    # Flushed per row: another reader sees it while the writer is still open.
    assert [r["value"] for r in read_rows(tmp_path / "run")[0]] == [-3.5]
    store.finish_cell("a", "ok")
    assert read_jsonl(tmp_path / "run" / CELLS_FILE)[0] == [{"cell_id": "a", "status": "ok"}]
    store.close()


def test_non_finite_values_are_stored_as_null(tmp_path):
    with ResultsStore.create(tmp_path / "run", {"run_id": "run"}) as store:
        store.append_row(_row("a", "elbo", float("nan"), status="failed"))
    assert (tmp_path / "run" / RESULTS_FILE).read_text().count("NaN") == 0
    assert read_rows(tmp_path / "run")[0][0]["value"] is None


def test_a_row_with_wrong_columns_is_refused():
    bad = _record("a", "elbo")
    del bad["unit"]
    with pytest.raises(ValueError, match="unit"):
        ResultRow.from_record(bad)
    with pytest.raises(ValueError, match="status 'done'"):
        _row("a", "elbo", status="done")


def test_resume_drops_unfinished_and_failed_cells_and_a_torn_line(tmp_path):
    run = tmp_path / "run"
    with ResultsStore.create(run, {"run_id": "run"}) as store:
        store.append_row(_row("done", "elbo", -1.0))
        store.append_row(_row("done", "kl", 2.0))
        store.finish_cell("done", "ok")
        store.append_row(_row("failed", "iwae", None, status="failed"))
        store.finish_cell("failed", "failed")
        store.append_row(_row("in-flight", "elbo", -4.0))  # killed before its cell was marked
    with open(run / RESULTS_FILE, "a") as f:
        f.write('{"run_id": "run", "cell_id": "in-fli')  # killed mid-write
    rows, torn = read_jsonl(run / RESULTS_FILE)
    assert torn and len(rows) == 4

    store = ResultsStore.resume(run)
    assert store.finished == {"done": "ok"}
    kept = read_rows(run)[0]
    assert [(r["cell_id"], r["metric"]) for r in kept] == [("done", "elbo"), ("done", "kl")]
    assert (run / RESULTS_FILE).read_bytes().endswith(b"\n")
    # Appending after the repair gives whole lines only.
    store.append_row(_row("in-flight", "elbo", -4.5))
    store.finish_cell("in-flight", "ok")
    store.close()
    rows, torn = read_jsonl(run / RESULTS_FILE)
    assert not torn and [r["value"] for r in rows] == [-1.0, 2.0, -4.5]


def test_a_corrupt_line_before_the_last_is_an_error(tmp_path):
    path = tmp_path / RESULTS_FILE
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


def test_manifest_updates_are_atomic_and_complete(tmp_path):
    with ResultsStore.create(tmp_path / "run", {"run_id": "run", "finished": None}) as store:
        store.update_manifest(finished="later", summary={"failed": 0})
    manifest = json.loads((tmp_path / "run" / MANIFEST_FILE).read_text())
    assert manifest == {"run_id": "run", "finished": "later", "summary": {"failed": 0}}
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_new_runs_refuse_directories_holding_something(tmp_path):
    check_new_run_dir(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    check_new_run_dir(tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    (other / MANIFEST_FILE).write_text(json.dumps({"run_id": "earlier"}))
    with pytest.raises(RunDirectoryError, match="already holds run earlier"):
        check_new_run_dir(other)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(RunDirectoryError, match="not empty"):
        check_new_run_dir(tmp_path / "junk")
    with pytest.raises(RunDirectoryError, match="not a run directory"):
        ResultsStore.resume(tmp_path / "junk")
