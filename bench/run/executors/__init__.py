"""Where fits run: in the driver one after another, in a pool of worker processes, or as Ray tasks.

Each executor is a generator ``run(tasks, datasets, settings)`` yielding, as they come, a
``CellResult`` per finished cell and a ``FitLost`` for a fit whose worker died; the driver
(bench.run.execute) alone writes them. One task is one fit (training plus its cells), so a
checkpoint is made once. Closing the generator (the run ends, fails or is interrupted) ends
the executor's workers.

serial.py   the fits in the driver's process, in plan order
process.py  a pool of spawned worker processes, a pipe each; a dead worker loses only its fit
ray.py      one Ray task per fit, on a local instance or a cluster (the optional extra [ray])
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from bench.data import Dataset

from ..fit_task import CellResult, FitTask
from ..threads import plan_parallelism

EXECUTORS = {  # name -> (module, one line for --help)
    "serial": ("bench.run.executors.serial", "one fit after another in this process"),
    "process": ("bench.run.executors.process", "a pool of worker processes on this machine"),
    "ray": ("bench.run.executors.ray", "Ray tasks on a local instance or, with --ray-address, a cluster"),
}
AUTO = "auto"  # serial where one fit runs at a time (one worker fills the cores, or CUDA), else process


@dataclass(frozen=True)
class FitLost:
    """A fit whose worker died before finishing it: its unfinished cells are failed by the driver."""

    fit_index: int
    error: str


@dataclass(frozen=True)
class ExecutorSettings:
    name: str  # a key of EXECUTORS
    workers: int | None  # fits at once; None on Ray: as many as its CPUs (and GPUs) allow
    threads: int  # torch threads of every fit (a Ray task asks for as many CPUs)
    ray_address: str | None = None  # join this Ray cluster; None: a local instance sized to the machine
    gpus_per_fit: float = 1.0  # Ray: GPUs a CUDA fit asks for (a fraction shares one)


Event = CellResult | FitLost


class ExecutorUnavailable(ValueError):
    """The executor asked for cannot run here (e.g. ray is not installed)."""


def check_available(name: str) -> None:
    """ExecutorUnavailable where the executor needs a package that is not installed."""
    if name == "ray" and importlib.util.find_spec("ray") is None:
        raise ExecutorUnavailable('--executor ray needs the package ray: pip install -e ".[ray]"')


def configure(name: str, *, n_fits: int, device: torch.device, workers: int | None = None,
              threads: int | None = None, ray_address: str | None = None,
              gpus_per_fit: float = 1.0) -> ExecutorSettings:
    """Settings for a run of ``n_fits`` fits: the executor ``auto`` resolves to, workers and threads.

    One thread per fit unless asked otherwise (bench.run.threads says why); one fit at a time on CUDA unless
    asked otherwise (fits would share one device's memory). On Ray the workers default to no limit of ours:
    Ray runs as many fits as its CPUs hold at ``threads`` CPUs each.
    """
    if name == "ray":
        return ExecutorSettings(name, workers, threads or 1, ray_address, gpus_per_fit)
    if workers is None and device.type == "cuda":
        workers = 1
    if name == "serial":
        workers = 1
    parallel = plan_parallelism(n_fits, workers=workers, threads=threads)
    if name == AUTO:
        name = "serial" if parallel.workers == 1 else "process"
    return ExecutorSettings(name, parallel.workers, parallel.threads)


def run(tasks: Sequence[FitTask], datasets: Mapping[str, Dataset], settings: ExecutorSettings) -> Iterator[Event]:
    """The events of the executor the settings name; closing this generator ends its workers."""
    if not tasks:  # nothing left to run: start no workers (and no Ray instance)
        return
    runner: Callable[..., Iterator[Event]] = importlib.import_module(EXECUTORS[settings.name][0]).run
    yield from runner(tasks, datasets, settings)
