"""The process executor: ``workers`` spawned processes on this machine, each running one fit at a time.

Every worker has its own pipe: the driver sends it a fit (with the datasets it has not been sent
yet), the worker sends back each cell's result as it finishes, then "done", and waits for the
next fit. Workers are forked from a fork server that has imported torch and bench but run nothing
(a fork of the driver, whose torch thread pools have run, could deadlock; a fresh spawn would import
torch once per worker), set their torch threads before any work, and ignore SIGINT: on Ctrl-C the driver
ends them. A worker that dies (SIGKILL, out of memory) loses only the fit it held, reported as
``FitLost``; a new worker takes its place while fits remain, and the run goes on.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from tqdm import tqdm

from bench.data import Dataset

from ..fit_task import FitTask, run_fit, shippable
from ..threads import apply_threads
from . import Event, ExecutorSettings, FitLost

log = logging.getLogger(__name__)

_DONE = "done"  # a worker's message after a fit's last cell
_STOP_TIMEOUT_S = 10.0


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection  # the driver's end of the worker's pipe
    sent: set[str] = field(default_factory=set)  # datasets this worker already holds
    task: FitTask | None = None  # the fit it runs now


def run(tasks: Sequence[FitTask], datasets: Mapping[str, Dataset], settings: ExecutorSettings) -> Iterator[Event]:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # torch and bench imported once, in the server
    queue = deque(tasks)
    workers: list[_Worker] = []
    finished = False
    try:
        while queue or any(w.task is not None for w in workers):
            workers = _alive(workers)
            while queue and len(workers) < settings.workers:
                workers.append(_start(context, settings.threads))
            for worker in workers:
                if worker.task is None and queue:
                    lost = _assign(worker, queue.popleft(), datasets)
                    if lost is not None:
                        yield lost
            busy = [w for w in workers if w.task is not None]
            if not busy:
                continue
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy]))
            for worker in busy:
                if worker.conn in ready or worker.process.sentinel in ready:
                    yield from _receive(worker)
        finished = True
    finally:
        for worker in workers:
            _stop(worker, graceful=finished)


def _alive(workers: list[_Worker]) -> list[_Worker]:
    """The workers still serving; the pipes of those gone are closed."""
    alive = []
    for worker in workers:
        if worker.process.is_alive() or worker.task is not None:
            alive.append(worker)
        else:
            worker.conn.close()
    return alive


def _start(context, threads: int) -> _Worker:
    driver_end, worker_end = context.Pipe()
    process = context.Process(target=_serve, args=(worker_end, threads), daemon=True, name="bench-worker")
    process.start()
    worker_end.close()  # the driver keeps only its end, so a dead worker reads as EOF
    return _Worker(process, driver_end)


def _assign(worker: _Worker, task: FitTask, datasets: Mapping[str, Dataset]) -> FitLost | None:
    name = task.fit.dataset
    new = {} if name in worker.sent else {name: shippable(datasets[name])}
    worker.task = task
    try:
        worker.conn.send((task, new))
    except OSError as exc:  # the worker died before it could take the fit
        worker.task = None
        return FitLost(task.index, f"worker process {worker.process.pid} died before the fit started ({exc})")
    worker.sent.add(name)
    log.info("fit %s: worker process %d", task.describe(), worker.process.pid)
    return None


def _receive(worker: _Worker) -> Iterator[Event]:
    """Every message the worker has sent; a FitLost for its fit if it has died."""
    while worker.conn.poll():
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            break
        if message == _DONE:
            worker.task = None
        else:
            yield message
    if worker.task is not None and not worker.process.is_alive():
        worker.process.join()
        yield FitLost(worker.task.index, f"worker process {worker.process.pid} died "
                                         f"({_exit_reason(worker.process.exitcode)})")
        worker.task = None


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _stop(worker: _Worker, *, graceful: bool) -> None:
    if graceful and worker.process.is_alive():
        with contextlib.suppress(OSError):  # it died meanwhile
            worker.conn.send(None)
        worker.process.join(_STOP_TIMEOUT_S)
    if worker.process.is_alive():
        worker.process.terminate()
        worker.process.join(_STOP_TIMEOUT_S)
    worker.conn.close()


def _serve(conn: Connection, threads: int) -> None:
    """A worker's life: set its threads, then run each fit it is sent and stream the results back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the driver, which ends the workers
    signal.signal(signal.SIGTERM, _exit_on_terminate)
    threading.Thread(target=_exit_with_driver, daemon=True).start()
    # tqdm's default lock is a multiprocessing semaphore, which a killed worker would leave behind (and the
    # resource tracker warn about); a worker draws no bars, so a thread lock does.
    tqdm.set_lock(threading.RLock())
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    apply_threads(threads)
    datasets: dict[str, Dataset] = {}
    try:
        while (message := conn.recv()) is not None:
            task, new = message
            datasets.update(new)
            for result in run_fit(task, datasets[task.fit.dataset]):
                conn.send(result)
            conn.send(_DONE)
    except (EOFError, BrokenPipeError):  # the driver is gone: nobody would write what this worker makes
        return


def _exit_on_terminate(signum, frame) -> None:
    """SIGTERM from the driver: exit through Python, so the worker's semaphores (tqdm's lock) are released."""
    raise SystemExit(0)


def _exit_with_driver() -> None:
    """End this worker as soon as the driver dies (a SIGKILL leaves it no chance to end its workers),
    rather than finish an hours-long fit whose results nobody writes."""
    wait([multiprocessing.parent_process().sentinel])
    os._exit(1)
