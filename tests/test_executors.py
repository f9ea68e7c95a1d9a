"""Executors, threads, the run-directory lock and the log_marginal reuse.

Values are compared bit for bit (==, no tolerance): every cell seeds from its fit's identity and
runs with the same threads under every executor, so nothing but the order of the rows may differ.
The default tier holds the fast checks (a two-fit suite, the lock in-process); the smoke and
regression suites, a worker killed with SIGKILL, two runs on one directory and Ctrl-C are slow.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.plan.fits import prepare
from bench.plan.suite import load_suite
from bench.run import threads as threads_module
from bench.run.evaluate import TIMING_METRICS
from bench.run.executors import ExecutorSettings, configure
from bench.run.threads import idle_cores, plan_parallelism
from bench.store import CELLS_FILE, LOCK_FILE, ResultsStore, RunDirectoryError, RunLock
from reports.schema import MANIFEST_FILE, read_jsonl, read_rows

# Two fits (two seeds) of a tiny VAE; iwae K = 3 and log_marginal K = 3 are the same estimate.
TWO_FITS = textwrap.dedent("""
    datasets = ["digits"]
    seeds = [0, 1]
    [train]
    steps = 5
    eval_every = 5
    eval_examples = 20
    [eval]
    n_examples = 20
    batch_size = 10
    [timing]
    n_examples = 8
    warmup = 0
    repeats = 1
    [[models]]
    name = "vae"
    config = { latent_dim = 2, hidden = [8] }
    [[estimators]]
    name = "iwae"
    k = [1, 3]
    [[estimators]]
    name = "log_marginal"
    k = 3
""")
RUN_FIELDS = ("run_id", "wall_s", "timing_s")  # what differs between two runs of the same cells


def value_rows(run_dir: Path) -> dict[tuple[str, str], dict]:
    """(cell, metric) -> the row without its run's id and timings (which vary run to run). Asserts no duplicates."""
    rows = [r for r in read_rows(run_dir)[0] if r["metric"] not in {*TIMING_METRICS, "train_seconds"}]
    table = {(r["cell_id"], r["metric"]): {f: v for f, v in r.items() if f not in RUN_FIELDS} for r in rows}
    assert len(table) == len(rows), "a (cell, metric) was recorded twice"
    return table


def run_suite(out: Path, cache: Path, suite: str, *args: str) -> int:
    return main(["run", "--all", "--suite", suite, "--out", str(out), "--cache-dir", str(cache), "--no-report",
                 "--quiet", *args])


def _suite_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "suite.toml"
    path.write_text(text)
    return str(path)


# --- threads and workers ------------------------------------------------------------------------

def test_defaults_never_oversubscribe_the_cores(monkeypatch):
    assert plan_parallelism(8, cores=2) == (2, 1)  # one thread per fit, a fit per core
    assert plan_parallelism(1, cores=16).workers == 1  # never more workers than fits
    assert plan_parallelism(8, threads=4, cores=16) == (4, 4)
    assert plan_parallelism(8, threads=4, cores=2) == (1, 4)  # a suite asking for more threads than cores
    assert plan_parallelism(8, workers=3, cores=2) == (3, 1)  # asked for: taken as asked
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setattr(threads_module, "_cpu_jiffies", lambda: None)  # no /proc/stat: the load average
    monkeypatch.setattr(os, "getloadavg", lambda: (1.4, 1.0, 1.0))  # one core busy with other work
    assert idle_cores() == 3 and plan_parallelism(8).workers == 3
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 6.0, 6.0))  # a crowded machine: still one worker
    assert idle_cores() == 1 and configure("auto", n_fits=8, device=cpu).name == "serial"
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert configure("auto", n_fits=8, device=cpu) == ExecutorSettings("process", 4, 1)
    assert configure("auto", n_fits=1, device=cpu).name == "serial"
    assert configure("auto", n_fits=8, device=cuda).name == "serial"  # fits would share one GPU's memory
    assert configure("serial", n_fits=8, device=cpu, threads=2) == ExecutorSettings("serial", 1, 2)
    assert configure("ray", n_fits=8, device=cpu).workers is None  # Ray's CPUs limit the fits in flight


def test_busy_cores_are_measured_now_on_this_process_cpus(monkeypatch):
    """/proc/stat over a short window, on the affinity mask's CPUs only; a high load average left by a run
    that just ended does not make an idle machine look busy."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 6.0, 6.0))
    monkeypatch.setattr(threads_module.time, "sleep", lambda s: None)
    # (busy, total) ticks per CPU before and after: cpu0 fully busy, cpu1 40% busy, cpu2 idle, cpu3 (not
    # ours) fully busy
    samples = iter([{0: (0, 0), 1: (0, 0), 2: (0, 0), 3: (0, 0)},
                    {0: (100, 100), 1: (40, 100), 2: (0, 100), 3: (100, 100)}])
    monkeypatch.setattr(threads_module, "_cpu_jiffies", lambda: next(samples))
    assert threads_module.busy_cores() == pytest.approx(1.4)
    samples = iter([{0: (0, 0), 1: (0, 0), 2: (0, 0)}, {0: (100, 100), 1: (40, 100), 2: (0, 100)}])
    assert idle_cores() == 2
    # one fit, or one core's worth of threads: one worker without measuring (no /proc/stat read, no sleep)
    monkeypatch.setattr(threads_module, "_cpu_jiffies", lambda: pytest.fail("measured the load needlessly"))
    assert plan_parallelism(1).workers == 1 and plan_parallelism(8, threads=3).workers == 1


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="no /proc/stat here (not Linux)")
def test_proc_stat_gives_every_cpu_of_this_process_its_ticks():
    ticks = threads_module._cpu_jiffies()
    assert threads_module.available_cpus() <= set(ticks)
    assert all(0 <= busy <= total for busy, total in ticks.values())


@pytest.mark.parametrize("args, fragment", [
    (["--workers", "0"], "--workers: must be an integer >= 1, got 0"),
    (["--executor", "serial", "--workers", "2"], "--executor serial runs one fit at a time"),
    (["--ray-address", "auto"], "--ray-address needs --executor ray"),
    (["--executor", "ray", "--gpus-per-fit", "0"], "--gpus-per-fit must be > 0"),
])
def test_bad_executor_flags(tmp_path, capsys, args, fragment):
    code = run_suite(tmp_path / "out", tmp_path / "cache", "smoke", *args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def two_fits_serial(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("two-fits")
    suite = _suite_file(root, TWO_FITS)
    assert run_suite(root / "serial", root / "cache-serial", suite, "--executor", "serial") == 0
    return root / "serial", suite


# --- one writer: the lock --------------------------------------------------------------------------

def test_a_locked_run_directory_refuses_a_second_writer(two_fits_serial, capsys):
    run_dir, suite = two_fits_serial
    files = {name: (run_dir / name).read_bytes() for name in ("results.jsonl", CELLS_FILE, MANIFEST_FILE)}
    holder = RunLock.acquire(run_dir)  # as another process's: flock conflicts between open file descriptions
    try:
        assert (run_dir / LOCK_FILE).read_text().strip() == str(os.getpid())
        for args, says in ((["--resume", str(run_dir)], f"in use by process {os.getpid()}"),
                           (["--all", "--suite", suite, "--out", str(run_dir)], "already holds run")):
            assert main(["run", *args, "--no-report", "--quiet"]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and says in err, err
        with pytest.raises(RunDirectoryError, match=f"in use by process {os.getpid()}"):
            ResultsStore.resume(run_dir)
    finally:
        holder.release()
    assert {name: (run_dir / name).read_bytes() for name in files} == files  # the refused ones wrote nothing
    # Released: a resume may take it now; with every cell finished it starts no worker and writes no row.
    assert main(["run", "--resume", str(run_dir), "--no-report", "--quiet", "--executor", "process"]) == 0
    assert (run_dir / "results.jsonl").read_bytes() == files["results.jsonl"]


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    with ResultsStore.create(run_dir, {"run_id": "run"}):
        pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / LOCK_FILE).write_text(dead.stdout)  # its pid, but no flock: the kernel dropped it with the process
    with ResultsStore.resume(run_dir):
        assert (run_dir / LOCK_FILE).read_text().strip() == str(os.getpid())
    check = RunLock.acquire(run_dir)  # released on close
    check.release()


# --- values independent of the executor; log_marginal reuse ---------------------------------------

def test_two_workers_give_the_serial_values_bit_for_bit(two_fits_serial, tmp_path):
    serial_dir, suite = two_fits_serial
    # A fresh cache: the workers train too, not only load the serial run's checkpoints.
    assert run_suite(tmp_path / "process", tmp_path / "cache", suite, "--executor", "process", "--workers", "2") == 0
    assert value_rows(tmp_path / "process") == value_rows(serial_dir)
    manifest = json.loads((tmp_path / "process" / MANIFEST_FILE).read_text())
    assert manifest["executor"]["name"] == "process" and manifest["executor"]["workers"] == 2
    assert manifest["threads"] == 1 and manifest["summary"]["failed"] == 0


def test_log_marginal_takes_the_iwae_cell_of_the_same_draws(two_fits_serial, tmp_path):
    serial_dir, suite = two_fits_serial
    rows = read_rows(serial_dir)[0]
    # Computed alone (no iwae cell in the run): the same cells, computed from scratch.
    assert run_suite(tmp_path / "alone", tmp_path / "cache", suite, "--estimators", "log_marginal",
                     "--executor", "serial") == 0
    alone = value_rows(tmp_path / "alone")
    reused = {key: v for key, v in value_rows(serial_dir).items() if key in alone}
    assert {metric for _, metric in alone} >= {"log_marginal", "ess"}  # value rows and weight diagnostics
    assert reused == alone  # bit for bit
    for seed in (0, 1):
        lm = [r for r in rows if r["seed"] == seed and r["estimator"] == "log_marginal"]
        iwae = [r for r in rows if r["seed"] == seed and r["estimator"] == "iwae" and r["k"] == 3]
        lm_value = next(r for r in lm if r["metric"] == "log_marginal")
        iwae_value = next(r for r in iwae if r["metric"] == "iwae")
        assert (lm_value["method"], lm_value["k"]) == ("iwae", 3)
        # Taken, not recomputed: the iwae cell's measurement and timings, to the last digit.
        assert lm_value["wall_s"] == iwae_value["wall_s"]
        assert sorted(r["metric"] for r in lm) == sorted(["log_marginal" if r["metric"] == "iwae" else r["metric"]
                                                          for r in iwae])
        timings = lambda cell_rows: {r["metric"]: r["timing_s"] for r in cell_rows if r["metric"] in TIMING_METRICS}
        assert timings(lm) == timings(iwae)


# --- slow: the shipped suites, a killed worker, two runs at once, Ctrl-C --------------------------

@pytest.mark.slow
@pytest.mark.parametrize("suite", ["smoke", "regression"])
def test_shipped_suites_give_the_serial_values_on_two_workers(serial_reference, tmp_path, suite):
    assert run_suite(tmp_path / "run", tmp_path / "cache", suite, "--executor", "process", "--workers", "2") == 0
    assert value_rows(tmp_path / "run") == value_rows(serial_reference(suite))


class _Driver:
    """`python -m bench run` in a subprocess, its stderr collected line by line as it comes."""

    def __init__(self, *args: str, cwd: Path, session: bool = False):
        # session: its own process group, like a command started from a terminal (Ctrl-C signals the group)
        self.process = subprocess.Popen([sys.executable, "-m", "bench", "run", *args], cwd=cwd,
                                        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                        start_new_session=session)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def workers(self) -> dict[str, int]:
        """fit description -> the worker process running it (from the driver's log)."""
        found = (re.search(r"fit (.+): worker process (\d+)", line) for line in self.lines)
        return {m.group(1): int(m.group(2)) for m in found if m}

    def finish(self, timeout: float = 300) -> tuple[int, list[str]]:
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        return code, [line for line in self.lines if line.strip()]


def finished_cells(run_dir: Path) -> set[str]:
    return {c["cell_id"] for c in read_jsonl(run_dir / CELLS_FILE)[0]} if (run_dir / CELLS_FILE).exists() else set()


def _fit_cells(suite_file: str) -> dict[str, list[str]]:
    """fit description (as the driver logs it) -> its cell ids, training cell first."""
    plan = prepare(load_suite(suite_file))
    return {f"{f.dataset} / {f.model.label} / seed {f.seed}": [c.cell_id for c in f.cells] for f in plan.fits}


def _wait_until(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie has ended already
    except (ProcessLookupError, FileNotFoundError):
        return True


@pytest.mark.slow
def test_a_killed_worker_fails_its_fit_the_rest_finish_and_resume_completes(serial_reference, slow_smoke, tmp_path):
    suite = slow_smoke
    reference = value_rows(serial_reference(suite))
    fits = _fit_cells(suite)
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    driver = _Driver("--all", "--suite", suite, "--out", str(run_dir), "--cache-dir", str(cache), "--no-report",
                     "--executor", "process", "--workers", "2", cwd=tmp_path)
    victim: list[tuple[str, int]] = []

    def trained_and_running() -> bool:  # a worker whose digits fit is trained and still has cells to run
        done = finished_cells(run_dir)
        for fit, pid in driver.workers().items():
            cells = fits[fit]
            if fit.startswith("digits") and cells[0] in done and not set(cells) <= done:
                victim.append((fit, pid))
                return True
        return False

    _wait_until(trained_and_running)
    fit, pid = victim[0]
    os.kill(pid, signal.SIGKILL)
    code, lines = driver.finish()
    assert code == 1, lines  # some cells failed; the run finished every other cell
    assert not any("Traceback" in line or "leaked" in line for line in lines), lines
    rows = read_rows(run_dir)[0]
    failed = {r["cell_id"] for r in rows if r["status"] == "failed"}
    assert failed and failed <= set(fits[fit][1:]), "only unfinished cells of the killed fit fail"
    assert all(f"worker process {pid} died (killed by SIGKILL)" in r["error"] for r in rows if r["status"] == "failed")
    others = {c for other, cells in fits.items() if other != fit for c in cells}
    assert others <= {r["cell_id"] for r in rows if r["status"] in ("ok", "skipped")}

    assert main(["run", "--resume", str(run_dir), "--cache-dir", str(cache), "--no-report", "--quiet",
                 "--executor", "process", "--workers", "2"]) == 0
    assert value_rows(run_dir) == reference


@pytest.mark.slow
def test_two_runs_on_one_directory_the_second_stops(serial_reference, slow_smoke, tmp_path, capsys):
    suite = slow_smoke
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    first = _Driver("--all", "--suite", suite, "--out", str(run_dir), "--cache-dir", str(cache), "--no-report",
                    "--quiet", "--executor", "serial", cwd=tmp_path)
    _wait_until(lambda: len(finished_cells(run_dir)) >= 1)
    for args, says in ((["--resume", str(run_dir)], f"in use by process {first.process.pid}"),
                       (["--all", "--suite", suite, "--out", str(run_dir)], "already holds run")):
        assert main(["run", *args, "--cache-dir", str(cache), "--no-report", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err
    assert first.process.poll() is None, "the first run must still be running when the second starts"
    code, lines = first.finish()
    assert code == 0, lines
    assert value_rows(run_dir) == value_rows(serial_reference(suite))  # complete, and nothing written twice


@pytest.mark.slow
def test_ctrl_c_ends_the_workers_and_says_how_to_resume(serial_reference, slow_smoke, tmp_path):
    suite = slow_smoke
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    driver = _Driver("--all", "--suite", suite, "--out", str(run_dir), "--cache-dir", str(cache), "--no-report",
                     "--executor", "process", "--workers", "2", cwd=tmp_path, session=True)
    _wait_until(lambda: len(driver.workers()) == 2 and len(finished_cells(run_dir)) >= 1)
    os.killpg(driver.process.pid, signal.SIGINT)  # Ctrl-C in a terminal: the driver and its whole group
    code, lines = driver.finish()
    assert code == 130, lines
    resume = f"python -m bench run --resume {run_dir} --executor process --workers 2 --cache-dir {cache}"
    assert lines[-1] == f"bench run: interrupted; finish the run with: {resume}"
    assert sum("interrupted" in line for line in lines) == 1 and not any("Traceback" in line for line in lines)
    _wait_until(lambda: all(_gone(pid) for pid in driver.workers().values()), timeout=30)
    assert main([*resume.split()[3:], "--no-report", "--quiet"]) == 0
    assert value_rows(run_dir) == value_rows(serial_reference(suite))
