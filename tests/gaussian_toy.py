"""Rainforth et al.'s Gaussian toy with a q of chosen width: closed-form log p(x) and E[ELBO].

    z ~ N(m, I_D),  x | z ~ N(z, I_D),  so  p(x) = N(m, 2 I),  p(z | x) = N((x + m)/2, I/2);
    q(z | x) = N((x + m)/2 + offset, v I).

log w - log p(x) is a function of the standard normal draw alone, so every example's
IWAE_K - log p(x) has the same distribution: examples and seeds are interchangeable rows.
With offset 0, log w - log p(x) = (D/2) log(2v) + (1/2 - v) chi^2_D: for v > 1/2 the
weights are bounded (light tails); for v < 1/2 their tail index is 1/(1 - 2v) (Pareto
shape 1 - 2v: 0.4 at v = 0.30, 0.52 at v = 0.24, whose weights have infinite variance).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from vaes.base import LatentVariableModel, LogWeights, standard_normal_log_prob


class GaussianToy(LatentVariableModel):
    layers = ("z",)

    def __init__(self, prior_mean: Tensor, q_var: float, q_offset: float = 0.0):
        super().__init__()
        self.prior_mean, self.q_var, self.q_offset = prior_mean, q_var, q_offset

    def log_weights(self, x: Tensor, k: int) -> LogWeights:
        eps = torch.randn((k, *x.shape), dtype=x.dtype)  # [K, B, D]
        z = (x + self.prior_mean) / 2 + self.q_offset + math.sqrt(self.q_var) * eps
        log_q = standard_normal_log_prob(eps) - 0.5 * x.shape[-1] * math.log(self.q_var)
        return LogWeights(standard_normal_log_prob(x - z), {"z": standard_normal_log_prob(z - self.prior_mean)},
                          {"z": log_q})

    def exact_log_marginal(self, x: Tensor) -> Tensor:
        """log N(x; m, 2 I)."""
        return standard_normal_log_prob((x - self.prior_mean) / math.sqrt(2)) - 0.5 * x.shape[-1] * math.log(2)

    def kl_to_posterior(self, dim: int) -> float:
        """KL(q(z | x) || p(z | x)) = (D/2) (2v + 2 offset^2 - 1 - log 2v): log p(x) - E[ELBO], the same for every x."""
        v, d = self.q_var, self.q_offset
        return 0.5 * dim * (2 * v + 2 * d * d - 1 - math.log(2 * v))
