"""The linear Gaussian model (probabilistic PCA): exact log p(x), exact posterior, closed-form ML fit.

    z ~ N(0, I_q),  x | z ~ N(W z + mu, sigma^2 I_d)
    log p(x) = log N(x; mu, W W^T + sigma^2 I)
    p(z | x) = N(M^-1 W^T (x - mu), sigma^2 M^-1),  M = W^T W + sigma^2 I

Both encoders describe q(z | x) as a mean [B, q] and a lower-triangular scale
[q, q] shared by all examples (the true posterior covariance does not depend
on x, so nothing is lost by that).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import (
    LOG_2PI,
    LOG_JOINT,
    POSTERIOR,
    SAMPLE_JOINT,
    Latents,
    LatentVariableModel,
    LogWeights,
    ModelStructure,
    Objective,
    Posterior,
    choose,
    noise_log_prob,
    standard_normal_log_prob,
)
from .draws import chunk_noise, draw_noise
from .registry import register_model


@dataclass(frozen=True)
class LinearGaussianConfig:
    data_dim: int = 20  # d: small enough for an exact d x d Cholesky per batch
    latent_dim: int = 5  # q < d, as in probabilistic PCA
    encoder: str = "amortized"  # "exact": q is the true posterior, so every bound is log p(x); "amortized": learnable
    likelihood: str = "gaussian"  # accepted for a uniform factory signature; only Gaussian observations exist here
    init_log_sigma: float = 0.0  # observation noise starts at sigma = 1, the scale of standardized data
    objective: Objective = field(default_factory=Objective)  # what training maximizes

    def __post_init__(self) -> None:
        if not 1 <= self.latent_dim <= self.data_dim:
            raise ValueError(f"need 1 <= latent_dim <= data_dim, got {self.latent_dim} and {self.data_dim}")
        if self.likelihood != "gaussian":
            raise ValueError(f"linear-gaussian models real-valued data only (likelihood 'gaussian'), "
                             f"got {self.likelihood!r}")
        choose("encoder", self.encoder, ENCODERS)


class ExactPosterior(nn.Module):
    """q(z | x) = p(z | x), computed from the generative parameters (no parameters of its own)."""

    def forward(self, model: LinearGaussian, x: Tensor) -> tuple[Tensor, Tensor]:
        mean_map, scale_tril = posterior_linear_map(model)
        return (x - model.mu) @ mean_map.T, scale_tril


class AmortizedLinearEncoder(nn.Module):
    """q(z | x) = N(A (x - mu) + b, diag(s^2)): the family that contains the true posterior at the ML fit."""

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(latent_dim, data_dim) / math.sqrt(data_dim))  # A
        self.shift = nn.Parameter(torch.zeros(latent_dim))  # b
        self.log_std = nn.Parameter(torch.zeros(latent_dim))  # log s

    def forward(self, model: LinearGaussian, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = (x - model.mu) @ self.proj.T + self.shift
        return mean, torch.diag(torch.exp(self.log_std))


ENCODERS: dict[str, type[nn.Module]] = {"exact": ExactPosterior, "amortized": AmortizedLinearEncoder}


class LinearGaussian(LatentVariableModel):
    layers = ("z",)
    capabilities = frozenset({LOG_JOINT, SAMPLE_JOINT, POSTERIOR})

    def __init__(self, config: LinearGaussianConfig):
        super().__init__()
        self.config = config
        d, q = config.data_dim, config.latent_dim
        self.weight = nn.Parameter(torch.randn(d, q) / math.sqrt(q))  # W
        self.mu = nn.Parameter(torch.zeros(d))
        self.log_sigma = nn.Parameter(torch.tensor(float(config.init_log_sigma)))
        encoder_cls = ENCODERS[config.encoder]
        self.encoder = encoder_cls(d, q) if encoder_cls is AmortizedLinearEncoder else encoder_cls()

    @property
    def sigma2(self) -> Tensor:
        return torch.exp(2 * self.log_sigma)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z | x) as (mean [B, q], scale_tril [q, q])."""
        self.check_batch(x, self.config.data_dim)
        return self.encoder(self, x)

    def log_weight_chunks(self, x: Tensor, sizes: Sequence[int]) -> Iterator[LogWeights]:
        mean, scale_tril = self.encode(x)
        for noise in chunk_noise(sizes, x.device):
            yield self._log_weights_of_noise(x, mean, scale_tril, noise.normal(mean.shape, mean.dtype))

    def _log_weights_of_noise(self, x: Tensor, mean: Tensor, scale_tril: Tensor, eps: Tensor) -> LogWeights:
        """Log weights of z = mean + L eps for standard noise eps [K, B, q]."""
        z = mean + eps @ scale_tril.T
        log_q = noise_log_prob(eps, torch.log(torch.diagonal(scale_tril)).sum())
        return LogWeights(self._log_likelihood(x, z), {"z": standard_normal_log_prob(z)}, {"z": log_q})

    def _log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """log N(x; W z + mu, sigma^2 I) for z [*S, B, q], [*S, B]."""
        residual = x - (z @ self.weight.T + self.mu)  # [*S, B, d]
        d = x.shape[-1]
        return -0.5 * (residual.pow(2).sum(-1) / self.sigma2 + d * (LOG_2PI + 2 * self.log_sigma))

    def structure(self) -> ModelStructure:
        return ModelStructure("linear-gaussian", latent_layers=1, data_dim=self.config.data_dim, likelihood="gaussian")

    def analytic_kl(self, x: Tensor) -> dict[str, Tensor]:
        """KL(N(m, L L^T) || N(0, I)) = 1/2 [tr(L L^T) + |m|^2 - q - log det(L L^T)]."""
        mean, scale_tril = self.encode(x)
        q = mean.shape[-1]
        trace = scale_tril.pow(2).sum()
        log_det = 2 * torch.log(torch.diagonal(scale_tril)).sum()
        return {"z": 0.5 * (trace + mean.pow(2).sum(-1) - q - log_det)}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n draws of x from the model, [n, d]: z ~ N(0, I), x = W z + mu + sigma eps."""
        return self.sample_joint(n, generator=generator)[0]

    def marginal_covariance(self) -> Tensor:
        """C = W W^T + sigma^2 I, [d, d]."""
        d = self.weight.shape[0]
        eye = torch.eye(d, dtype=self.weight.dtype, device=self.weight.device)
        return self.weight @ self.weight.T + self.sigma2 * eye

    def exact_log_marginal(self, x: Tensor) -> Tensor:
        self.check_batch(x, self.config.data_dim)
        chol = torch.linalg.cholesky(self.marginal_covariance())
        white = torch.linalg.solve_triangular(chol, (x - self.mu).T, upper=False)  # [d, B]
        d = x.shape[-1]
        log_det = 2 * torch.log(torch.diagonal(chol)).sum()
        return -0.5 * (white.pow(2).sum(0) + log_det + d * LOG_2PI)

    @torch.no_grad()
    def fit_maximum_likelihood(self, data: Tensor) -> LinearGaussian:
        """Set W, mu, sigma to the closed-form maximum-likelihood solution (Tipping & Bishop 1999).

        mu = sample mean; sigma^2 = mean of the d - q smallest eigenvalues of the
        sample covariance S; W = U_q (L_q - sigma^2 I)^(1/2). An amortized encoder
        is set to the exact posterior, which is diagonal at this solution.
        """
        d, q = self.config.data_dim, self.config.latent_dim
        if q == d:
            raise ValueError("the ML fit needs latent_dim < data_dim "
                             "(sigma^2 is the mean of the d - q smallest eigenvalues)")
        data = data.to(self.weight.dtype)
        mu = data.mean(0)
        centered = data - mu
        cov = centered.T @ centered / data.shape[0]  # maximum-likelihood S (divides by N)
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
        sigma2 = eigvals[q:].mean()
        weight = eigvecs[:, :q] * torch.sqrt((eigvals[:q] - sigma2).clamp_min(0))
        self.mu.copy_(mu)
        self.weight.copy_(weight)
        self.log_sigma.copy_(0.5 * torch.log(sigma2))
        if isinstance(self.encoder, AmortizedLinearEncoder):
            self._set_amortized_to_posterior()
        return self

    @torch.no_grad()
    def _set_amortized_to_posterior(self) -> None:
        mean_map, scale_tril = posterior_linear_map(self)
        self.encoder.proj.copy_(mean_map)
        self.encoder.shift.zero_()
        self.encoder.log_std.copy_(torch.log(torch.diagonal(scale_tril)))

    # --- capabilities: log p(x, z), ancestral draws, q(z | x) -------------------------------------

    def log_prior(self, z: Latents) -> Tensor:
        return standard_normal_log_prob(z["z"])

    def log_joint(self, x: Tensor, z: Latents) -> Tensor:
        self.check_batch(x, self.config.data_dim)
        return self.log_prior(z) + self._log_likelihood(x, z["z"])

    def sample_prior(self, n: int, batch: int, *, generator: torch.Generator | None = None) -> Latents:
        w = self.weight
        return {"z": torch.randn(n, batch, self.config.latent_dim, dtype=w.dtype, device=w.device, generator=generator)}

    @torch.no_grad()
    def sample_joint(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Latents]:
        """z ~ N(0, I), x = W z + mu + sigma eps: x [n, d], z [n, q]."""
        w = self.weight
        z = torch.randn(n, self.config.latent_dim, dtype=w.dtype, device=w.device, generator=generator)
        eps = torch.randn(n, self.config.data_dim, dtype=w.dtype, device=w.device, generator=generator)
        return z @ w.T + self.mu + torch.exp(self.log_sigma) * eps, {"z": z}

    def posterior(self, x: Tensor) -> LinearGaussianPosterior:
        return LinearGaussianPosterior(*self.encode(x))

    def inference_parameters(self) -> dict[str, nn.Parameter]:
        """The amortized encoder's A, b and log s; none for the exact encoder, whose q is made of W, mu, sigma."""
        return {name: p for name, p in self.named_parameters() if name.startswith("encoder.")}


class LinearGaussianPosterior(Posterior):
    """q(z | x) = N(mean, L L^T): mean [B, q], one lower-triangular scale L [q, q] for every example."""

    def __init__(self, mean: Tensor, scale_tril: Tensor):
        self.mean, self.scale_tril = mean, scale_tril

    def rsample(self, k: int, *, generator: torch.Generator | None = None) -> Latents:
        # The same draws as log_weights under the same seed: z = mean + eps L^T.
        eps = draw_noise(k, self.mean.device, generator).normal(self.mean.shape, self.mean.dtype)
        return {"z": self.mean + eps @ self.scale_tril.T}

    def log_prob(self, z: Latents) -> Tensor:
        # eps = (z - mean) L^-T, and log N = log N(eps; 0, I) - log det L.
        eps = torch.linalg.solve_triangular(self.scale_tril.T, z["z"] - self.mean, upper=True, left=False)
        return standard_normal_log_prob(eps) - torch.log(torch.diagonal(self.scale_tril)).sum()

    def detached(self) -> LinearGaussianPosterior:
        return LinearGaussianPosterior(self.mean.detach(), self.scale_tril.detach())


def posterior_linear_map(model: LinearGaussian) -> tuple[Tensor, Tensor]:
    """The exact posterior p(z | x) = N(A (x - mu), L L^T) as (A = M^-1 W^T [q, d], L = chol(sigma^2 M^-1) [q, q])."""
    w, sigma2 = model.weight, model.sigma2
    m = w.T @ w + sigma2 * torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    m_chol = torch.linalg.cholesky(m)
    return torch.cholesky_solve(w.T, m_chol), torch.linalg.cholesky(sigma2 * torch.cholesky_inverse(m_chol))


@register_model("linear-gaussian")
def linear_gaussian(**config) -> LinearGaussian:
    """Probabilistic PCA with exact log p(x); encoder 'amortized' (learnable) or 'exact' (true posterior)."""
    return LinearGaussian(LinearGaussianConfig(**config))
