"""The serial executor: the fits one after another in the driver's own process, in plan order."""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from bench.data import Dataset

from ..fit_task import CellResult, FitTask, run_fit
from ..threads import apply_threads
from . import ExecutorSettings


def run(tasks: Sequence[FitTask], datasets: Mapping[str, Dataset], settings: ExecutorSettings) -> Iterator[CellResult]:
    previous = torch.get_num_threads()
    apply_threads(settings.threads)
    try:
        for task in tasks:
            yield from run_fit(task, datasets[task.fit.dataset])
    finally:
        torch.set_num_threads(previous)  # an in-process caller keeps its setting
