"""The importance-weighted training objectives and their gradient estimators.

Objectives over S = M K draws per example, log w [S, B] (Rainforth et al. 2018):

    iwae   IWAE-K:                log (1/K) sum_k w_k                               (M = 1)
    miwae  MIWAE(M, K):           (1/M) sum_m log (1/K) sum_k w_mk                   (M groups of K)
    piwae  PIWAE(M, K):           IWAE-MK for the generative network, MIWAE(M, K) for the inference network
    ciwae  CIWAE(beta):           beta (1/K) sum_k log w_k + (1 - beta) log (1/K) sum_k w_k

Gradient estimators (vaes.base.GRADIENT_ESTIMATORS) for the inference network phi; the generative
network theta always gets the objective's own reparameterized gradient:

    reparam  the objective differentiated through z = z(eps, phi), q's score term included;
    stl      sticking the landing (Roeder et al. 2017): log q with its parameters detached;
    dreg     doubly reparameterized (Tucker et al. 2019): each IWAE-K term's normalized weights
             w~_k are squared, sum_k w~_k^2 d log w_k / dz_k dz_k / dphi, log q's parameters detached.

Every objective's gradient is a weighted sum over draws, so one surrogate serves all of them:

    d/dtheta = sum_s g_s d log p(x, z_s) / dtheta               (g = d objective / d log w: the generative weights)
    d/dphi   = sum_s c_s d [log p(x, z_s) - log q(z_s)] / dphi    (c: the inference weights; q detached for stl, dreg)

with z the reparameterized draws. ``surrogate`` evaluates log p(x, z) once: the term sum_s g_s log p
carries theta's gradient, and a hook on the z that log p reads rescales the gradient passing into
z by c_s / g_s, so the path to phi receives c_s instead. A parameter used by both networks (an
exact encoder made of the generative parameters) gets each part through its own path, which is the
estimator's gradient for it too.

The surrogate's value is the objective's value at the draws (the gradient-carrying part adds
zero), so training curves read as the objective; it is a training signal and never reported as
a bound (estimators.bounds gives those).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vaes.base import LOG_JOINT, POSTERIOR, LatentVariableModel, Objective, choose

# Objectives that take every estimator and M; the others (elbo, beta-elbo, diffusion) take neither.
IMPORTANCE_WEIGHTED = ("iwae", "miwae", "piwae", "ciwae")
GROUPED = ("miwae", "piwae")  # the objectives that read M


@dataclass(frozen=True)
class DrawWeights:
    """What an objective makes of one batch's log weights: its value and the per-draw weights of its gradient."""

    value: Tensor  # [B] the objective at these draws
    log_generative: Tensor  # [S, B] log g_s: d objective / d log w_s for the generative network
    log_inference: Tensor  # [S, B] log c_s: the inference network's weight of draw s (depends on the estimator)


def _group_weights(log_w: Tensor, m: int, dreg: bool) -> tuple[Tensor, Tensor, Tensor]:
    """MIWAE(M, K) over log w [M K, B]: value [B], log d value / d log w [S, B], and the inference weights'
    log (squared normalized weights for DReG)."""
    k = log_w.shape[0] // m
    groups = log_w.view(m, k, -1)
    log_normalized = torch.log_softmax(groups, 1)  # log w~ within each group
    value = (torch.logsumexp(groups, 1) - math.log(k)).mean(0)
    log_gradient = (log_normalized - math.log(m)).flatten(0, 1)
    log_inference = (2 * log_normalized - math.log(m)).flatten(0, 1) if dreg else log_gradient
    return value, log_gradient, log_inference


def _iwae_weights(log_w: Tensor, objective: Objective, dreg: bool) -> DrawWeights:
    return DrawWeights(*_group_weights(log_w, 1, dreg))


def _miwae_weights(log_w: Tensor, objective: Objective, dreg: bool) -> DrawWeights:
    return DrawWeights(*_group_weights(log_w, objective.m, dreg))


def _piwae_weights(log_w: Tensor, objective: Objective, dreg: bool) -> DrawWeights:
    """The generative network's weights and value are IWAE-MK's; the inference network's MIWAE(M, K)'s."""
    value, log_generative, _ = _group_weights(log_w, 1, False)
    _, _, log_inference = _group_weights(log_w, objective.m, dreg)
    return DrawWeights(value, log_generative, log_inference)


def _ciwae_weights(log_w: Tensor, objective: Objective, dreg: bool) -> DrawWeights:
    """beta ELBO + (1 - beta) IWAE-K on the same K draws: weights beta / K + (1 - beta) w~_k. DReG squares
    only the IWAE part's w~ (the ELBO's part is K one-draw terms, whose DReG weight is w~ = 1)."""
    k, beta = log_w.shape[0], float(objective.beta)
    iwae_value, log_normalized, log_squared = _group_weights(log_w, 1, dreg)
    log_beta = math.log(beta) - math.log(k) if beta > 0 else -math.inf
    log_rest = math.log(1 - beta) if beta < 1 else -math.inf
    value = beta * log_w.mean(0) + (1 - beta) * iwae_value
    return DrawWeights(value, torch.logaddexp(torch.full_like(log_w, log_beta), log_rest + log_normalized),
                       torch.logaddexp(torch.full_like(log_w, log_beta), log_rest + log_squared))


WEIGHTS: dict[str, Callable[[Tensor, Objective, bool], DrawWeights]] = {
    "iwae": _iwae_weights, "miwae": _miwae_weights, "piwae": _piwae_weights, "ciwae": _ciwae_weights}
assert tuple(WEIGHTS) == IMPORTANCE_WEIGHTED


def draws_per_example(objective: Objective) -> int:
    """S: the draws one example takes (M K for the grouped objectives, K otherwise)."""
    return objective.m * objective.k if objective.name in GROUPED else objective.k


def needs_posterior(objective: Objective) -> bool:
    """Whether the objective's estimator needs q's draws and density apart from log p (POSTERIOR and LOG_JOINT):
    STL and DReG detach q's parameters, and PIWAE gives the two networks different weights."""
    return objective.estimator != "reparam" or objective.name == "piwae"


def check_objective(objective: Objective, model: LatentVariableModel | None = None) -> None:
    """Raise ValueError (one line) for a setting the objective would ignore, and MissingCapability where
    ``model`` cannot give what the objective's estimator needs."""
    weighted = objective.name in IMPORTANCE_WEIGHTED
    if objective.estimator != "reparam" and not weighted:
        raise ValueError(f"objective {objective.name!r} has no gradient estimator choice; estimator "
                         f"{objective.estimator!r} applies to {', '.join(IMPORTANCE_WEIGHTED)}")
    if objective.m != 1 and objective.name not in GROUPED:
        raise ValueError(f"objective {objective.name!r} takes no m (got m = {objective.m}); "
                         f"m applies to {', '.join(GROUPED)}")
    if model is not None and weighted and needs_posterior(objective):
        wanted = f"objective {objective.name!r} with estimator {objective.estimator!r}"
        model.require(POSTERIOR, wanted)
        model.require(LOG_JOINT, wanted)


def objective_value(log_w: Tensor, objective: Objective) -> Tensor:
    """The objective at the draws log w [S, B], differentiable in log w: the reparameterized objective."""
    return choose("objective", objective.name, WEIGHTS)(log_w, objective, False).value


def _scale_gradient(z: Tensor, scales: dict[str, Tensor]) -> Tensor:
    """z itself, whose gradient is multiplied by ``scales["ratio"]`` [S, B] on its way back (the scale is
    set after the forward pass, before backward reads it)."""
    passed = z.view_as(z)
    passed.register_hook(lambda grad: grad * scales["ratio"][..., None])
    return passed


def surrogate(model: LatentVariableModel, x: Tensor, objective: Objective) -> Tensor:
    """The per-example surrogate [B] whose gradient is ``objective.estimator``'s estimate of the objective's
    gradient, from q's draws and log p(x, z) (POSTERIOR and LOG_JOINT; see the module docstring)."""
    check_objective(objective, model)
    weights_of = choose("objective", objective.name, WEIGHTS)
    posterior = model.posterior(x)
    z = posterior.rsample(draws_per_example(objective))  # each layer [S, B, n_l]
    scales: dict[str, Tensor] = {}  # filled below, read by the hooks when backward runs
    z_read_by_p = {name: _scale_gradient(layer, scales) for name, layer in z.items()}
    log_p = model.log_joint(x, z_read_by_p)  # [S, B]
    q = posterior if objective.estimator == "reparam" else posterior.detached()
    log_q = q.log_prob(z)  # [S, B]
    with torch.no_grad():
        weights = weights_of(log_p - log_q, objective, objective.estimator == "dreg")
        # c / g from their logs: finite wherever g is representable (a draw whose g underflows passes no
        # gradient into z through log p, which only PIWAE's inference weights could notice).
        scales["ratio"] = torch.exp(weights.log_inference - weights.log_generative).nan_to_num(0.0)
        generative, inference = weights.log_generative.exp(), weights.log_inference.exp()
    carrier = (generative * log_p).sum(0) - (inference * log_q).sum(0)
    result = weights.value + (carrier - carrier.detach())
    assert result.shape == (x.shape[0],), result.shape
    return result
