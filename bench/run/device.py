"""The one device resolution of bench (CLI and Python API alike), device names, per-device housekeeping."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from bench.plan.choices import choose

DEVICE_KINDS = {"auto": "auto", "cpu": "cpu", "cuda": "cuda"}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' (CUDA when present), 'cpu' or 'cuda[:i]'; asking for CUDA without it is an error (ValueError)."""
    name = str(name or "auto")
    kind = choose("device", name.split(":")[0], DEVICE_KINDS)
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available; choices here: auto, cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """What the device is, for manifests and timings: the GPU's name, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def seed_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG ``torch.random.fork_rng`` must save for work on ``device``."""
    return [device.index or 0] if device.type == "cuda" else []


def release_memory(device: torch.device) -> None:
    """Hand cached CUDA blocks back after a failure (an out-of-memory cell must not starve the next)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
