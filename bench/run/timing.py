"""Throughput and peak memory of one zero-argument call, on CPU or CUDA.

``measure`` times the call after warm-up, ``repeats`` times, and reports the
median and interquartile range of the seconds, the throughput in importance
samples and examples per second, and the peak memory of one extra (untimed) call.

Peak memory:
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
  minus the memory allocated before the call: the peak of tensor memory the call added.
- CPU: the growth of the process's resident set during the call. Free heap memory
  is first handed back to the OS (glibc ``malloc_trim``), so memory the call
  reuses has to become resident again and counts. The peak is the kernel's
  high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the
  resident size before the call; where that reset is not available, a background
  thread samples ``VmRSS`` every millisecond (which can miss a shorter spike).
  It counts everything the process touches, not only tensors.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.plan.choices import choose

from .device import device_name

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_SAMPLE_INTERVAL_S = 0.001


@dataclass(frozen=True)
class Timing:
    """One measured call: seconds over the repeats, throughput, peak memory and the machine."""

    median_s: float
    iqr_s: float  # interquartile range of the repeats' seconds (0 for fewer than 2 repeats)
    times_s: tuple[float, ...]
    samples_per_s: float  # n_examples * k / median_s
    examples_per_s: float  # n_examples / median_s
    peak_memory_bytes: int
    memory_measure: str  # how peak_memory_bytes was measured (see the module docstring)
    n_examples: int
    k: int
    device: str
    device_name: str
    torch_version: str
    threads: int

    def as_dict(self) -> dict:
        return asdict(self)


def measure(fn: Callable[[], object], *, device: torch.device | str, n_examples: int, k: int,
            warmup: int = 1, repeats: int = 3, memory: bool = True) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls, then (unless ``memory`` is
    False) measure its peak memory with one more call."""
    device = torch.device(device)
    clock = choose("timing device", device.type, _CLOCKS)
    if n_examples < 1 or k < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need n_examples, k, repeats >= 1 and warmup >= 0; "
                         f"got {n_examples}, {k}, {repeats}, {warmup}")
    for _ in range(warmup):
        fn()
    times = tuple(clock(fn, device) for _ in range(repeats))
    median = statistics.median(times)
    peak, how = peak_memory(fn, device) if memory else (0, "not measured")
    return Timing(
        median_s=median, iqr_s=_iqr(times), times_s=times,
        samples_per_s=n_examples * k / median, examples_per_s=n_examples / median,
        peak_memory_bytes=int(peak), memory_measure=how, n_examples=n_examples, k=k,
        device=device.type, device_name=device_name(device), torch_version=torch.__version__,
        threads=torch.get_num_threads(),
    )


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> tuple[int, str]:
    """Peak memory in bytes that one call of ``fn()`` adds, and how it was measured (module docstring).

    On CPU it first hands free heap memory back to the OS, so a call timed right after it
    pays for faulting its buffers in again: time calls before measuring memory, not between.
    """
    device = torch.device(device)
    return _PEAK_MEMORY[device.type](fn, device)


def _iqr(times: tuple[float, ...]) -> float:
    if len(times) < 2:
        return 0.0
    quartiles = statistics.quantiles(times, n=4, method="inclusive")
    return quartiles[2] - quartiles[0]


# --- clocks ------------------------------------------------------------------------------------

def _cpu_seconds(fn: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cuda_seconds(fn: Callable[[], object], device: torch.device) -> float:
    # CUDA work is asynchronous: events recorded on the stream time the kernels themselves.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1000.0


_CLOCKS: dict[str, Callable[[Callable[[], object], torch.device], float]] = {"cpu": _cpu_seconds, "cuda": _cuda_seconds}


# --- peak memory -------------------------------------------------------------------------------

def _cuda_peak(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, "cuda max_memory_allocated minus allocated before"


def _cpu_peak(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    gc.collect()
    _trim_heap()
    before = _status_kib("VmRSS")
    if _reset_high_water_mark():
        fn()
        return (_status_kib("VmHWM") - before) * 1024, "cpu resident-set high-water mark minus resident before"
    peak = _sampled_peak_kib(fn)
    return (peak - before) * 1024, "cpu resident set sampled every 1 ms minus resident before"


_PEAK_MEMORY: dict[str, Callable[[Callable[[], object], torch.device], tuple[int, str]]] = {
    "cpu": _cpu_peak, "cuda": _cuda_peak}


def _status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (Linux); raises where the file is missing."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in {_STATUS}")


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0); False where not allowed."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _trim_heap() -> None:
    """Hand free heap memory back to the OS (glibc only; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _sampled_peak_kib(fn: Callable[[], object]) -> int:
    peak = _status_kib("VmRSS")
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _status_kib("VmRSS"))
            done.wait(_SAMPLE_INTERVAL_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak, _status_kib("VmRSS"))
