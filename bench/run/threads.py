"""How many fits run at once and how many torch threads each gets, so the cores are never oversubscribed.

On a shared machine torch's default (one thread per core in every process) made tiny matmuls
50 times slower: two processes each spinning two threads on two cores. So every process that
runs a fit sets its threads explicitly, and by default workers x threads <= the cores.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Parallelism:
    workers: int  # fits running at once
    threads: int  # torch intra-op (and inter-op) threads of each


def plan_parallelism(n_fits: int, *, workers: int | None = None, threads: int | None = None,
                     cores: int | None = None) -> Parallelism:
    """Fill in what was not asked for: one thread per fit when several fits run at once, else all the cores.

    Without ``workers``: as many fits at once as the cores hold at ``threads`` each (never more than there are
    fits). Without ``threads``: the cores shared out among the workers, at least one each. Given both, they are
    taken as asked (the caller may oversubscribe on purpose).
    """
    cores = cores or available_cores()
    if workers is None:
        workers = max(1, min(n_fits, cores // (threads or 1)))
    if threads is None:
        threads = max(1, cores // workers)
    return Parallelism(workers, threads)


def apply_threads(threads: int) -> None:
    """Set torch's intra-op and inter-op threads in this process.

    Inter-op threads can only be set before the process's first inter-op work; a process that has
    done some keeps what it has (the fits' ops run on the intra-op pool, which is always set).
    """
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(threads)
