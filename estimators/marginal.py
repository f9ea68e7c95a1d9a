"""log p(x): exact where the model has it, otherwise the IWAE-K estimate."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vaes.base import LatentVariableModel

from .bounds import iwae
from .estimate import Estimate

# IWAE paper: log p(x) is reported as the IWAE bound with k = 5000.
DEFAULT_K = 5000


def _exact(model: LatentVariableModel, x: Tensor, k: int, chunk: int | None, replicates: int) -> Estimate:
    with torch.inference_mode():
        value = model.exact_log_marginal(x)
    if value is None:
        raise ValueError(f"{type(model).__name__} has no exact log p(x); use method 'iwae' or 'auto'")
    value = value.double()
    return Estimate(value, torch.zeros_like(value), method="exact")


def _iwae(model: LatentVariableModel, x: Tensor, k: int, chunk: int | None, replicates: int) -> Estimate:
    estimate = iwae(model, x, k=k, replicates=replicates, chunk=chunk)
    return Estimate(estimate.value, estimate.stderr, estimate.terms, method="iwae", stderr_dof=estimate.stderr_dof)


# method -> f(model, x, k, chunk, replicates)
LOG_MARGINAL_METHODS: dict[str, Callable[[LatentVariableModel, Tensor, int, int | None, int], Estimate]] = {
    "exact": _exact,
    "iwae": _iwae,
}


def log_marginal(model: LatentVariableModel, x: Tensor, *, method: str = "auto", k: int = DEFAULT_K,
                 replicates: int = 1, chunk: int | None = None) -> Estimate:
    """log p(x) per example. ``method``: "exact", "iwae" (a lower bound, tight as K grows), or "auto"
    (exact when the model has it, else IWAE with ``k`` draws). ``Estimate.method`` says which was used.
    ``replicates``: independent IWAE-k estimates averaged, their spread the error (see ``iwae``); an exact
    value ignores it."""
    if method == "auto":
        with torch.inference_mode():
            method = "exact" if model.exact_log_marginal(x[:1]) is not None else "iwae"
    if method not in LOG_MARGINAL_METHODS:
        choices = ", ".join(["auto", *LOG_MARGINAL_METHODS])
        raise ValueError(f"unknown log-marginal method {method!r}; choices: {choices}")
    return LOG_MARGINAL_METHODS[method](model, x, k, chunk, replicates)
