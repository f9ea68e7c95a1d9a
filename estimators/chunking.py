"""Draws in chunks of K, the chunk chosen from a memory budget rather than hard-coded.

The chunk sets only how much is held at once, never which draws are made: each draw's noise
comes from its own generator (``vaes.draws``), so the same seed gives the same values at any
chunk or budget (up to the rounding of matrix products whose kernel depends on their size)."""
from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from vaes.base import LatentVariableModel, LogWeights, check_k

# On CPU the budget is a setting. Models that share their per-batch work across chunks
# (log_weight_chunks) run about as fast in small chunks as in large ones: K = 2,000 on 1,000
# examples takes the same time in chunks of 43 or 2,000 draws for the MLP VAE. A small budget
# keeps the peak flat in K, the [chunk, B] tensors small beside the decoder's fixed blocks
# (14 MB at 1,000 examples): at 2 MB, K = 5,000 peaks 1.00-1.04x as high as K = 50 there; at
# 4 MB, 1.06-1.29x.
DEFAULT_CPU_BUDGET_MB = 2
# A chunk holds at least this many draw rows (draws x examples), as one draw of a batch this
# large would, and at least MIN_CHUNK_ELEMENTS numbers per data-sized [rows, D] tensor. Below
# that a chunk's many small ops cost more in per-call overhead than its memory is worth: a
# T = 8 VDM on 16 examples takes 2.2 s for K = 5,000 in chunks of 3 draws (its 2 MB budget),
# 1.4 s in chunks of 8 and 1.1 s in chunks of 32 (512 rows); the T = 32 oracle on the 2-d
# mixture (125 examples, K = 1,000) takes 2.2 s in chunks of 5 draws (512 rows) and 1.2 s in
# chunks of 132 (32,768 numbers per [rows, 2] tensor). Batches of MIN_CHUNK_ROWS examples or
# more and data of 64 dimensions or more are held to the row floor alone.
MIN_CHUNK_ROWS = 512
MIN_CHUNK_ELEMENTS = 32_768
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
        if not math.isfinite(megabytes) or megabytes <= 0:
            raise ValueError(f"{BUDGET_ENV} must be a finite number of megabytes > 0, got {override!r}")
        return int(megabytes * 2**20)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_FRACTION)
    return DEFAULT_CPU_BUDGET_MB * 2**20


def check_chunk(chunk: int | None) -> None:
    """A chunk, where given, is a positive number of draws (None: chosen from the memory budget)."""
    if chunk is not None:
        check_k(chunk, "chunk")


def choose_chunk(model: LatentVariableModel, x: Tensor, k: int, budget_bytes: int | None = None) -> int:
    """The largest number of draws per chunk whose footprint fits the budget, at most K and at
    least MIN_CHUNK_ROWS rows and MIN_CHUNK_ELEMENTS numbers of data per chunk (one draw for
    batches of that size or more)."""
    budget = memory_budget_bytes(x.device) if budget_bytes is None else budget_bytes
    per_draw = max(1, model.draw_nbytes(x))
    batch, data_dim = x.shape
    floor = math.ceil(max(MIN_CHUNK_ROWS, MIN_CHUNK_ELEMENTS / data_dim) / batch)
    return min(k, max(floor, budget // per_draw))


def draw_chunks(model: LatentVariableModel, x: Tensor, k: int, chunk: int | None = None) -> Iterator[LogWeights]:
    """Yield ``LogWeights`` for K draws in chunks of at most ``chunk`` (chosen from the budget if None).

    K and the chunk were checked by the public estimator that asks."""
    if chunk is None:
        chunk = choose_chunk(model, x, k)
    sizes = [min(chunk, k - done) for done in range(0, k, chunk)]
    for size, log_weights in zip(sizes, model.log_weight_chunks(x, sizes), strict=True):
        if log_weights.log_likelihood.shape != (size, x.shape[0]):
            raise ValueError(
                f"{type(model).__name__} log weights of a chunk have shape {tuple(log_weights.log_likelihood.shape)}, "
                f"expected [{size}, {x.shape[0]}]"
            )
        yield log_weights
