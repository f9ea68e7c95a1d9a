"""One training loop for every model variant; the objective comes from the model's own spec via estimators.

Length: ``steps`` optimizer steps, or, when ``epochs`` is set, ``ceil(epochs *
N_train / batch_size)`` steps (``epochs`` then replaces ``steps``). Every
schedule spreads over that length; "iwae-stages" splits it into stages
i = 0..stages-1 of relative length 3^i at learning rate ``lr * 10^(-i/7)``
(Burda et al. 2015: 8 stages, 3^i epochs each, 3280 epochs in all, lr 1e-3,
Adam beta2 = 0.999, eps = 1e-4; ``epochs=3280, stages=8`` is exactly that
schedule, and e.g. ``epochs=40, stages=4`` its first four stages in proportion).

Checkpoints live in ``cache_dir`` under a key hashing (variant, model config
hash, dataset name and training-data fingerprint, train config, seed); they
hold tensors, numbers and strings only and are read with
``torch.load(weights_only=True)``, so a foreign file cannot run code. A file
under the right name that cannot be read as this cell's checkpoint raises
:class:`CheckpointError` (delete it to retrain); it is never silently replaced.

Long runs resume at epoch granularity: with a cache directory, the full training
state (weights, Adam moments, schedule position, the batch-order and sampling RNG
states, history) goes to ``<checkpoint>.resume.pt`` at the end of an epoch when
``resume_interval_s`` has passed since the last one, and at the end of every stage
of "iwae-stages". A later call for the same cell continues from there and gives the
same weights, bit for bit on CPU, as a run that was never interrupted. The file is
removed once the final checkpoint is written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from estimators import elbo, training_objective
from vaes import LatentVariableModel, create_model

from .data import Dataset

CHECKPOINT_FORMAT = 1  # bump when the payload layout changes: old files then stop matching


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps; replaced by epochs when that is set
    epochs: float | None = None  # passes over the training split; None: the length is `steps`
    batch_size: int = 100  # IWAE paper uses 20; 100 keeps CPU runs short with the same optimum
    lr: float = 1e-3  # IWAE paper's initial rate
    schedule: str = "constant"  # "constant" | "cosine" | "iwae-stages" (see SCHEDULES)
    stages: int = 8  # iwae-stages only: number of stages (8 in the IWAE paper; fewer for a shortened run)
    betas: tuple[float, float] = (0.9, 0.999)  # IWAE paper's Adam betas
    eps: float = 1e-4  # IWAE paper's Adam epsilon (larger than torch's 1e-8: damps steps on rarely used units)
    seed: int = 0  # model initialisation, batch order and posterior draws
    eval_every: int = 200  # record the validation ELBO (and mean training loss) every this many steps
    eval_examples: int = 1000  # size of the fixed validation subset (first rows of the valid split)
    output_bias_init: bool = True  # Bernoulli decoders: output bias = logit of the mean training pixel (IWAE paper)

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))  # TOML gives lists
        positive = {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr, "stages": self.stages,
                    "eval_every": self.eval_every, "eval_examples": self.eval_examples}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"train config {name} must be > 0, got {value!r}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"train config epochs must be > 0 (or unset to train for `steps`), got {self.epochs!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choices: {', '.join(sorted(SCHEDULES))}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train config betas must be two numbers in [0, 1), got {self.betas!r}")

    def total_steps(self, n_train: int) -> int:
        if self.epochs is None:
            return self.steps
        return max(1, math.ceil(self.epochs * n_train / self.batch_size))


# --- learning-rate schedules: (step, total steps, config) -> multiplier of config.lr -----------------

def _constant(step: int, total: int, config: TrainConfig) -> float:
    return 1.0


def _cosine(step: int, total: int, config: TrainConfig) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def iwae_stage(step: int, total: int, stages: int) -> int:
    """The stage i that ``step`` falls in when ``total`` steps are split in proportion 3^0 : 3^1 : ... .

    Stage i starts after the fraction (3^i - 1) / (3^stages - 1) of the run; compared in integers, so
    stage boundaries that fall on whole steps (e.g. whole epochs) are exact.
    """
    return max(i for i in range(stages) if step * (3**stages - 1) >= total * (3**i - 1))


def _iwae_stages(step: int, total: int, config: TrainConfig) -> float:
    return 10.0 ** (-iwae_stage(step, total, config.stages) / 7)


SCHEDULES: dict[str, Callable[[int, int, TrainConfig], float]] = {
    "constant": _constant,
    "cosine": _cosine,  # from lr to 0 over the run
    "iwae-stages": _iwae_stages,
}


# --- errors and results ----------------------------------------------------------------------------

class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


class CheckpointError(RuntimeError):
    """A cached checkpoint exists but is not a readable checkpoint of this cell."""


@dataclass
class TrainResult:
    model: LatentVariableModel  # eval mode, on the training device
    history: list[dict]  # step 0, then every eval_every steps and the last: step, epoch, lr, train_loss, valid_elbo, seconds
    checkpoint: Path | None  # where the trained state lies (None without a cache directory)
    from_cache: bool  # True: loaded, not trained, in this call
    train_seconds: float  # wall time of the training itself (as recorded when it ran, also when loaded)
    steps: int = 0  # optimizer steps the model was trained for
    key: str = ""  # the checkpoint key (hash of the cell's identity)


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' (CUDA when present), 'cpu' or 'cuda[:i]'; asking for CUDA without it is an error."""
    if isinstance(name, torch.device):
        name = str(name)
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; choices: auto, cpu, cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available; choices here: auto, cpu")
    return torch.device(name)


# --- checkpoint identity and storage ---------------------------------------------------------------

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
    """torch.save to a temporary file beside ``path``, then os.replace: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: {first_line}; delete the file to retrain") from error
    return payload


# --- the loop ---------------------------------------------------------------------------------------

def build_model(model_name: str, model_config: dict, dataset: Dataset) -> LatentVariableModel:
    """The registered model sized for ``dataset`` (data_dim and likelihood from the data unless given)."""
    config = {"data_dim": dataset.data_dim, "likelihood": dataset.likelihood, **model_config}
    return create_model(model_name, **config)


def initial_model(model_name: str, model_config: dict, dataset: Dataset, cfg: TrainConfig) -> LatentVariableModel:
    """The model training starts from (on CPU): seeded init, then the output-bias init. Reseeds the global torch RNG."""
    torch.manual_seed(cfg.seed)
    model = build_model(model_name, model_config, dataset)
    if cfg.output_bias_init and hasattr(model, "set_output_bias") and getattr(model.config, "likelihood", None) == "bernoulli":
        model.set_output_bias(dataset.train.mean(0))
    return model


def _seed_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def _validation_elbo(model: LatentVariableModel, valid: Tensor, seed: int, device: torch.device) -> float:
    """Mean single-draw ELBO on the fixed validation subset, with the same draws at every evaluation."""
    with torch.random.fork_rng(devices=_seed_devices(device)):
        torch.manual_seed(seed + 1)  # separate stream: evaluating does not change the training draws
        model.eval()
        value = elbo(model, valid).mean()
        model.train()
    return value


def _record(step: int, train_loss: float, model: LatentVariableModel, valid: Tensor, cfg: TrainConfig,
            device: torch.device, optimizer: torch.optim.Optimizer, steps_per_epoch: int, start: float) -> dict:
    """One history entry; train_loss is the mean loss over the steps since the previous entry."""
    return {"step": step, "epoch": step / steps_per_epoch, "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train_loss, "valid_elbo": _validation_elbo(model, valid, cfg.seed, device),
            "seconds": time.perf_counter() - start}


# Seconds between resume states at epoch ends (stage ends are always kept): short epochs would
# otherwise spend more time writing state than training.
RESUME_INTERVAL_S = 60.0


def train_model(model_name: str, model_config: dict, dataset: Dataset, train_config: TrainConfig, *,
                device: torch.device | str | None = None, cache_dir: Path | None = None,
                progress: bool = True, resume_interval_s: float = RESUME_INTERVAL_S) -> TrainResult:
    """Train (or load from ``cache_dir``) ``model_name`` on ``dataset.train``; device None means auto.

    An unfinished run of the same cell in ``cache_dir`` is continued from its last resume state.
    """
    device = resolve_device(device)
    cfg = train_config
    with torch.random.fork_rng(devices=_seed_devices(device)):  # seeding here leaves the caller's RNG alone
        model = initial_model(model_name, model_config, dataset, cfg)
        key = checkpoint_key(model_name, model, dataset, cfg)
        path = checkpoint_path(cache_dir, model_name, dataset, key) if cache_dir is not None else None
        if path is not None and path.exists():
            model.to(device)
            payload = load_checkpoint(path, key, model, device)
            return TrainResult(model.eval(), payload["history"], path, True, float(payload["train_seconds"]),
                               int(payload["steps"]), key)
        resume = _ResumeFile(resume_path(path), key, resume_interval_s) if path is not None else None
        result = _fit(model, dataset, cfg, device, progress, f"{model_name} on {dataset.name}", resume)
    result.key = key
    if path is not None:
        save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "key": key, "state_dict": result.model.state_dict(),
                               "history": result.history, "train_seconds": result.train_seconds,
                               "steps": result.steps})
        result.checkpoint = path
        resume.path.unlink(missing_ok=True)
    return result


@dataclass
class _Progress:
    """What the loop carries from step to step, beyond the model and optimizer."""
    step: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)
    window_loss: float = 0.0  # summed loss since the last history entry
    window_steps: int = 0
    seconds: float = 0.0  # training wall time before this call (a resumed run adds to it)
    order: Tensor = dataclasses.field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # this epoch's batch order


@dataclass
class _ResumeFile:
    """The resume state of one training cell: written at epoch ends, read when the cell starts again."""
    path: Path
    key: str
    interval_s: float
    last_saved: float = dataclasses.field(default_factory=time.perf_counter)

    def load(self, model, optimizer, scheduler, order_gen: torch.Generator, device: torch.device) -> _Progress:
        if not self.path.exists():
            return _Progress()

        def restore(payload: dict) -> None:
            optimizer.load_state_dict(payload["optimizer"])
            scheduler.load_state_dict(payload["scheduler"])
            order_gen.set_state(payload["order_rng"].cpu())
            torch.set_rng_state(payload["cpu_rng"].cpu())
            if device.type == "cuda":
                torch.cuda.set_rng_state(payload["cuda_rng"].cpu(), device)

        payload = load_checkpoint(self.path, self.key, model, device, restore)
        return _Progress(int(payload["step"]), payload["history"], float(payload["window_loss"]),
                         int(payload["window_steps"]), float(payload["seconds"]), payload["order"].to(device))

    def due(self, epoch_end: bool, stage_end: bool) -> bool:
        return stage_end or (epoch_end and time.perf_counter() - self.last_saved >= self.interval_s)

    def save(self, model, optimizer, scheduler, order_gen: torch.Generator, device: torch.device,
             progress: _Progress) -> None:
        payload = {"format": CHECKPOINT_FORMAT, "key": self.key, "state_dict": model.state_dict(),
                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "order_rng": order_gen.get_state(), "cpu_rng": torch.get_rng_state(),
                   **dataclasses.asdict(progress)}
        if device.type == "cuda":
            payload["cuda_rng"] = torch.cuda.get_rng_state(device)
        save_checkpoint(self.path, payload)
        self.last_saved = time.perf_counter()


def _stage_ends(step: int, total: int, cfg: TrainConfig) -> bool:
    """Whether ``step`` (1-based count of steps done) closes a stage of the "iwae-stages" schedule."""
    return (cfg.schedule == "iwae-stages" and step < total
            and iwae_stage(step, total, cfg.stages) != iwae_stage(step - 1, total, cfg.stages))


def _fit(model: LatentVariableModel, dataset: Dataset, cfg: TrainConfig, device: torch.device,
         progress: bool, label: str, resume: _ResumeFile | None = None) -> TrainResult:
    train = dataset.train.to(device)
    valid = dataset.valid[: cfg.eval_examples].to(device)
    n_train = train.shape[0]
    batch_size = min(cfg.batch_size, n_train)
    total = cfg.total_steps(n_train)
    steps_per_epoch = math.ceil(n_train / batch_size)

    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    schedule = SCHEDULES[cfg.schedule]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, total, cfg))
    order_gen = torch.Generator().manual_seed(cfg.seed)  # batch order on CPU: identical on every device
    state = resume.load(model, optimizer, scheduler, order_gen, device) if resume is not None else _Progress()

    start = time.perf_counter() - state.seconds  # a resumed run's time counts from its first start
    bar = tqdm(total=total, initial=state.step, desc=label, disable=not progress, leave=False)
    for step in range(state.step, total):
        position = (step % steps_per_epoch) * batch_size
        if position == 0:
            state.order = torch.randperm(n_train, generator=order_gen).to(device)
        x = train[state.order[position: position + batch_size]]
        loss = -training_objective(model, x).mean()
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"training loss is {loss.item()} at step {step} ({label}, lr {scheduler.get_last_lr()[0]:.3g}); "
                f"lower lr or check the data")
        if step == 0:  # the starting point, so the history shows how far training moved
            state.history.append(_record(0, loss.item(), model, valid, cfg, device, optimizer, steps_per_epoch, start))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        state.window_loss += loss.item()
        state.window_steps += 1
        state.step = step + 1
        bar.update(1)
        if state.step % cfg.eval_every == 0 or state.step == total:
            record = _record(state.step, state.window_loss / state.window_steps, model, valid, cfg, device,
                             optimizer, steps_per_epoch, start)
            state.history.append(record)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", valid_elbo=f"{record['valid_elbo']:.3f}")
            state.window_loss, state.window_steps = 0.0, 0
        epoch_end = state.step % steps_per_epoch == 0 and state.step < total
        if resume is not None and resume.due(epoch_end, _stage_ends(state.step, total, cfg)):  # mid-epoch too
            state.seconds = time.perf_counter() - start
            resume.save(model, optimizer, scheduler, order_gen, device, state)
    bar.close()
    seconds = time.perf_counter() - start
    return TrainResult(model.eval(), state.history, None, False, seconds, total)
