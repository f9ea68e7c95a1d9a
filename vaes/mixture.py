"""Diagonal Gaussian mixtures: synthetic data with exact log p(x), shared by the data sets and the VDM oracle."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import LOG_2PI, choose


@dataclass(frozen=True)
class GaussianMixture:
    """p(x) = sum_c weights_c N(x; means_c, diag(stds_c^2)); float64 tensors."""

    weights: Tensor  # [C], sums to 1
    means: Tensor  # [C, D]
    stds: Tensor  # [C, D]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) for x [..., D], [...], computed in float64."""
        x = x.double()[..., None, :]  # [..., 1, D] against the components
        per_component = -0.5 * (((x - self.means) / self.stds).pow(2) + 2 * torch.log(self.stds)
                                + LOG_2PI).sum(-1)  # [..., C]
        return torch.logsumexp(per_component + torch.log(self.weights), dim=-1)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n draws, [n, D] float64."""
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=torch.float64, device=self.means.device, generator=generator)
        return self.means[component] + self.stds[component] * noise


def _ring_2d() -> GaussianMixture:
    """Eight well-separated components on a circle of radius 2, std 0.2: a multimodal 2-D toy."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = 2.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    weights = torch.full((8,), 1 / 8, dtype=torch.float64)
    return GaussianMixture(weights, means, torch.full((8, 2), 0.2, dtype=torch.float64))


def _random_16d() -> GaussianMixture:
    """Five components in 16-D with unequal weights and per-dimension stds; fixed by its own seed."""
    gen = torch.Generator().manual_seed(16)
    weights = torch.softmax(torch.randn(5, dtype=torch.float64, generator=gen), 0)
    means = 1.5 * torch.randn(5, 16, dtype=torch.float64, generator=gen)
    stds = 0.3 + 0.4 * torch.rand(5, 16, dtype=torch.float64, generator=gen)
    return GaussianMixture(weights, means, stds)


def _single_4d() -> GaussianMixture:
    """One Gaussian component in 4-D: the case where every quantity of a diffusion is closed form."""
    means = torch.tensor([[0.5, -1.0, 0.0, 2.0]], dtype=torch.float64)
    stds = torch.tensor([[0.7, 1.2, 0.4, 1.0]], dtype=torch.float64)
    return GaussianMixture(torch.ones(1, dtype=torch.float64), means, stds)


# Named mixtures; configs refer to them by name so a mixture is part of a hashable config.
MIXTURE_PRESETS: dict[str, Callable[[], GaussianMixture]] = {
    "ring-2d": _ring_2d,
    "random-16d": _random_16d,
    "single-4d": _single_4d,
}


def get_mixture(name: str) -> GaussianMixture:
    return choose("mixture", name, MIXTURE_PRESETS)()
