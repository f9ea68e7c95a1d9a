"""Variational bounds (ELBO, IWAE-K) and the training objectives built from them.

The value of a bound and the surrogate used for its gradient are different
things: ``elbo`` and ``iwae`` return values (computed without autograd), and
``training_objective`` returns the differentiable surrogate a trainer maximizes.
Only values are ever reported.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vaes.base import DIFFUSION_TERMS, LatentVariableModel, Objective, check_k, choose

from .chunking import check_chunk, draw_chunks
from .diffusion import reduce_diffusion_draws
from .estimate import Estimate, RunningLogMeanExp, RunningMoments, replicate_mean
from .gradients import (
    IMPORTANCE_WEIGHTED,
    check_objective,
    draws_per_example,
    needs_posterior,
    objective_value,
    surrogate,
)
from .psis import RunningParetoKhat


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

    ``stderr`` is the standard error of the mean of ``samples`` iid draws (from their sample
    variance, ``stderr_dof`` = samples - 1; None for one draw): honest wherever log w has a
    finite variance, however heavy the tails of w itself. Independent replicates would add
    nothing: R replicates of S draws are R*S iid draws, so ask for more samples instead.
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
        return Estimate(value, bound.stderr(), terms, stderr_dof=samples - 1 if samples > 1 else None)


def iwae(model: LatentVariableModel, x: Tensor, *, k: int, replicates: int = 1, chunk: int | None = None) -> Estimate:
    """IWAE-K bound: log (1/K) sum_k w_k, with K as a tensor dimension processed in chunks.

    The chunks are reduced with a streaming (running max) logsumexp, so peak
    memory depends on the chunk, not on K.

    ``replicates`` = R draws R*K weights per example in one stream and cuts them into R
    independent IWAE-K estimates (no loop over replicates): the value is their mean, still
    unbiased for E[IWAE_K], and with R >= 2 ``stderr`` is the standard error of that mean
    from the spread of the replicates (``replicate_mean``: honest whatever the tails, with
    ``stderr_dof`` = R - 1 per example). With R = 1 ``stderr`` is the delta-method one,
    which is at most 1 nat and understates heavy tails (None for K = 1).

    Terms, each [B]: ``ess``, the effective sample size of one estimate's K normalized
    weights (mean over replicates; 0 where every weight is 0); ``delta_stderr``, the
    delta-method standard error of the value (for comparison; absent for K = 1); ``khat``,
    the Pareto k-hat of all R*K weights (estimators.psis: NaN below MIN_DRAWS draws, above
    0.7 the value and its errors are unreliable).
    """
    check_k(k)
    check_chunk(chunk)
    if isinstance(replicates, bool) or not isinstance(replicates, int) or replicates < 1:
        raise ValueError(f"replicates must be an integer >= 1, got {replicates!r}")
    return iwae_of_checked_k(model, x, k, chunk, replicates)


def iwae_of_checked_k(model: LatentVariableModel, x: Tensor, k: int, chunk: int | None,
                      replicates: int = 1) -> Estimate:
    """``iwae`` for a K, chunk and number of replicates that the caller has checked."""
    with torch.inference_mode():
        per_replicate = RunningLogMeanExp(groups=replicates, group_size=k)
        tail = RunningParetoKhat(replicates * k)
        for log_weights in draw_chunks(model, x, replicates * k, chunk):
            total = log_weights.total()
            per_replicate.update(total)
            tail.update(total)
        values = per_replicate.log_mean()  # [R, B]
        assert values.shape == (replicates, x.shape[0]), values.shape
        delta = per_replicate.delta_stderr()
        delta = None if delta is None else delta.pow(2).sum(0).sqrt() / replicates  # of the mean of R
        if replicates > 1:
            value, stderr = replicate_mean(values)
        else:
            value, stderr = values[0], delta
        terms = {"ess": per_replicate.effective_sample_size().mean(0), "khat": tail.khat()}
        if delta is not None:
            terms["delta_stderr"] = delta
        return Estimate(value, stderr, terms, stderr_dof=replicates - 1 if replicates > 1 else None)


# --- training objectives: differentiable surrogates, [B], to be maximized -------------------------

def _beta_elbo_objective(model: LatentVariableModel, x: Tensor, objective: Objective) -> Tensor:
    """E_q[log p(x | z)] - beta * KL with reparameterized draws (closed-form KL where the model has it)."""
    log_weights = model.log_weights(x, objective.k)
    kl = _closed_form_kl(model, x, log_weights.layers)
    total_kl = sum(kl.values()) if kl is not None else sum(
        log_weights.layer_kl(name).mean(0) for name in log_weights.layers)
    return log_weights.log_likelihood.mean(0) - objective.beta * total_kl


def _importance_weighted_objective(model: LatentVariableModel, x: Tensor, objective: Objective) -> Tensor:
    """IWAE, MIWAE, PIWAE or CIWAE (estimators.gradients): with the plain reparameterized gradient, the
    objective of ``log_weights``' draws (all at once: training K is small); otherwise the estimator's
    surrogate from q's draws and log p(x, z)."""
    if needs_posterior(objective):
        return surrogate(model, x, objective)
    return objective_value(model.log_weights(x, draws_per_example(objective)).total(), objective)


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
    "diffusion": _diffusion_objective,
    **dict.fromkeys(IMPORTANCE_WEIGHTED, _importance_weighted_objective),
}


def training_objective(model: LatentVariableModel, x: Tensor, objective: Objective | None = None) -> Tensor:
    """The per-example surrogate [B] that training maximizes for ``objective`` (the model's own by default)."""
    objective = model.objective if objective is None else objective
    surrogate_of = choose("objective", objective.name, OBJECTIVES)
    check_objective(objective, model)
    if objective.name == "elbo" and objective.beta != 1.0:
        raise ValueError("the 'elbo' objective has beta = 1; use 'beta-elbo' to weight the KL")
    surrogate = surrogate_of(model, x, objective)
    assert surrogate.shape == (x.shape[0],), surrogate.shape
    return surrogate
