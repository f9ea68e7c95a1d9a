"""A diffusion model's ELBO from its per-draw loss terms (the VDM paper's estimator), and its standard error.

ELBO = E[reconstruction] - prior - E[diffusion]; the model gives S draws of the two
Monte Carlo parts per example (``vaes.base.DiffusionDraws``) and the closed-form prior.
The diffusion part is L_T in discrete time and L_inf in continuous time: for a
continuous-time model this is the only estimate of its bound (``log_weights`` always
samples a discrete trajectory).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from vaes.base import DIFFUSION_TERMS, DiffusionDraws, LatentVariableModel, check_k

from .estimate import Estimate


def _mean_and_stderr(draws: Tensor) -> tuple[Tensor, Tensor | None]:
    """Mean over the draw dimension of [S, B] and its standard error (None for S = 1)."""
    mean = draws.mean(0)
    assert mean.shape == draws.shape[1:], mean.shape
    if draws.shape[0] < 2:
        return mean, None
    return mean, draws.std(0, unbiased=True) / math.sqrt(draws.shape[0])


def reduce_diffusion_draws(draws: DiffusionDraws) -> Estimate:
    """The ELBO per example from its per-draw parts, with its standard error.

    Terms: ``reconstruction``, ``prior``, ``diffusion`` [B] and, from two draws on,
    ``reconstruction_stderr`` and ``diffusion_stderr`` [B]. The two Monte Carlo parts use
    independent draws, so their errors add in quadrature. The diffusion draws' times are
    stratified, and the standard error treats them as independent, so it errs on the
    large side. Differentiable (the ``diffusion`` training objective uses it).
    """
    reconstruction, reconstruction_stderr = _mean_and_stderr(draws.reconstruction)
    diffusion, diffusion_stderr = _mean_and_stderr(draws.diffusion)
    value = reconstruction - draws.prior - diffusion
    terms = {"reconstruction": reconstruction, "prior": draws.prior, "diffusion": diffusion}
    if diffusion_stderr is None:
        return Estimate(value, None, terms)
    stderr = torch.sqrt(reconstruction_stderr.pow(2) + diffusion_stderr.pow(2))
    terms.update(reconstruction_stderr=reconstruction_stderr, diffusion_stderr=diffusion_stderr)
    return Estimate(value, stderr, terms)


def diffusion_elbo(model: LatentVariableModel, x: Tensor, *, samples: int,
                   generator: torch.Generator | None = None) -> Estimate:
    """A diffusion model's ELBO per example from ``samples`` stratified loss draws (see the module doc).

    The same ``generator`` seed gives the same draws for every T (common random numbers).
    Raises ``vaes.base.MissingCapability`` for a model without diffusion loss terms.
    """
    check_k(samples)
    model.require(DIFFUSION_TERMS, "diffusion_elbo")
    with torch.inference_mode():
        draws = model.diffusion_loss_terms(x, samples=samples, generator=generator)
        estimate = reduce_diffusion_draws(draws)
    assert estimate.value.shape == (x.shape[0],), estimate.value.shape
    return estimate
