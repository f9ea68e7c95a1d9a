"""log p(x): exact where the model has it, otherwise the IWAE-K estimate or annealed importance sampling."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vaes.base import LatentVariableModel, check_k, choose

from .ais import ais
from .bounds import iwae_of_checked_k
from .chunking import check_chunk
from .estimate import Estimate

# IWAE paper: log p(x) is reported as the IWAE bound with k = 5000.
DEFAULT_K = 5000
# Wu et al. 2017 (Table 1): 16 chains of 1,000 intermediate distributions come within 0.06 nats of
# 10,000 on an MNIST VAE.
DEFAULT_AIS_STEPS = 1000
DEFAULT_AIS_CHAINS = 16


def _exact(model: LatentVariableModel, x: Tensor, **_: object) -> Estimate:
    with torch.inference_mode():
        value = model.exact_log_marginal(x)
    if value is None:
        raise ValueError(f"{type(model).__name__} has no exact log p(x); use method 'iwae' or 'auto'")
    value = value.double()
    return Estimate(value, torch.zeros_like(value), method="exact")


def _iwae(model: LatentVariableModel, x: Tensor, *, k: int, chunk: int | None, replicates: int,
          **_: object) -> Estimate:
    estimate = iwae_of_checked_k(model, x, k, chunk, replicates)
    return Estimate(estimate.value, estimate.stderr, estimate.terms, method="iwae", stderr_dof=estimate.stderr_dof)


def _ais(model: LatentVariableModel, x: Tensor, *, steps: int, chains: int, ais_options: dict,
         **_: object) -> Estimate:
    return ais(model, x, steps=steps, chains=chains, **ais_options)  # its Estimate's method is "ais"


LOG_MARGINAL_METHODS: dict[str, Callable[..., Estimate]] = {
    "exact": _exact,
    "iwae": _iwae,
    "ais": _ais,
}


def _auto(model: LatentVariableModel, x: Tensor, **settings: object) -> Estimate:
    """Exact where the model has it, else IWAE."""
    with torch.inference_mode():
        has_exact = model.exact_log_marginal(x[:1]) is not None
    return (_exact if has_exact else _iwae)(model, x, **settings)


def log_marginal(model: LatentVariableModel, x: Tensor, *, method: str = "auto", k: int = DEFAULT_K,
                 replicates: int = 1, chunk: int | None = None, steps: int = DEFAULT_AIS_STEPS,
                 chains: int = DEFAULT_AIS_CHAINS, **ais_options: object) -> Estimate:
    """log p(x) per example. ``method``: "exact"; "iwae" (a lower bound, tight as K grows; ``k`` draws in
    chunks of ``chunk``, ``replicates`` independent estimates as in ``estimators.iwae``); "ais" (a
    stochastic lower bound, tight as ``steps`` grows; ``chains`` per example; ``ais_options`` are the
    other settings of ``estimators.ais``); or "auto" (exact when the model has it, else IWAE with ``k``
    draws). ``Estimate.method`` says which was used."""
    estimate_with = choose("log-marginal method", method, {"auto": _auto, **LOG_MARGINAL_METHODS})
    if ais_options and method != "ais":
        raise ValueError(f"AIS settings {', '.join(sorted(ais_options))} given to log-marginal method {method!r}")
    check_k(k)
    check_k(replicates, "replicates")
    check_chunk(chunk)
    return estimate_with(model, x, k=k, chunk=chunk, replicates=replicates, steps=steps, chains=chains,
                         ais_options=ais_options)
