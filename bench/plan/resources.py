"""What a cell needs in memory, estimated from sizes alone, and the limit it must fit under.

A model is built on torch's meta device (shapes, no storage) to count its parameters, so a layer
width of 10^10 is refused before any allocation. A cell's peak is estimated as

  training state: parameters x 4 (weights, gradients, two Adam moments)
  + one chunk of draws: ``model.draw_nbytes(batch)`` x the chunk the memory budget chooses
  + the Pareto tail kept per example for k-hat: ``tail_size(R x K)`` float64 weights x batch

(the [chunk, B] log weights are part of draw_nbytes). Everything else a cell holds is a few
tensors of the batch's size. The limit is the machine's physical memory, or the setting below.
"""
from __future__ import annotations

import os

import torch

from vaes import create_model

from .numbers import megabytes_problem

LIMIT_ENV = "ELBO_BENCH_MEMORY_LIMIT_MB"
TRAINING_COPIES = 4  # weights, gradients and Adam's two moments


class ResourceError(ValueError):
    """A setting of the resources (the memory limit) that cannot be read."""


def memory_limit_bytes() -> int:
    """The bytes a cell may need: $ELBO_BENCH_MEMORY_LIMIT_MB, else the machine's physical memory."""
    override = os.environ.get(LIMIT_ENV)
    if override:
        problem = megabytes_problem(override)
        if problem is not None:
            raise ResourceError(f"{LIMIT_ENV} {problem}")
        return int(float(override) * 2**20)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not POSIX: no limit known
        return 2**63


def meta_model(name: str, config: dict):
    """The model built on the meta device: its shapes, no memory."""
    with torch.device("meta"):
        return create_model(name, **config)


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def training_bytes(model) -> int:
    return TRAINING_COPIES * parameter_bytes(model)


def draw_bytes(model, batch: int, data_dim: int, draws: int) -> tuple[int, int]:
    """(bytes, chunk): the peak of ``draws`` draws per example of a batch, drawn in chunks as the estimators do."""
    from estimators.chunking import choose_chunk
    from estimators.psis import tail_size

    x = torch.empty(batch, data_dim, device="meta")
    chunk = choose_chunk(model, x, draws)
    return chunk * max(1, model.draw_nbytes(x)) + 8 * batch * tail_size(draws), chunk


def describe_bytes(n: int) -> str:
    for unit, size in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 2**10:.3g} kB"


def too_large(estimate: int, limit: int) -> str | None:
    """The refusal of an estimate beyond the limit, naming both and the setting that raises it; None if it fits."""
    if estimate <= limit:
        return None
    source = (f"{LIMIT_ENV}; raise it to allow more" if os.environ.get(LIMIT_ENV)
              else f"this machine's memory; set {LIMIT_ENV} to raise it")
    return f"needs about {describe_bytes(estimate)} of memory, beyond the limit of {describe_bytes(limit)} ({source})"
