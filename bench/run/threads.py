"""How many fits run at once and how many torch threads each gets, so the cores are never oversubscribed.

On a shared machine torch's default (one thread per core in every process) made tiny matmuls
50 times slower: two processes each spinning two threads on two cores. So every process that
runs a fit sets its threads explicitly, and by default workers x threads <= the cores.

The default is one thread per fit whatever the executor and the number of workers: the last bits
of a float reduction can depend on how many threads split it, and a run's values must not depend
on how many fits ran at once. The embedded suites' models are small enough that one thread is
also the fastest; a large model on CPU asks for more with --threads (or the suite's ``threads``).
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch


def available_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def available_cores() -> int:
    """How many CPUs this process may run on."""
    return len(available_cpus())


def _cpu_jiffies() -> dict[int, tuple[int, int]] | None:
    """Per CPU, (busy, total) clock ticks since boot from /proc/stat; None where there is none (not Linux)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    ticks = {}
    for line in lines:
        name, *fields = line.split() or [""]
        if name.startswith("cpu") and name[3:].isdigit() and len(fields) >= 8:
            # user nice system idle iowait irq softirq steal: guest time is already inside user
            try:
                values = [int(v) for v in fields[:8]]
            except ValueError:  # not the format this reads: fall back to the load average
                return None
            total = sum(values)
            ticks[int(name[3:])] = (total - values[3] - values[4], total)
    return ticks or None


def busy_cores(window_s: float = 0.3) -> float:
    """How many of this process's cores other work keeps busy now.

    Measured over a short window from /proc/stat (this process sleeps through it), not from the load
    average: that is a minute's decaying mean, so right after a run ends it still counts the run's workers
    and an idle machine would look busy for a minute or more. Without /proc/stat, the 1-minute load average.
    """
    before = _cpu_jiffies()
    if before is None:
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this platform either
            return 0.0
    time.sleep(window_s)
    after = _cpu_jiffies() or {}
    busy = 0.0
    for cpu in available_cpus():
        if cpu in before and cpu in after:
            total = after[cpu][1] - before[cpu][1]
            busy += (after[cpu][0] - before[cpu][0]) / total if total > 0 else 0.0
    return busy


def idle_cores() -> int:
    """The available cores less those other work keeps busy (busy_cores, rounded), at least one.

    On a shared machine a second worker only competes with the jobs already there: on 2 cores with two
    other busy processes, two workers ran the default suite slower than one.
    """
    return max(1, available_cores() - round(busy_cores()))


class Parallelism(NamedTuple):
    workers: int  # fits running at once
    threads: int  # torch intra-op (and inter-op) threads of each


def plan_parallelism(n_fits: int, *, workers: int | None = None, threads: int | None = None,
                     cores: int | None = None) -> Parallelism:
    """Fill in what was not asked for: one thread per fit, and as many fits at once as the idle cores hold.

    Without ``workers``: cores // threads fits at once (``cores`` defaults to the idle ones), at least one and
    never more than there are fits. Given both, they are taken as asked (the caller may oversubscribe).
    """
    threads = threads or 1
    if workers is None:
        if cores is None and min(n_fits, available_cores() // threads) <= 1:
            cores = threads  # one fit at a time whatever the load: skip measuring it (busy_cores sleeps 0.3 s)
        workers = max(1, min(n_fits, (cores or idle_cores()) // threads))
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
