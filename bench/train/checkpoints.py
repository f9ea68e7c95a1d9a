"""Checkpoints of trained models and resume states of unfinished training, in a cache directory.

A checkpoint's key hashes (variant, model config hash, dataset name and training-data
fingerprint, train config, seed). Files hold tensors, numbers and strings only and are read
with ``torch.load(weights_only=True)``, so a foreign file cannot run code. A file under the
right name that cannot be read as this cell's checkpoint raises :class:`CheckpointError`
(delete it to retrain); it is never silently replaced.

Resume state: the full training state (weights, Adam moments, schedule position, the
batch-order and sampling RNG states, history) goes to ``<checkpoint>.resume.pt`` at the end
of an epoch when ``interval_s`` has passed since the last one, and at the end of every stage
of "iwae-stages"; a later call for the same cell continues from there.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from reports.schema import write_atomic
from vaes import LatentVariableModel

from ..data import Dataset
from .config import TrainConfig

CHECKPOINT_FORMAT = 1  # bump when the payload layout changes: old files then stop matching


class CheckpointError(RuntimeError):
    """A cached checkpoint exists but is not a readable checkpoint of this cell."""


def data_fingerprint(data: Tensor) -> str:
    """sha256 of the training split: a dataset's seed changes its split, and so the checkpoint."""
    array = data.detach().cpu().contiguous().numpy()
    return hashlib.sha256(str(array.shape).encode() + array.tobytes()).hexdigest()[:16]


def checkpoint_key(model_name: str, model: LatentVariableModel, dataset: Dataset, train_config: TrainConfig) -> str:
    identity = {
        "format": CHECKPOINT_FORMAT,
        "variant": model_name,
        "model_config_hash": model.config_hash(),
        "dataset": dataset.name,
        "train_data": data_fingerprint(dataset.train),
        "train_config": dataclasses.asdict(train_config),
        "seed": train_config.seed,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def checkpoint_path(cache_dir: Path, model_name: str, dataset: Dataset, key: str) -> Path:
    return Path(cache_dir) / f"{model_name}--{dataset.name}--{key}.pt"


def resume_path(checkpoint: Path) -> Path:
    """Where an unfinished run of ``checkpoint``'s cell keeps its training state."""
    return checkpoint.with_suffix(".resume.pt")


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save through the one atomic writer: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: Path, key: str, model: LatentVariableModel, device: torch.device,
                    restore: Callable[[dict], None] | None = None) -> dict:
    """Load ``path`` into ``model`` (and hand the payload to ``restore``, e.g. for the optimizer);
    weights_only=True refuses anything but tensors and plain containers."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(payload, dict) or payload.get("key") != key:
            raise ValueError("it is not a checkpoint of this training cell")
        model.load_state_dict(payload["state_dict"])
        if restore is not None:
            restore(payload)
    except Exception as error:  # unpickling refusal, truncation, wrong keys or shapes: all the same to the user
        raise CheckpointError(f"cannot load checkpoint {path}: {_load_problem(error)}; refused, not used: "
                              "delete the file to retrain") from error
    return payload


def _load_problem(error: Exception) -> str:
    """The reason a checkpoint did not load, in our words where torch's would advise unsafe loading.

    torch's refusal suggests retrying with weights_only=False, which would run the file's code: wrong advice
    for a file in a cache that anything may have written."""
    text = str(error).strip()
    if "weights_only" in text or "Weights only load failed" in text:
        return ("it holds objects other than tensors and plain containers, which are refused "
                "(loading them could run code)")
    return text.splitlines()[0] if text else type(error).__name__


@dataclass
class Progress:
    """What the loop carries from step to step, beyond the model and optimizer."""

    step: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)
    window_loss: float = 0.0  # summed loss since the last history entry
    window_steps: int = 0
    seconds: float = 0.0  # training wall time before this call (a resumed run adds to it)
    order: Tensor = dataclasses.field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # this epoch's order


@dataclass
class ResumeFile:
    """The resume state of one training cell: written at epoch ends, read when the cell starts again."""

    path: Path
    key: str
    interval_s: float
    last_saved: float = dataclasses.field(default_factory=time.perf_counter)

    def load(self, model, optimizer, scheduler, order_gen: torch.Generator, device: torch.device) -> Progress:
        if not self.path.exists():
            return Progress()

        def restore(payload: dict) -> None:
            optimizer.load_state_dict(payload["optimizer"])
            scheduler.load_state_dict(payload["scheduler"])
            order_gen.set_state(payload["order_rng"].cpu())
            torch.set_rng_state(payload["cpu_rng"].cpu())
            if device.type == "cuda":
                torch.cuda.set_rng_state(payload["cuda_rng"].cpu(), device)

        payload = load_checkpoint(self.path, self.key, model, device, restore)
        return Progress(int(payload["step"]), payload["history"], float(payload["window_loss"]),
                        int(payload["window_steps"]), float(payload["seconds"]), payload["order"].to(device))

    def due(self, epoch_end: bool, stage_end: bool) -> bool:
        return stage_end or (epoch_end and time.perf_counter() - self.last_saved >= self.interval_s)

    def save(self, model, optimizer, scheduler, order_gen: torch.Generator, device: torch.device,
             progress: Progress) -> None:
        payload = {"format": CHECKPOINT_FORMAT, "key": self.key, "state_dict": model.state_dict(),
                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "order_rng": order_gen.get_state(), "cpu_rng": torch.get_rng_state(),
                   **dataclasses.asdict(progress)}
        if device.type == "cuda":
            payload["cuda_rng"] = torch.cuda.get_rng_state(device)
        save_checkpoint(self.path, payload)
        self.last_saved = time.perf_counter()
