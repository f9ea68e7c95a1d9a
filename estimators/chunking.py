"""Draws in chunks of K, the chunk chosen from a memory budget rather than hard-coded."""
from __future__ import annotations

import os
from typing import Iterator

import torch
from torch import Tensor

from vaes.base import LatentVariableModel, LogWeights, check_k

# On CPU the budget is a setting. A chunk of ~30k draw rows (1,000 examples x 30 draws for the
# MLP VAE) already runs the matmuls at full speed; a bigger chunk only costs memory, and a
# small budget keeps the peak flat in K.
DEFAULT_CPU_BUDGET_MB = 32
# On CUDA the budget is this fraction of the memory free when the estimate starts.
CUDA_FREE_FRACTION = 0.5
BUDGET_ENV = "ELBO_BENCH_MEMORY_BUDGET_MB"


def memory_budget_bytes(device: torch.device) -> int:
    """Bytes an estimator may use for one chunk of draws on ``device``.

    ``ELBO_BENCH_MEMORY_BUDGET_MB`` overrides the default on every device.
    """
    override = os.environ.get(BUDGET_ENV)
    if override:
        try:
            megabytes = float(override)
        except ValueError:
            raise ValueError(f"{BUDGET_ENV} must be a number of megabytes, got {override!r}") from None
        if megabytes <= 0:
            raise ValueError(f"{BUDGET_ENV} must be positive, got {override!r}")
        return int(megabytes * 2**20)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_FRACTION)
    return DEFAULT_CPU_BUDGET_MB * 2**20


def choose_chunk(model: LatentVariableModel, x: Tensor, k: int, budget_bytes: int | None = None) -> int:
    """The largest number of draws per chunk whose footprint fits the budget (at least 1, at most K)."""
    budget = memory_budget_bytes(x.device) if budget_bytes is None else budget_bytes
    per_draw = max(1, model.draw_nbytes(x))
    return max(1, min(k, budget // per_draw))


def draw_chunks(model: LatentVariableModel, x: Tensor, k: int, chunk: int | None = None) -> Iterator[LogWeights]:
    """Yield ``LogWeights`` for K draws in chunks of at most ``chunk`` (chosen from the budget if None)."""
    check_k(k)
    if chunk is None:
        chunk = choose_chunk(model, x, k)
    check_k(chunk)
    done = 0
    while done < k:
        size = min(chunk, k - done)
        log_weights = model.log_weights(x, size)
        if log_weights.log_likelihood.shape != (size, x.shape[0]):
            raise ValueError(
                f"{type(model).__name__}.log_weights returned shape {tuple(log_weights.log_likelihood.shape)}, "
                f"expected [{size}, {x.shape[0]}]"
            )
        yield log_weights
        done += size
