"""A latent-variable model whose marginal is a named Gaussian mixture, in closed form (no training).

    z ~ sum_c w_c N(m_c, diag(s_c^2 - sigma^2)),   x | z ~ N(z, sigma^2 I)
    p(x) = sum_c w_c N(x; m_c, diag(s_c^2))       (the preset mixture itself)

Observation noise takes ``noise`` of the narrowest component variance, so every component of
the prior keeps a positive variance. The posterior p(z | x) is a mixture too: multimodal where
components overlap, and the prior is multimodal everywhere, which is what makes it a test of
AIS and BDMC with a known answer. q(z | x) = N(x, sigma^2 I), the likelihood read as a density
of z: wider than every component's posterior, so importance weights from it stay bounded.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import (
    LOG_JOINT,
    POSTERIOR,
    SAMPLE_JOINT,
    Latents,
    LatentVariableModel,
    LogWeights,
    ModelStructure,
    diagonal_normal_log_prob,
)
from .draws import chunk_noise
from .latents import DiagonalGaussianPosterior
from .mixture import GaussianMixture, get_mixture
from .registry import register_model


@dataclass(frozen=True)
class MixtureLatentConfig:
    data_dim: int = 2  # the default mixture's dimension
    likelihood: str = "gaussian"  # mixtures are real-valued
    mixture: str = "ring-2d"  # vaes.mixture preset: the marginal p(x)
    noise: float = 0.5  # share of the narrowest component variance that is observation noise sigma^2

    def __post_init__(self) -> None:
        if self.likelihood != "gaussian":
            raise ValueError(f"mixture-latent models real-valued data only (likelihood 'gaussian'), "
                             f"got {self.likelihood!r}")
        if not 0 < self.noise < 1:
            raise ValueError(f"noise must lie strictly between 0 and 1, got {self.noise!r}")
        dim = get_mixture(self.mixture).dim
        if self.data_dim != dim:
            raise ValueError(f"mixture {self.mixture!r} is {dim}-dimensional, but data_dim is {self.data_dim}")


class MixtureLatent(LatentVariableModel):
    layers = ("z",)
    capabilities = frozenset({LOG_JOINT, SAMPLE_JOINT, POSTERIOR})

    def __init__(self, config: MixtureLatentConfig):
        super().__init__()
        self.config = config
        self.mixture = get_mixture(config.mixture)  # p(x); float64
        sigma2 = config.noise * float(self.mixture.stds.min()) ** 2
        self.register_buffer("log_sigma", torch.tensor(0.5 * math.log(sigma2), dtype=torch.float64))
        self.register_buffer("weights", self.mixture.weights.clone())
        self.register_buffer("means", self.mixture.means.clone())
        self.register_buffer("prior_stds", torch.sqrt(self.mixture.stds.pow(2) - sigma2))

    @property
    def prior(self) -> GaussianMixture:
        return GaussianMixture(self.weights, self.means, self.prior_stds)

    def structure(self) -> ModelStructure:
        return ModelStructure("mixture-latent", latent_layers=1, data_dim=self.config.data_dim, likelihood="gaussian")

    def exact_log_marginal(self, x: Tensor) -> Tensor:
        self.check_batch(x, self.config.data_dim)
        return self.mixture.log_prob(x)

    def log_weight_chunks(self, x: Tensor, sizes: Sequence[int]) -> Iterator[LogWeights]:
        q = self.posterior(x)  # draws z = x + sigma eps, as q.rsample makes them
        for noise in chunk_noise(sizes, x.device):
            z = {"z": q.mean + noise.normal(q.mean.shape, q.mean.dtype) * torch.exp(q.log_std)}
            yield LogWeights(self._log_likelihood(x, z), {"z": self.log_prior(z)}, {"z": q.log_prob(z)})

    def _log_likelihood(self, x: Tensor, z: Latents) -> Tensor:
        return diagonal_normal_log_prob(x.double(), z["z"], self.log_sigma.expand(x.shape[-1]))

    # --- capabilities: log p(x, z), ancestral draws, q(z | x) -------------------------------------

    def log_prior(self, z: Latents) -> Tensor:
        return self.prior.log_prob(z["z"])

    def log_joint(self, x: Tensor, z: Latents) -> Tensor:
        self.check_batch(x, self.config.data_dim)
        return self.log_prior(z) + self._log_likelihood(x, z)

    def sample_prior(self, n: int, batch: int, *, generator: torch.Generator | None = None) -> Latents:
        return {"z": self.prior.sample(n * batch, generator).view(n, batch, self.config.data_dim)}

    @torch.no_grad()
    def sample_joint(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Latents]:
        """z from the prior, x = z + sigma eps: x [n, D], z [n, D] (float64)."""
        z = self.prior.sample(n, generator)
        noise = torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=generator)
        return z + torch.exp(self.log_sigma) * noise, {"z": z}

    def posterior(self, x: Tensor) -> DiagonalGaussianPosterior:
        self.check_batch(x, self.config.data_dim)
        x = x.double()
        return DiagonalGaussianPosterior("z", x, self.log_sigma.expand(x.shape))


@register_model("mixture-latent")
def mixture_latent(**config) -> MixtureLatent:
    """Gaussian-mixture prior and Gaussian noise: p(x) is a named mixture in closed form (AIS's multimodal test)."""
    return MixtureLatent(MixtureLatentConfig(**config))
