"""The Ray executor: one Ray task per fit, on a local instance or a cluster (``pip install -e ".[ray]"``).

Without an address a local instance is started, sized to this machine, and shut down at the end;
with ``--ray-address`` the run joins that cluster (for example one started by ``ray start --head``;
every node needs elbo-bench installed). A process where Ray is already initialised (a notebook, a
test) keeps its instance. Each task asks for ``num_cpus`` = its torch threads and, for a CUDA fit,
``num_gpus`` = ``--gpus-per-fit`` (a fraction shares a GPU); Ray places them, nothing of ours does.
A task is a generator, so each cell's result streams back as it finishes. ``max_retries=0``: a task
whose worker dies (SIGKILL, out of memory) loses its fit (``FitLost``); ``--resume`` reruns it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import ray
import torch

from bench.data import Dataset

from ..fit_task import CellResult, FitTask, run_fit, shippable
from ..threads import apply_threads, available_cores
from . import Event, ExecutorSettings, FitLost

log = logging.getLogger(__name__)

_SOURCE_ROOT = str(Path(__file__).resolve().parents[3])  # the folder holding the bench package


@ray.remote(max_retries=0, num_returns="streaming")  # each yield comes back as it is made
def _fit(task: FitTask, dataset: Dataset, threads: int) -> Iterator[CellResult]:
    apply_threads(threads)  # a Ray worker is reused across tasks: set on every task
    yield from run_fit(task, dataset)


def run(tasks: Sequence[FitTask], datasets: Mapping[str, Dataset], settings: ExecutorSettings) -> Iterator[Event]:
    started = _connect(settings.ray_address)
    running: dict = {}  # ObjectRefGenerator -> its FitTask
    finished = False
    try:
        refs = {name: ray.put(shippable(datasets[name])) for name in {t.fit.dataset for t in tasks}}
        queue = deque(tasks)
        limit = settings.workers or len(queue)
        while queue or running:
            while queue and len(running) < limit:
                task = queue.popleft()
                running[_submit(task, refs[task.fit.dataset], settings)] = task
            [generator], _ = ray.wait(list(running), num_returns=1)
            try:
                ref = next(generator)
            except StopIteration:
                del running[generator]
                continue
            try:
                yield ray.get(ref)
            except ray.exceptions.RayError as exc:  # the worker died, or the task could not run
                first_line = (str(exc).strip().splitlines() or [""])[0]
                yield FitLost(running.pop(generator).index, f"Ray task lost ({type(exc).__name__}: {first_line})")
        finished = True
    finally:
        if not finished:
            for generator in running:
                with contextlib.suppress(Exception):
                    ray.cancel(generator, force=True)
        if started:
            ray.shutdown()


def _submit(task: FitTask, dataset_ref, settings: ExecutorSettings):
    gpus = 0.0
    if task.device.type == "cuda":
        gpus = settings.gpus_per_fit
        task = dataclasses.replace(task, device=torch.device("cuda"))  # Ray narrows CUDA_VISIBLE_DEVICES
    log.info("fit %s: Ray task (%d CPUs, %g GPUs)", task.describe(), settings.threads, gpus)
    return _fit.options(num_cpus=settings.threads, num_gpus=gpus).remote(task, dataset_ref, settings.threads)


def _connect(address: str | None) -> bool:
    """Join the cluster at ``address``, or the instance this process has, or start a local one.

    True when this call connected (and the run disconnects, which stops a local instance it started).
    """
    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, logging_level=logging.WARNING)
        return True
    # Workers of a local instance import bench from this source tree, installed or not.
    path = os.pathsep.join(p for p in (_SOURCE_ROOT, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=available_cores(), include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    return True
