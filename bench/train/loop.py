"""One training loop for every model variant; the objective comes from the model's own spec via estimators.

Length: ``steps`` optimizer steps, or, when ``epochs`` is set, ``ceil(epochs *
N_train / batch_size)`` steps (``epochs`` then replaces ``steps``). Every
schedule spreads over that length (bench.train.schedules); ``epochs=3280,
stages=8`` with "iwae-stages" is exactly the IWAE paper's schedule, and e.g.
``epochs=40, stages=4`` its first four stages in proportion.

With a cache directory, a trained model is saved as a checkpoint and loaded
instead of retrained; a long run keeps a resume state (bench.train.checkpoints)
and a later call for the same cell continues from it and gives the same weights,
bit for bit on CPU, as a run that was never interrupted. The resume file is
removed once the final checkpoint is written.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from estimators import elbo, training_objective
from vaes import LatentVariableModel, create_model
from vaes.base import OUTPUT_BIAS

from ..data import Dataset
from ..run.device import resolve_device, seed_devices
from .checkpoints import (
    CHECKPOINT_FORMAT,
    Progress,
    ResumeFile,
    checkpoint_key,
    checkpoint_path,
    load_checkpoint,
    resume_path,
    save_checkpoint,
)
from .config import TrainConfig
from .schedules import SCHEDULES, stage_ends


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainResult:
    model: LatentVariableModel  # eval mode, on the training device
    # step 0, then every eval_every steps and the last: step, epoch, lr, train_loss, valid_elbo, seconds
    history: list[dict]
    checkpoint: Path | None  # where the trained state lies (None without a cache directory)
    from_cache: bool  # True: loaded, not trained, in this call
    train_seconds: float  # wall time of the training itself (as recorded when it ran, also when loaded)
    steps: int = 0  # optimizer steps the model was trained for
    key: str = ""  # the checkpoint key (hash of the cell's identity)


def build_model(model_name: str, model_config: dict, dataset: Dataset) -> LatentVariableModel:
    """The registered model sized for ``dataset`` (data_dim and likelihood from the data unless given)."""
    config = {"data_dim": dataset.data_dim, "likelihood": dataset.likelihood, **model_config}
    return create_model(model_name, **config)


def initial_model(model_name: str, model_config: dict, dataset: Dataset, cfg: TrainConfig) -> LatentVariableModel:
    """The model training starts from (on CPU): seeded init, then the output-bias init. Reseeds the global torch RNG."""
    torch.manual_seed(cfg.seed)
    model = build_model(model_name, model_config, dataset)
    bernoulli = getattr(model.config, "likelihood", None) == "bernoulli"
    if cfg.output_bias_init and model.supports(OUTPUT_BIAS) and bernoulli:
        model.set_output_bias(dataset.train.mean(0))
    return model


def _validation_elbo(model: LatentVariableModel, valid: Tensor, seed: int, device: torch.device) -> float:
    """Mean single-draw ELBO on the fixed validation subset, with the same draws at every evaluation."""
    with torch.random.fork_rng(devices=seed_devices(device)):
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
    with torch.random.fork_rng(devices=seed_devices(device)):  # seeding here leaves the caller's RNG alone
        model = initial_model(model_name, model_config, dataset, cfg)
        key = checkpoint_key(model_name, model, dataset, cfg)
        path = checkpoint_path(cache_dir, model_name, dataset, key) if cache_dir is not None else None
        if path is not None and path.exists():
            model.to(device)
            payload = load_checkpoint(path, key, model, device)
            return TrainResult(model.eval(), payload["history"], path, True, float(payload["train_seconds"]),
                               int(payload["steps"]), key)
        resume = ResumeFile(resume_path(path), key, resume_interval_s) if path is not None else None
        result = _fit(model, dataset, cfg, device, progress, f"{model_name} on {dataset.name}", resume)
    result.key = key
    if path is not None:
        save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "key": key, "state_dict": result.model.state_dict(),
                               "history": result.history, "train_seconds": result.train_seconds,
                               "steps": result.steps})
        result.checkpoint = path
        resume.path.unlink(missing_ok=True)
    return result


def _fit(model: LatentVariableModel, dataset: Dataset, cfg: TrainConfig, device: torch.device,
         progress: bool, label: str, resume: ResumeFile | None = None) -> TrainResult:
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
    state = resume.load(model, optimizer, scheduler, order_gen, device) if resume is not None else Progress()

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
        if resume is not None and resume.due(epoch_end, stage_ends(state.step, total, cfg)):  # mid-epoch too
            state.seconds = time.perf_counter() - start
            resume.save(model, optimizer, scheduler, order_gen, device, state)
    bar.close()
    seconds = time.perf_counter() - start
    return TrainResult(model.eval(), state.history, None, False, seconds, total)
