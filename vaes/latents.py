"""Latent draws shared by the families: diagonal Gaussian draws from a chosen generator, and q(z | x) as a
``Posterior`` object (the protocol's POSTERIOR capability)."""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Latents, Posterior, diagonal_normal_log_prob
from .draws import draw_noise


def gaussian_draw(mean: Tensor, log_std: Tensor, k: int | None,
                  generator: torch.Generator | None = None) -> Tensor:
    """z = mean + sigma * eps: [k, *mean.shape] with ``k`` set, else mean's shape (it already carries the draws).

    The noise is the same stream as ``layers.reparameterize`` under the same global seed, so draws
    through either agree.
    """
    shape = mean.shape if k is None else (k, *mean.shape)
    eps = torch.randn(shape, dtype=mean.dtype, device=mean.device, generator=generator)
    return mean + eps * torch.exp(log_std)


class DiagonalGaussianPosterior(Posterior):
    """q(z | x) = N(mean, diag(sigma^2)) for one stochastic layer ``name``; mean and log sigma [B, n]."""

    def __init__(self, name: str, mean: Tensor, log_std: Tensor):
        self.name, self.mean, self.log_std = name, mean, log_std

    def rsample(self, k: int, *, generator: torch.Generator | None = None) -> Latents:
        eps = draw_noise(k, self.mean.device, generator).normal(self.mean.shape, self.mean.dtype)
        return {self.name: self.mean + eps * torch.exp(self.log_std)}

    def log_prob(self, z: Latents) -> Tensor:
        return diagonal_normal_log_prob(z[self.name], self.mean, self.log_std)

    def detached(self) -> DiagonalGaussianPosterior:
        return DiagonalGaussianPosterior(self.name, self.mean.detach(), self.log_std.detach())
