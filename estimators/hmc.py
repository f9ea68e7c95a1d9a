"""Hamiltonian Monte Carlo on flat latent states, one step size per chain and example.

States are [C, B, n] (chains, examples, latent units); every chain of every example is an
independent Markov chain, so one tensor operation advances them all. The target is a weighted
sum of log densities, log f(z) = sum_p coef_p log f_p(z): AIS's geometric path is
(1 - beta) log p0 + beta log p(x, z), and keeping the parts apart lets the next beta reuse the
values and gradients at the current state instead of evaluating them again.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class HMCState(NamedTuple):
    z: Tensor  # [C, B, n]
    parts: Tensor  # [P, C, B]  log f_p(z)
    grads: Tensor  # [P, C, B, n]  d log f_p / dz

    def log_density(self, coef: Tensor) -> Tensor:
        """sum_p coef_p log f_p(z), [C, B]."""
        return torch.tensordot(coef, self.parts, dims=1)

    def gradient(self, coef: Tensor) -> Tensor:
        """sum_p coef_p d log f_p / dz, [C, B, n]."""
        return torch.tensordot(coef, self.grads, dims=1)


PartsFn = Callable[[Tensor], HMCState]
"""z [C, B, n] -> the state at z: the parts' values and gradients (no graph kept)."""


def leapfrog(state: HMCState, momentum: Tensor, step_size: Tensor, steps: int, coef: Tensor,
             evaluate: PartsFn) -> tuple[HMCState, Tensor]:
    """``steps`` leapfrog steps of size ``step_size`` [C, B] for H = -log f(z) + |p|^2 / 2.

    Half a momentum step, then alternating full position and momentum steps, ending on half a
    momentum step: volume-preserving and reversible (negating the final momentum and running
    again returns to the start). Costs ``steps`` evaluations.
    """
    eps = step_size[..., None]
    momentum = momentum + 0.5 * eps * state.gradient(coef)
    for i in range(steps):
        state = evaluate(state.z + eps * momentum)
        kick = eps if i < steps - 1 else 0.5 * eps
        momentum = momentum + kick * state.gradient(coef)
    return state, momentum


def hmc_transition(state: HMCState, coef: Tensor, step_size: Tensor, leapfrog_steps: int, evaluate: PartsFn,
                   generator: torch.Generator | None = None) -> tuple[HMCState, Tensor]:
    """One HMC transition leaving f invariant: fresh momentum, a leapfrog trajectory, a Metropolis test.

    Returns the new state and the acceptance probability min(1, exp(-dH)) [C, B]. A trajectory
    that diverges (non-finite energy) is rejected, never propagated.
    """
    z = state.z
    momentum = torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=generator)
    proposal, final_momentum = leapfrog(state, momentum, step_size, leapfrog_steps, coef, evaluate)
    start_energy = -state.log_density(coef) + 0.5 * momentum.pow(2).sum(-1)
    end_energy = -proposal.log_density(coef) + 0.5 * final_momentum.pow(2).sum(-1)
    log_accept = torch.nan_to_num(start_energy - end_energy, nan=-torch.inf).clamp(max=0)
    accept_prob = torch.exp(log_accept)  # [C, B]
    uniform = torch.rand(accept_prob.shape, dtype=accept_prob.dtype, device=z.device, generator=generator)
    accept = uniform < accept_prob
    return HMCState(torch.where(accept[..., None], proposal.z, z),
                    torch.where(accept, proposal.parts, state.parts),
                    torch.where(accept[..., None], proposal.grads, state.grads)), accept_prob
