"""log p(x): exact where the model has it, otherwise the IWAE-K estimate."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vaes.base import LatentVariableModel, check_k, choose

from .bounds import iwae_of_checked_k
from .chunking import check_chunk
from .estimate import Estimate

# IWAE paper: log p(x) is reported as the IWAE bound with k = 5000.
DEFAULT_K = 5000


def _exact(model: LatentVariableModel, x: Tensor, k: int, chunk: int | None) -> Estimate:
    with torch.inference_mode():
        value = model.exact_log_marginal(x)
    if value is None:
        raise ValueError(f"{type(model).__name__} has no exact log p(x); use method 'iwae' or 'auto'")
    value = value.double()
    return Estimate(value, torch.zeros_like(value), method="exact")


def _iwae(model: LatentVariableModel, x: Tensor, k: int, chunk: int | None) -> Estimate:
    estimate = iwae_of_checked_k(model, x, k, chunk)
    return Estimate(estimate.value, estimate.stderr, estimate.terms, method="iwae")


LOG_MARGINAL_METHODS: dict[str, Callable[[LatentVariableModel, Tensor, int, int | None], Estimate]] = {
    "exact": _exact,
    "iwae": _iwae,
}


def _auto(model: LatentVariableModel, x: Tensor, k: int, chunk: int | None) -> Estimate:
    """Exact where the model has it, else IWAE."""
    with torch.inference_mode():
        has_exact = model.exact_log_marginal(x[:1]) is not None
    return (_exact if has_exact else _iwae)(model, x, k, chunk)


def log_marginal(model: LatentVariableModel, x: Tensor, *, method: str = "auto", k: int = DEFAULT_K,
                 chunk: int | None = None) -> Estimate:
    """log p(x) per example. ``method``: "exact", "iwae" (a lower bound, tight as K grows), or "auto"
    (exact when the model has it, else IWAE with ``k`` draws). ``Estimate.method`` says which was used."""
    estimate_with = choose("log-marginal method", method, {"auto": _auto, **LOG_MARGINAL_METHODS})
    check_k(k)
    check_chunk(chunk)
    return estimate_with(model, x, k, chunk)
