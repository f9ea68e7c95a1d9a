"""Variational bounds (ELBO, IWAE-K) and the training objectives built from them.

The value of a bound and the surrogate used for its gradient are different
things: ``elbo`` and ``iwae`` return values (computed without autograd), and
``training_objective`` returns the differentiable surrogate a trainer maximizes.
Only values are ever reported.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from vaes.base import DIFFUSION_TERMS, LatentVariableModel, Objective, check_k, choose

from .chunking import check_chunk, draw_chunks
from .diffusion import reduce_diffusion_draws
from .estimate import Estimate, RunningLogMeanExp, RunningMoments


def _closed_form_kl(model: LatentVariableModel, x: Tensor, layers: tuple[str, ...]) -> dict[str, Tensor] | None:
    """The model's closed-form KL per layer, if it has one for every layer."""
    kls = model.analytic_kl(x)
    if kls is None or set(kls) != set(layers):
        return None
    return kls


def elbo(model: LatentVariableModel, x: Tensor, *, samples: int = 1, analytic_kl: bool = True,
         chunk: int | None = None) -> Estimate:
    """ELBO = E_q[log p(x | z)] - sum_l KL_l, averaged over ``samples`` draws per example.

    With ``analytic_kl`` and a model whose KL is closed form for every layer, the
    KL terms are exact and only the reconstruction term is Monte Carlo.
    Terms: ``reconstruction``, ``kl`` (total) and ``kl/<layer>``, each [B].
    """
    check_k(samples, "samples")
    check_chunk(chunk)
    with torch.inference_mode():
        closed_kl = _closed_form_kl(model, x, model.layers) if analytic_kl else None
        bound, recon = RunningMoments(), RunningMoments()
        layer_kl = {name: RunningMoments() for name in model.layers}
        for log_weights in draw_chunks(model, x, samples, chunk):
            recon.update(log_weights.log_likelihood)
            if closed_kl is None:
                for name in log_weights.layers:
                    layer_kl[name].update(log_weights.layer_kl(name))
                bound.update(log_weights.total())
            else:
                bound.update(log_weights.log_likelihood - sum(closed_kl.values()))
        kl = {name: closed_kl[name].double() for name in model.layers} if closed_kl else {
            name: moments.mean() for name, moments in layer_kl.items()}
        value = bound.mean()
        assert value.shape == (x.shape[0],), value.shape
        terms = {"reconstruction": recon.mean(), "kl": sum(kl.values()),
                 **{f"kl/{name}": layer for name, layer in kl.items()}}
        return Estimate(value, bound.stderr(), terms)


def iwae(model: LatentVariableModel, x: Tensor, *, k: int, chunk: int | None = None) -> Estimate:
    """IWAE-K bound: log (1/K) sum_k w_k, with K as a tensor dimension processed in chunks.

    The chunks are reduced with a streaming (running max) logsumexp, so peak
    memory depends on the chunk, not on K. Terms: ``ess``, the effective sample
    size of the normalized weights, [B]. The standard error is the delta-method
    one (None for K = 1).
    """
    check_k(k)
    check_chunk(chunk)
    return iwae_of_checked_k(model, x, k, chunk)


def iwae_of_checked_k(model: LatentVariableModel, x: Tensor, k: int, chunk: int | None) -> Estimate:
    """``iwae`` for a K and chunk that the caller has checked."""
    with torch.inference_mode():
        accumulator = RunningLogMeanExp()
        for log_weights in draw_chunks(model, x, k, chunk):
            accumulator.update(log_weights.total())
        value = accumulator.log_mean()
        assert value.shape == (x.shape[0],), value.shape
        return Estimate(value, accumulator.delta_stderr(), {"ess": accumulator.effective_sample_size()})


# --- training objectives: differentiable surrogates, [B], to be maximized -------------------------

def _beta_elbo_objective(model: LatentVariableModel, x: Tensor, objective: Objective) -> Tensor:
    """E_q[log p(x | z)] - beta * KL with reparameterized draws (closed-form KL where the model has it)."""
    log_weights = model.log_weights(x, objective.k)
    kl = _closed_form_kl(model, x, log_weights.layers)
    total_kl = sum(kl.values()) if kl is not None else sum(
        log_weights.layer_kl(name).mean(0) for name in log_weights.layers)
    return log_weights.log_likelihood.mean(0) - objective.beta * total_kl


def _iwae_objective(model: LatentVariableModel, x: Tensor, objective: Objective) -> Tensor:
    """log (1/K) sum_k w_k with reparameterized draws (all K at once: training K is small)."""
    log_w = model.log_weights(x, objective.k).total()
    return torch.logsumexp(log_w, 0) - math.log(objective.k)


def _diffusion_objective(model: LatentVariableModel, x: Tensor, objective: Objective) -> Tensor:
    """A diffusion model's ELBO from its per-step closed-form KLs at sampled times (the VDM paper's loss).

    Unbiased for the same ELBO as log_weights gives, with far lower variance than one
    whole trajectory, and one network call per draw instead of T.
    """
    model.require(DIFFUSION_TERMS, "objective 'diffusion'")
    return reduce_diffusion_draws(model.diffusion_loss_terms(x, samples=objective.k)).value


OBJECTIVES: dict[str, Callable[[LatentVariableModel, Tensor, Objective], Tensor]] = {
    "elbo": _beta_elbo_objective,  # beta is 1 in the plain ELBO objective
    "beta-elbo": _beta_elbo_objective,
    "iwae": _iwae_objective,
    "diffusion": _diffusion_objective,
}


def training_objective(model: LatentVariableModel, x: Tensor, objective: Objective | None = None) -> Tensor:
    """The per-example surrogate [B] that training maximizes for ``objective`` (the model's own by default)."""
    objective = model.objective if objective is None else objective
    surrogate_of = choose("objective", objective.name, OBJECTIVES)
    if objective.name == "elbo" and objective.beta != 1.0:
        raise ValueError("the 'elbo' objective has beta = 1; use 'beta-elbo' to weight the KL")
    surrogate = surrogate_of(model, x, objective)
    assert surrogate.shape == (x.shape[0],), surrogate.shape
    return surrogate
