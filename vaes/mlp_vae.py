"""The MLP VAE family: one Gaussian stochastic layer, Bernoulli or Gaussian decoder.

Registered variants differ only in the objective they are trained on; every one
is evaluated on the same true bounds.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import (
    LOG_JOINT,
    OUTPUT_BIAS,
    POSTERIOR,
    SAMPLE_JOINT,
    Latents,
    LatentVariableModel,
    LogWeights,
    ModelStructure,
    Objective,
    as_objective,
    diagonal_normal_kl,
    standard_normal_log_prob,
)
from .draws import chunk_noise
from .latents import DiagonalGaussianPosterior
from .layers import (
    BernoulliLikelihood,
    GaussianBernoulliDraws,
    GaussianHead,
    fast_bernoulli_decoder,
    make_likelihood,
    mlp,
    reparameterize_noise,
)
from .registry import register_model


@dataclass(frozen=True)
class MLPVAEConfig:
    data_dim: int = 784  # binarized MNIST, the IWAE paper's data
    latent_dim: int = 50  # IWAE paper, one stochastic layer
    hidden: tuple[int, ...] = (200, 200)  # IWAE paper: two deterministic tanh layers each way
    activation: str = "tanh"  # IWAE paper
    likelihood: str = "bernoulli"  # "bernoulli" for binary data, "gaussian" for real-valued data
    objective: Objective = field(default_factory=Objective)  # what training maximizes

    def __post_init__(self) -> None:
        # TOML and JSON give lists; the hash and equality need the tuple.
        object.__setattr__(self, "hidden", tuple(self.hidden))
        object.__setattr__(self, "objective", as_objective(self.objective))
        if self.data_dim < 1 or self.latent_dim < 1 or any(h < 1 for h in self.hidden):
            raise ValueError(f"MLPVAEConfig sizes must be positive: {self}")


class MLPVAE(LatentVariableModel):
    """x -> hidden -> (mean, log sigma) of z; z -> mirrored hidden -> likelihood parameters of x."""

    layers = ("z",)
    capabilities = frozenset({LOG_JOINT, SAMPLE_JOINT, POSTERIOR, OUTPUT_BIAS})

    def __init__(self, config: MLPVAEConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = mlp((c.data_dim, *c.hidden), c.activation)
        self.posterior_head = GaussianHead(c.hidden[-1] if c.hidden else c.data_dim, c.latent_dim)
        self.decoder = mlp((c.latent_dim, *reversed(c.hidden), c.data_dim), c.activation, final_activation=False)
        self.likelihood = make_likelihood(c.likelihood, c.data_dim)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log sigma of q(z | x), [B, latent_dim] each."""
        self.check_batch(x, self.config.data_dim)
        return self.posterior_head(self.encoder(x))

    def log_weight_chunks(self, x: Tensor, sizes: Sequence[int]) -> Iterator[LogWeights]:
        mean, log_std = self.encode(x)  # once per example, for every chunk of draws
        folded = fast_bernoulli_decoder(self.decoder, self.likelihood)
        if folded is not None:  # evaluation: draws made and decoded block by block, same values
            draws = GaussianBernoulliDraws(folded, x, mean, log_std, max(sizes))
            for noise in chunk_noise(sizes, x.device):
                log_lik, log_prior, log_q = draws(noise)
                yield LogWeights(log_lik, {"z": log_prior}, {"z": log_q})
            return
        for noise in chunk_noise(sizes, x.device):
            # z [K, B, latent], log_q [K, B]
            z, log_q = reparameterize_noise(mean, log_std, noise.normal(mean.shape, mean.dtype))
            log_lik = self.likelihood.log_prob(x, self.decoder(z))  # [K, B]
            yield LogWeights(log_lik, {"z": standard_normal_log_prob(z)}, {"z": log_q})

    def analytic_kl(self, x: Tensor) -> dict[str, Tensor]:
        mean, log_std = self.encode(x)
        zeros = torch.zeros_like(mean)
        return {"z": diagonal_normal_kl(mean, log_std, zeros, zeros)}

    def structure(self) -> ModelStructure:
        c = self.config
        return ModelStructure("mlp-vae", latent_layers=1, data_dim=c.data_dim, likelihood=c.likelihood)

    def posterior_means(self, x: Tensor) -> dict[str, Tensor]:
        return {"z": self.encode(x)[0]}

    def set_output_bias(self, train_mean: Tensor) -> None:
        """Initialise the decoder's output bias to the logit of the mean training pixel (IWAE paper)."""
        p = train_mean.clamp(1e-3, 1 - 1e-3)
        with torch.no_grad():
            self.decoder[-1].bias.copy_(torch.log(p) - torch.log1p(-p))

    def draw_nbytes(self, x: Tensor) -> int:
        c = self.config
        if isinstance(self.likelihood, BernoulliLikelihood):
            # Draws are made and decoded in fixed-size blocks; per draw and example remain only
            # [K, B] tensors: the three log densities, the weights and the reducer's temporaries.
            return x.shape[0] * x.element_size() * 12
        widest = max((*c.hidden, c.data_dim))
        return x.shape[0] * x.element_size() * (6 * c.data_dim + 2 * widest)

    # --- capabilities: log p(x, z), ancestral draws, q(z | x) -------------------------------------

    def log_prior(self, z: Latents) -> Tensor:
        return standard_normal_log_prob(z["z"])

    def log_joint(self, x: Tensor, z: Latents) -> Tensor:
        self.check_batch(x, self.config.data_dim)
        return self.log_prior(z) + self.likelihood.log_prob(x, self.decoder(z["z"]))

    def sample_prior(self, n: int, batch: int, *, generator: torch.Generator | None = None) -> Latents:
        weight = self.decoder[0].weight
        return {"z": torch.randn(n, batch, self.config.latent_dim, dtype=weight.dtype, device=weight.device,
                                 generator=generator)}

    @torch.no_grad()
    def sample_joint(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Latents]:
        z = self.sample_prior(n, 1, generator=generator)["z"][:, 0]  # [n, latent]
        return self.likelihood.sample(self.decoder(z), generator), {"z": z}

    def posterior(self, x: Tensor) -> DiagonalGaussianPosterior:
        return DiagonalGaussianPosterior("z", *self.encode(x))

    def inference_parameters(self) -> dict[str, nn.Parameter]:
        """The encoder and q's Gaussian head."""
        return {name: p for name, p in self.named_parameters() if name.startswith(("encoder.", "posterior_head."))}


@register_model("vae")
def vae(**config) -> MLPVAE:
    """MLP VAE trained on the ELBO (IWAE paper's one-layer architecture by default)."""
    return MLPVAE(MLPVAEConfig(**config))


@register_model("beta-vae")
def beta_vae(*, beta: float = 4.0, **config) -> MLPVAE:
    """MLP VAE trained on reconstruction - beta * KL (beta = 4 by default); evaluated on the true bounds."""
    return MLPVAE(MLPVAEConfig(objective=Objective("beta-elbo", beta=float(beta)), **config))


@register_model("iwae")
def iwae(*, k: int = 5, **config) -> MLPVAE:
    """MLP VAE trained on the K-sample IWAE bound (K = 5 by default)."""
    return MLPVAE(MLPVAEConfig(objective=Objective("iwae", k=k), **config))
