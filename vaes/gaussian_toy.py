"""The Gaussian toy of Rainforth et al. (2018, "Tighter variational bounds are not necessarily better").

    p(z) = N(mu, I_D),  p(x | z) = N(z, I_D),  so  p(x) = N(mu, 2 I),  p(z | x) = N((x + mu)/2, I/2);
    q(z | x) = N(A x + b, (2/3) I)  (the variance is fixed, so q is never the true posterior).

The generative network is mu; the inference network is (A, b). Every gradient of the ELBO is in
closed form (``elbo_gradients``), which is what makes this the oracle for gradient estimators.
Like the paper, a model starts at the optimum (mu the data's mean, A = I/2, b = mu/2) with every
parameter perturbed by N(0, perturbation^2) noise: near the optimum is where the signal-to-noise
ratios of the gradients are measured.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import (
    LOG_JOINT,
    POSTERIOR,
    SAMPLE_JOINT,
    Latents,
    LatentVariableModel,
    LogWeights,
    ModelStructure,
    Objective,
    as_objective,
    diagonal_normal_kl,
    diagonal_normal_log_prob,
)
from .draws import chunk_noise
from .latents import DiagonalGaussianPosterior
from .registry import register_model

Q_VARIANCE = 2 / 3  # Rainforth et al.'s fixed variance of q
TRUE_MEAN_SEED = 2018  # fixes the data's mu: every data seed poses the same problem


def true_prior_mean(dim: int) -> Tensor:
    """The mu the ``gaussian-toy`` data set is drawn with: N(0, I_D) draws from a fixed seed (float64)."""
    return torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(TRUE_MEAN_SEED))


@dataclass(frozen=True)
class GaussianToyConfig:
    data_dim: int = 20  # Rainforth et al.'s D
    perturbation: float = 0.01  # sd of the noise added to the optimal parameters at initialisation
    likelihood: str = "gaussian"  # accepted for a uniform factory signature; the toy's x is real-valued
    objective: Objective = field(default_factory=Objective)  # what training maximizes

    def __post_init__(self) -> None:
        object.__setattr__(self, "objective", as_objective(self.objective))
        if isinstance(self.data_dim, bool) or not isinstance(self.data_dim, int) or self.data_dim < 1:
            raise ValueError(f"gaussian-toy data_dim must be an integer >= 1, got {self.data_dim!r}")
        if self.perturbation < 0:
            raise ValueError(f"gaussian-toy perturbation must be >= 0, got {self.perturbation!r}")
        if self.likelihood != "gaussian":
            raise ValueError(f"gaussian-toy models real-valued data only (likelihood 'gaussian'), got "
                             f"{self.likelihood!r}")


class GaussianToy(LatentVariableModel):
    layers = ("z",)
    capabilities = frozenset({LOG_JOINT, SAMPLE_JOINT, POSTERIOR})

    def __init__(self, config: GaussianToyConfig):
        super().__init__()
        self.config = config
        d, sd = config.data_dim, config.perturbation
        mu = true_prior_mean(d).float()
        self.prior_mean = nn.Parameter(mu + sd * torch.randn(d))  # mu: the generative network
        self.proj = nn.Parameter(torch.eye(d) / 2 + sd * torch.randn(d, d))  # A
        self.shift = nn.Parameter(mu / 2 + sd * torch.randn(d))  # b
        self.register_buffer("q_log_std", torch.full((d,), 0.5 * math.log(Q_VARIANCE)))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean A x + b and log sigma of q(z | x), [B, D] each."""
        self.check_batch(x, self.config.data_dim)
        mean = x @ self.proj.T + self.shift
        return mean, self.q_log_std.expand_as(mean)

    def log_weight_chunks(self, x: Tensor, sizes: Sequence[int]) -> Iterator[LogWeights]:
        mean, log_std = self.encode(x)
        for noise in chunk_noise(sizes, x.device):
            z = mean + noise.normal(mean.shape, mean.dtype) * log_std.exp()  # [K, B, D]
            log_q = diagonal_normal_log_prob(z, mean, log_std)
            yield LogWeights(self._log_likelihood(x, z), {"z": self.log_prior({"z": z})}, {"z": log_q})

    def _log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        return diagonal_normal_log_prob(x, z, torch.zeros_like(z))

    def analytic_kl(self, x: Tensor) -> dict[str, Tensor]:
        mean, log_std = self.encode(x)
        return {"z": diagonal_normal_kl(mean, log_std, self.prior_mean.expand_as(mean), torch.zeros_like(mean))}

    def exact_log_marginal(self, x: Tensor) -> Tensor:
        """log N(x; mu, 2 I)."""
        self.check_batch(x, self.config.data_dim)
        return diagonal_normal_log_prob(x, self.prior_mean, torch.full_like(x, 0.5 * math.log(2)))

    def structure(self) -> ModelStructure:
        return ModelStructure("gaussian-toy", latent_layers=1, data_dim=self.config.data_dim, likelihood="gaussian")

    def posterior_means(self, x: Tensor) -> dict[str, Tensor]:
        return {"z": self.encode(x)[0]}

    # --- capabilities: log p(x, z), ancestral draws, q(z | x) -------------------------------------

    def log_prior(self, z: Latents) -> Tensor:
        return diagonal_normal_log_prob(z["z"], self.prior_mean, torch.zeros_like(z["z"]))

    def log_joint(self, x: Tensor, z: Latents) -> Tensor:
        self.check_batch(x, self.config.data_dim)
        return self.log_prior(z) + self._log_likelihood(x, z["z"])

    def sample_prior(self, n: int, batch: int, *, generator: torch.Generator | None = None) -> Latents:
        mu = self.prior_mean
        return {"z": mu + torch.randn(n, batch, mu.shape[0], dtype=mu.dtype, device=mu.device, generator=generator)}

    @torch.no_grad()
    def sample_joint(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Latents]:
        z = self.sample_prior(n, 1, generator=generator)["z"][:, 0]  # [n, D]
        return z + torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=generator), {"z": z}

    def posterior(self, x: Tensor) -> DiagonalGaussianPosterior:
        return DiagonalGaussianPosterior("z", *self.encode(x))

    def inference_parameters(self) -> dict[str, nn.Parameter]:
        """A and b."""
        return {"proj": self.proj, "shift": self.shift}

    def elbo_gradients(self, x: Tensor) -> dict[str, Tensor]:
        """The exact gradient of the batch-mean ELBO with respect to every parameter, by name.

        ELBO(x) = const - |x - m|^2 / 2 - |m - mu|^2 / 2 with m = A x + b (q's variance is fixed, so
        its entropy and the variance terms are constants): d/dmu = m - mu, d/dm = x + mu - 2 m.
        """
        with torch.no_grad():
            mean = self.encode(x)[0]
            d_mean = x + self.prior_mean - 2 * mean  # [B, D]
            n = x.shape[0]
            return {"prior_mean": (mean - self.prior_mean).mean(0), "proj": d_mean.T @ x / n,
                    "shift": d_mean.mean(0)}


@register_model("gaussian-toy")
def gaussian_toy(**config) -> GaussianToy:
    """Rainforth et al.'s Gaussian toy (D = 20): p(z) = N(mu, I), p(x | z) = N(z, I), q = N(A x + b, 2/3 I)."""
    return GaussianToy(GaussianToyConfig(**config))
