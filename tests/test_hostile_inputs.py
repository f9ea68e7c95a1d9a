"""Hostile inputs: every one ends in one line on stderr, no traceback, the documented exit status, and no run
directory where the run never started (exit 2 before a run, 1 for a write error in the middle of one).

Each case builds its files under tmp_path and returns the command's arguments (and any environment). The
default tier runs them in-process through bench.cli.main (a subprocess per case costs ~2 s of imports); the
slow tier runs a sample of them as real `python -m bench` subprocesses.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bench.cli import main

TINY_SUITE = """
datasets = ["linear-gaussian"]
seeds = [0]
threads = 1
[train]
steps = 2
batch_size = 50
eval_every = 2
eval_examples = 20
[eval]
n_examples = 20
batch_size = 20
[timing]
enabled = false
[[models]]
name = "vae"
config = { latent_dim = 2, hidden = [8] }
[[estimators]]
name = "elbo"
[[estimators]]
name = "iwae"
k = [2, 4]
"""


def _suite(tmp: Path, text: str = TINY_SUITE, name: str = "s.toml") -> str:
    path = tmp / name
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return str(path)


def _run(tmp: Path, *extra: str, suite: str | None = None) -> list[str]:
    return ["run", "--all", "--quiet", "--no-report", "--suite", suite or _suite(tmp), "--out", str(tmp / "out"),
            "--cache-dir", str(tmp / "cache"), *extra]


def _edited(old: str, new: str):
    return lambda tmp: _run(tmp, suite=_suite(tmp, TINY_SUITE.replace(old, new)))


# --- a run directory for --resume and check cases, written by hand -------------------------------------------

def _row(**fields) -> dict:
    row = {"run_id": "r", "cell_id": "c1", "dataset": "linear-gaussian", "split": "test", "model": "vae",
           "label": "vae", "config_hash": "h", "model_config": {}, "structure": None, "seed": 0,
           "estimator": "elbo", "k": None, "metric": "elbo", "method": None, "value": -1.0, "stderr": 0.1,
           "mc_stderr": None, "replicates": None, "unit": "nats", "n_examples": 20, "device": "cpu", "wall_s": 0.1,
           "timing_s": None, "per_example": None, "status": "ok", "error": None, "schema_version": 3}
    return {**row, **fields}


def _run_dir(tmp: Path, *, manifest: object = None, rows: bytes | None = None, cells: bytes | None = None) -> Path:
    import tomllib

    run = tmp / "done"
    run.mkdir()
    if manifest is None:
        manifest = {"run_id": "r", "suite": {"name": "s", "source": "s.toml", "contents": tomllib.loads(TINY_SUITE)},
                    "options": {}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    good = (json.dumps(_row()) + "\n").encode()
    (run / "results.jsonl").write_bytes(good + (rows or b""))
    (run / "cells.jsonl").write_bytes(b'{"cell_id": "c1", "status": "ok"}\n' + (cells or b""))
    return run


def _resume(**files):
    return lambda tmp: ["run", "--quiet", "--no-report", "--resume", str(_run_dir(tmp, **files)),
                        "--cache-dir", str(tmp / "cache")]


def _check(write: bool = False, baseline: object = None, **files):
    def argv(tmp: Path) -> list[str]:
        run = _run_dir(tmp, **files)
        if write:
            (tmp / "adir").mkdir()
            return ["check", str(run), "--write-baseline", str(tmp / "adir")]
        path = tmp / "baseline.json"
        path.write_bytes(baseline if isinstance(baseline, bytes) else json.dumps(baseline).encode())
        return ["check", str(run), "--baseline", str(path)]

    return argv


def _baseline(**cell) -> dict:
    key = {"dataset": "linear-gaussian", "split": "test", "model": "vae", "config_hash": "h", "estimator": "elbo",
           "k": None, "seed": 0, "metric": "elbo", "value": -1.0}
    return {"format": "elbo-bench-baseline", "format_version": 2, "suite": {"name": "s", "hash": None},
            "cells": [{**key, **cell}]}


# --- data archives: small synthetic .npz files under --data-dir ---------------------------------------------

MNIST_SUITE = TINY_SUITE.replace('datasets = ["linear-gaussian"]', 'datasets = ["binarized-mnist"]')


def _archive(write):
    def argv(tmp: Path) -> list[str]:
        data = tmp / "data"
        data.mkdir()
        write(data / "binarized_mnist.npz")
        return _run(tmp, "--data-dir", str(data), suite=_suite(tmp, MNIST_SUITE))

    return argv


def _packed(dtype=np.uint8, width: int = 98) -> dict:
    return {split: np.zeros((3, width), dtype=dtype) for split in ("train", "valid", "test")}


def _damaged_member(path: Path) -> None:
    np.savez(path, **_packed())  # stored, not compressed: flip a byte inside the first member's data
    with zipfile.ZipFile(path) as archive:
        info = archive.infolist()[0]
    raw = bytearray(path.read_bytes())
    raw[info.header_offset + 30 + len(info.filename) + 80] ^= 0xFF
    path.write_bytes(bytes(raw))


def _object_arrays(path: Path) -> None:
    np.savez(path, **{split: np.array([[1, "x"]], dtype=object) for split in ("train", "valid", "test")})


def _truncated(path: Path) -> None:
    np.savez(path, **_packed())
    path.write_bytes(path.read_bytes()[:200])


NOT_UTF8 = b"\xff\xfe\x00bad"

# (name, argv builder, environment, expected exit status)
CASES = [
    # numbers and their ranges: the command line judged as suites are
    ("seed-negative", lambda t: _run(t, "--seed", "-1"), {}, 2),
    ("seed-2^63", lambda t: _run(t, "--seed", str(2**63)), {}, 2),
    ("seed-2^64", lambda t: _run(t, "--seed", str(2**64)), {}, 2),
    ("seed-not-integer", lambda t: _run(t, "--seed", "1.5"), {}, 2),
    ("threads-zero", lambda t: _run(t, "--threads", "0"), {}, 2),
    ("threads-huge", lambda t: _run(t, "--threads", "100000"), {}, 2),
    ("workers-negative", lambda t: _run(t, "--workers", "-3"), {}, 2),
    ("suite-seed-negative", _edited("seeds = [0]", "seeds = [-1]"), {}, 2),
    ("suite-threads-zero", _edited("threads = 1", "threads = 0"), {}, 2),
    # environment settings, judged once at the start
    ("budget-not-a-number", lambda t: _run(t), {"ELBO_BENCH_MEMORY_BUDGET_MB": "lots"}, 2),
    ("budget-nan", lambda t: _run(t), {"ELBO_BENCH_MEMORY_BUDGET_MB": "nan"}, 2),
    ("budget-negative", lambda t: _run(t), {"ELBO_BENCH_MEMORY_BUDGET_MB": "-4"}, 2),
    ("memory-limit-malformed", lambda t: _run(t), {"ELBO_BENCH_MEMORY_LIMIT_MB": "1e400"}, 2),
    # sizes beyond the machine
    ("k-astronomical", _edited("k = [2, 4]", "k = [2, 1000000000000000000]"), {}, 2),
    ("width-10^10", _edited("hidden = [8]", "hidden = [10000000000]"), {}, 2),
    ("beyond-a-set-limit", lambda t: _run(t), {"ELBO_BENCH_MEMORY_LIMIT_MB": "0.001"}, 2),
    # suites
    ("suite-not-utf8", lambda t: _run(t, suite=_suite(t, NOT_UTF8)), {}, 2),
    ("suite-malformed-toml", lambda t: _run(t, suite=_suite(t, "datasets = [")), {}, 2),
    # data archives
    ("archive-crc-damaged", _archive(_damaged_member), {}, 2),
    ("archive-object-arrays", _archive(_object_arrays), {}, 2),
    ("archive-wrong-dtype", _archive(lambda p: np.savez(p, **_packed(np.float64))), {}, 2),
    ("archive-wrong-shape", _archive(lambda p: np.savez(p, **_packed(width=7))), {}, 2),
    ("archive-truncated", _archive(_truncated), {}, 2),
    ("archive-not-a-zip", _archive(lambda p: p.write_bytes(b"hello")), {}, 2),
    # output locations
    ("out-not-utf8", lambda t: [*_run(t)[:-4], "--out", os.fsdecode(bytes(t / "out") + b"\xff"), *_run(t)[-2:]],
     {}, 2),
    ("out-is-a-file", lambda t: (t / "out").write_text("x") and _run(t), {}, 2),
    ("out-unwritable", lambda t: [*_run(t)[:-4], "--out", "/proc/elbo-bench-run", *_run(t)[-2:]], {}, 2),
    # --resume of damaged run directories
    ("resume-manifest-not-object", _resume(manifest=[1, 2]), {}, 2),
    ("resume-manifest-suite-wrong-type", _resume(manifest={"run_id": "r", "suite": "s"}), {}, 2),
    ("resume-manifest-selection-wrong-type", _resume(manifest={
        "run_id": "r", "suite": {"name": "s", "source": "s.toml", "contents": {}},
        "options": {"selection": {"seed": "zero"}}}), {}, 2),
    ("resume-row-wrong-type", _resume(rows=(json.dumps(_row(value="high")) + "\n").encode()), {}, 2),
    ("resume-row-status-unknown", _resume(rows=(json.dumps(_row(status="great")) + "\n").encode()), {}, 2),
    ("resume-cell-id-not-string", _resume(cells=b'{"cell_id": 5, "status": "ok"}\n'), {}, 2),
    ("resume-results-not-utf8", _resume(rows=NOT_UTF8 + b"\n" + (json.dumps(_row()) + "\n").encode()), {}, 2),
    # check
    ("check-row-wrong-type", _check(baseline=_baseline(), rows=(json.dumps(_row(seed=[0])) + "\n").encode()), {}, 2),
    ("check-baseline-key-a-list", _check(baseline=_baseline(model=["vae"])), {}, 2),
    ("check-baseline-not-utf8", _check(baseline=NOT_UTF8), {}, 2),
    ("check-manifest-a-list", _check(baseline=_baseline(), manifest=[1]), {}, 2),
    ("check-baseline-onto-directory", _check(write=True), {}, 2),
]


def _assert_one_line(code: int, expected: int, stderr: str, tmp: Path) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == expected, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1, lines
    if expected == 2:
        assert not (tmp / "out").is_dir() or not any((tmp / "out").iterdir())


@pytest.mark.parametrize("name,argv,env,expected", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_gives_one_line(name, argv, env, expected, tmp_path, monkeypatch, capsys):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    arguments = argv(tmp_path)
    capsys.readouterr()
    code = main(arguments)
    stderr = capsys.readouterr().err
    _assert_one_line(code, expected, stderr, tmp_path)
    assert "allow_pickle" not in stderr and "weights_only" not in stderr  # no advice to load unsafely
    if name == "out-unwritable":
        assert not Path("/proc/elbo-bench-run").exists()


SUBPROCESS_SAMPLE = ["seed-2^64", "budget-nan", "k-astronomical", "archive-crc-damaged", "out-not-utf8",
                     "resume-row-wrong-type", "check-baseline-key-a-list", "suite-not-utf8"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SUBPROCESS_SAMPLE)
def test_hostile_input_in_a_subprocess(name, tmp_path):
    _, argv, env, expected = next(c for c in CASES if c[0] == name)
    arguments = argv(tmp_path)
    done = subprocess.run([sys.executable, "-m", "bench", *arguments], capture_output=True,
                          env={**os.environ, **env})
    _assert_one_line(done.returncode, expected, done.stderr.decode(errors="replace"), tmp_path)


# --- errors in the middle of a run ---------------------------------------------------------------------------

def test_a_write_error_mid_run_ends_in_one_line_naming_resume(tmp_path, monkeypatch, capsys):
    """The second cell's rows meet a full disk: exit 1, one line with --resume, the first cell's rows kept."""
    from bench.store import ResultsStore

    real_append, calls = ResultsStore.append_row, []

    def append_until_full(self, row):
        calls.append(row.cell_id)
        if len(set(calls)) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_append(self, row)

    monkeypatch.setattr(ResultsStore, "append_row", append_until_full)
    code = main(_run(tmp_path, "--executor", "serial"))
    stderr = capsys.readouterr().err
    _assert_one_line(code, 1, stderr, tmp_path)
    assert "No space left on device" in stderr and f"--resume {tmp_path / 'out'}" in stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert {r["cell_id"] for r in rows} == {calls[0]}


def _table(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    return sorted((r["cell_id"], r["metric"], r["value"], r["stderr"]) for r in rows
                  if r["estimator"] != "train" and r["status"] == "ok")


@pytest.mark.slow
def test_a_run_on_a_full_disk_resumes_on_a_roomy_copy_to_the_same_table(tmp_path):
    """A tmpfs too small for the run's rows fills mid-run; the copy, resumed, equals an uninterrupted run."""
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(tiny)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the full-disk run is not tested")
    try:
        suite = _suite(tmp_path, TINY_SUITE.replace("k = [2, 4]", "k = [2, 4, 8, 16, 32, 64]")
                       .replace("n_examples = 20", "n_examples = 400").replace("batch_size = 20", "batch_size = 400"))
        bench = [sys.executable, "-m", "bench", "run", "--all", "--quiet", "--no-report", "--executor", "serial",
                 "--suite", suite, "--cache-dir", str(tmp_path / "cache")]
        full = subprocess.run([*bench, "--out", str(tiny / "run")], capture_output=True, text=True)
        lines = full.stderr.strip().splitlines()
        assert full.returncode == 1 and len(lines) == 1 and "Traceback" not in full.stderr, full.stderr
        assert "--resume" in lines[0]
        shutil.copytree(tiny / "run", tmp_path / "roomy")
    finally:
        subprocess.run(["umount", str(tiny)], check=False)
    resumed = subprocess.run([*bench[:4], "--quiet", "--no-report", "--executor", "serial", "--resume",
                              str(tmp_path / "roomy"), "--cache-dir", str(tmp_path / "cache")],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run([*bench, "--out", str(tmp_path / "whole")], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    assert _table(tmp_path / "roomy") == _table(tmp_path / "whole")
