"""Provenance of a run: code version, package versions, device, time."""
from __future__ import annotations

import datetime as dt
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from .run.device import device_name  # one naming for manifests and timings

PACKAGES = ("torch", "numpy", "pandas", "elbo-bench")


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """The commit of the source tree this package runs from (with '+dirty' if modified), None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10,
                                check=False)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root,
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def manifest(run_id: str, *, device: torch.device, command: list[str], suite: dict, options: dict) -> dict:
    return {
        "run_id": run_id,
        "git_commit": git_commit(),
        "versions": versions(),
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "command": command,
        "suite": suite,
        "options": options,
        "started": now(),
        "finished": None,
        "summary": None,
    }
