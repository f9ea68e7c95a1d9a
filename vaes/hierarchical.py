"""The hierarchical VAE family: a Markovian stack of L Gaussian stochastic layers.

    q(z_1 | x) q(z_2 | z_1) ... q(z_L | z_{L-1})            (inference, bottom-up)
    p(z_L) p(z_{L-1} | z_L) ... p(z_1 | z_2) p(x | z_1)      (generation, top-down)

Every conditional is a diagonal Gaussian whose mean and log sigma are linear
maps of an MLP's output (vaes.layers.GaussianHead). The default is the IWAE
paper's two-layer architecture for 784-dimensional data. With L = 1 the model
is exactly the MLP VAE (same modules, same random draws).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
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
    Posterior,
    as_objective,
    check_k,
    diagonal_normal_log_prob,
    standard_normal_log_prob,
)
from .draws import DrawNoise, GeneratorNoise, chunk_noise, draw_noise
from .latents import gaussian_draw
from .layers import (
    BernoulliLikelihood,
    GaussianHead,
    make_likelihood,
    mlp,
    prepare_decoder_log_prob,
    reparameterize,
    reparameterize_noise,
)
from .registry import register_model

# Draws of the lower layers averaged in posterior_means for layers >= 2: the Monte
# Carlo error of each mean is at most sd(z_l | x) / sqrt(200) ~ 0.07 sd, small
# beside the spread across examples that the active-unit threshold (variance 0.01) looks at.
POSTERIOR_MEAN_SAMPLES = 200
# posterior_means works on row chunks so that rows * samples * width stays near this many floats.
POSTERIOR_MEAN_CHUNK_ELEMENTS = 2**24


def _layer_latents(value: int | Sequence[int], n_layers: int) -> tuple[int, ...]:
    """One latent size per layer; a single int is used for every layer."""
    sizes = (value,) * n_layers if isinstance(value, int) else tuple(value)
    if len(sizes) != n_layers:
        raise ValueError(
            f"latent_dims has {len(sizes)} entries {sizes} but n_layers is {n_layers}; "
            "give one size per layer or a single int for all layers"
        )
    return sizes


def _layer_hidden(value: Sequence, n_layers: int) -> tuple[tuple[int, ...], ...]:
    """One tuple of hidden widths per layer; a flat tuple of ints is used for every layer."""
    value = tuple(value)
    flat = [isinstance(v, int) for v in value]
    if all(flat):  # includes (): every layer's Gaussian head reads its input directly
        return (value,) * n_layers
    if any(flat):
        raise ValueError(
            f"hidden mixes ints and per-layer tuples: {value!r}; give a flat tuple (same widths for "
            "every layer) or one tuple per layer"
        )
    per_layer = tuple(tuple(widths) for widths in value)
    if len(per_layer) != n_layers:
        raise ValueError(
            f"hidden has {len(per_layer)} per-layer entries but n_layers is {n_layers}; "
            "give one tuple of widths per layer or a flat tuple for all layers"
        )
    return per_layer


@dataclass(frozen=True)
class HVAEConfig:
    """Settings of a hierarchical VAE; sizes are normalised to one entry per layer, which is what is hashed.

    For L layers of equal sizes: ``HVAEConfig(n_layers=4, latent_dims=8, hidden=(32, 32), data_dim=64)``.
    """

    data_dim: int = 784  # binarized MNIST, the IWAE paper's data
    n_layers: int = 2  # IWAE paper's two-stochastic-layer model; the depth sweep varies it (1..8)
    latent_dims: tuple[int, ...] = (100, 50)  # IWAE paper: z1 has 100 units, z2 has 50
    hidden: tuple[tuple[int, ...], ...] = ((200, 200), (100, 100))  # IWAE paper: x->200->200->z1, z1->100->100->z2
    activation: str = "tanh"  # IWAE paper
    likelihood: str = "bernoulli"  # "bernoulli" for binary data, "gaussian" for real-valued data
    objective: Objective = field(default_factory=Objective)  # what training maximizes (ELBO unless told)

    def __post_init__(self) -> None:
        check_k(self.n_layers, "n_layers")
        # TOML and JSON give lists; the hash and equality need tuples, one entry per layer.
        object.__setattr__(self, "latent_dims", _layer_latents(self.latent_dims, self.n_layers))
        object.__setattr__(self, "hidden", _layer_hidden(self.hidden, self.n_layers))
        object.__setattr__(self, "objective", as_objective(self.objective))
        sizes = {"data_dim": [self.data_dim], "latent_dims": list(self.latent_dims),
                 "hidden": [w for widths in self.hidden for w in widths]}
        for name, values in sizes.items():
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"HVAEConfig {name} must be positive integers, got {getattr(self, name)!r}")


class GaussianConditional(nn.Module):
    """A diagonal Gaussian over ``n_out`` units given ``n_in`` inputs: MLP, then mean and log sigma heads."""

    def __init__(self, n_in: int, hidden: Sequence[int], n_out: int, activation: str):
        super().__init__()
        self.net = mlp((n_in, *hidden), activation)
        self.head = GaussianHead(hidden[-1] if hidden else n_in, n_out)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.net(h))


@dataclass(frozen=True)
class PosteriorDraws:
    """K reparameterized draws of every layer from q and their log densities."""

    z: dict[str, Tensor]  # layer -> [K, B, n_l]
    log_posterior: dict[str, Tensor]  # layer -> [K, B]  log q(z_l | z_{l-1}) (z_0 = x)


# What the decoder's output bias is set to from the mean training example: the
# decoder outputs logits for Bernoulli data and means for Gaussian data.
_OUTPUT_BIAS_FROM_MEAN: dict[str, Callable[[Tensor], Tensor]] = {
    "bernoulli": lambda mean: torch.logit(mean.clamp(1e-3, 1 - 1e-3)),
    "gaussian": lambda mean: mean,
}


class HierarchicalVAE(LatentVariableModel):
    """Markovian hierarchical VAE: Gaussian q(z_1 | x), q(z_{l+1} | z_l); p(z_L) = N(0, I),
    Gaussian p(z_l | z_{l+1})."""

    capabilities = frozenset({LOG_JOINT, SAMPLE_JOINT, POSTERIOR, OUTPUT_BIAS})

    def __init__(self, config: HVAEConfig):
        super().__init__()
        self.config = config
        c = config
        self.layers = tuple(f"z{l}" for l in range(1, c.n_layers + 1))
        inputs = (c.data_dim, *c.latent_dims[:-1])  # what each layer's posterior conditions on
        # up[l]: q(z_{l+1} | z_l) (z_0 = x), with layer l+1's hidden widths.
        self.up = nn.ModuleList(
            GaussianConditional(n_in, widths, n_out, c.activation)
            for n_in, widths, n_out in zip(inputs, c.hidden, c.latent_dims)
        )
        # down[l-1]: p(z_l | z_{l+1}), mirroring q(z_{l+1} | z_l): the same hidden widths, reversed.
        self.down = nn.ModuleList(
            GaussianConditional(c.latent_dims[l], tuple(reversed(c.hidden[l])), c.latent_dims[l - 1], c.activation)
            for l in range(1, c.n_layers)
        )
        # p(x | z_1) mirrors q(z_1 | x); same layout as the MLP VAE's decoder.
        self.decoder = mlp((c.latent_dims[0], *reversed(c.hidden[0]), c.data_dim), c.activation, final_activation=False)
        self.likelihood = make_likelihood(c.likelihood, c.data_dim)

    def sample_posterior(self, x: Tensor, k: int) -> PosteriorDraws:
        """K draws of z_1..z_L from q; the first encoder pass runs once per example, the rest per draw."""
        check_k(k)
        self.check_batch(x, self.config.data_dim)
        (noise,) = chunk_noise([k], x.device)
        return self._draw_posterior(self.up[0](x), noise)

    def _draw_posterior(self, first_layer: tuple[Tensor, Tensor], noise: DrawNoise | GeneratorNoise) -> PosteriorDraws:
        """The chunk's draws from q given q(z_1 | x)'s mean and log sigma, [B, n_1] each."""
        mean, log_std = first_layer
        z, log_q = reparameterize_noise(mean, log_std, noise.normal(mean.shape, mean.dtype))  # [K, B, n_1], [K, B]
        draws, log_posterior = {self.layers[0]: z}, {self.layers[0]: log_q}
        for name, conditional in zip(self.layers[1:], self.up[1:]):
            mean, log_std = conditional(z)  # [K, B, n_l]
            z, log_q = reparameterize_noise(mean, log_std, noise.normal(mean.shape[1:], mean.dtype))
            draws[name], log_posterior[name] = z, log_q
        return PosteriorDraws(draws, log_posterior)

    def _log_priors(self, z: dict[str, Tensor]) -> dict[str, Tensor]:
        """log p(z_l | z_{l+1}) [K, B] per layer (top layer: N(0, I))."""
        zs = [z[name] for name in self.layers]
        log_prior = {name: diagonal_normal_log_prob(zs[l - 1], *self.down[l - 1](zs[l]))
                     for l, name in enumerate(self.layers[:-1], start=1)}
        log_prior[self.layers[-1]] = standard_normal_log_prob(zs[-1])
        return {name: log_prior[name] for name in self.layers}

    def log_weight_chunks(self, x: Tensor, sizes: Sequence[int]) -> Iterator[LogWeights]:
        self.check_batch(x, self.config.data_dim)
        first_layer = self.up[0](x)  # once per example, for every chunk of draws
        log_likelihood_of = prepare_decoder_log_prob(self.decoder, self.likelihood, x, max(sizes))
        for noise in chunk_noise(sizes, x.device):
            draws = self._draw_posterior(first_layer, noise)
            yield LogWeights(log_likelihood_of(draws.z[self.layers[0]]), self._log_priors(draws.z),
                             draws.log_posterior)

    def structure(self) -> ModelStructure:
        c = self.config
        return ModelStructure("hvae", latent_layers=c.n_layers, data_dim=c.data_dim, likelihood=c.likelihood)

    def posterior_means(self, x: Tensor, samples: int = POSTERIOR_MEAN_SAMPLES) -> dict[str, Tensor]:
        """E_q[z_l | x] per layer, [B, n_l].

        Layer 1 is exact (the encoder's mean). For l >= 2, E_q[z_l | x] =
        E_{q(z_{l-1} | x)}[mean of q(z_l | z_{l-1})], a Monte Carlo average over
        ``samples`` draws of the lower layers (random, so it uses the global RNG).
        """
        check_k(samples, "samples")
        self.check_batch(x, self.config.data_dim)
        widest = max((*self.config.latent_dims, *(w for ws in self.config.hidden for w in ws)))
        rows = max(1, POSTERIOR_MEAN_CHUNK_ELEMENTS // (samples * widest))
        chunks = [self._posterior_means_chunk(part, samples) for part in x.split(rows)]
        return {name: torch.cat([chunk[name] for chunk in chunks]) for name in self.layers}

    def _posterior_means_chunk(self, x: Tensor, samples: int) -> dict[str, Tensor]:
        mean, log_std = self.up[0](x)
        means = {self.layers[0]: mean}
        z, _ = reparameterize(mean, log_std, samples)  # [S, B, n_1]
        for name, conditional in zip(self.layers[1:], self.up[1:]):
            mean, log_std = conditional(z)  # [S, B, n_l]
            means[name] = mean.mean(0)
            z, _ = reparameterize(mean, log_std, None)
        return means

    def set_output_bias(self, train_mean: Tensor) -> None:
        """Initialise the decoder's output bias from the mean training example (IWAE paper: logit of the mean pixel)."""
        with torch.no_grad():
            self.decoder[-1].bias.copy_(_OUTPUT_BIAS_FROM_MEAN[self.config.likelihood](train_mean))

    def draw_nbytes(self, x: Tensor) -> int:
        """Per draw and example: per layer z, eps, q's and p's mean and log sigma (6 n_l); the two widest
        live MLP activations; and, unless the blocked Bernoulli decoder runs, the decoder output and its
        temporaries (6 D)."""
        c = self.config
        per_layer = 6 * sum(c.latent_dims)
        if isinstance(self.likelihood, BernoulliLikelihood):
            # The blocked decoder's buffers do not grow with K; the upper layers' MLPs run per draw.
            upper = max((w for ws in c.hidden[1:] for w in ws), default=0)
            return x.shape[0] * x.element_size() * (2 * upper + per_layer + 8)
        widest = max((c.data_dim, *(w for ws in c.hidden for w in ws)))
        return x.shape[0] * x.element_size() * (6 * c.data_dim + 2 * widest + per_layer)

    # --- capabilities: log p(x, z) over every layer, ancestral draws, q(z | x) ----------------------

    def log_prior(self, z: Latents) -> Tensor:
        return sum(self._log_priors(z).values())

    def log_joint(self, x: Tensor, z: Latents) -> Tensor:
        self.check_batch(x, self.config.data_dim)
        return self.log_prior(z) + self.likelihood.log_prob(x, self.decoder(z[self.layers[0]]))

    def sample_prior(self, n: int, batch: int, *, generator: torch.Generator | None = None) -> Latents:
        return self._draw_prior((n, batch), generator)

    def _draw_prior(self, leading: tuple[int, ...], generator: torch.Generator | None) -> Latents:
        """Ancestral draws z_L ~ N(0, I), then z_l ~ p(z_l | z_{l+1}); each layer [*leading, n_l]."""
        weight = self.decoder[0].weight
        z = torch.randn(*leading, self.config.latent_dims[-1], dtype=weight.dtype, device=weight.device,
                        generator=generator)
        draws = {self.layers[-1]: z}
        for l in range(self.config.n_layers - 1, 0, -1):  # down[l - 1] is p(z_l | z_{l+1})
            z = gaussian_draw(*self.down[l - 1](z), None, generator)
            draws[self.layers[l - 1]] = z
        return {name: draws[name] for name in self.layers}

    @torch.no_grad()
    def sample_joint(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Latents]:
        z = self._draw_prior((n,), generator)
        return self.likelihood.sample(self.decoder(z[self.layers[0]]), generator), z

    def posterior(self, x: Tensor) -> AncestralPosterior:
        self.check_batch(x, self.config.data_dim)
        return AncestralPosterior(self, self.up[0](x))

    def inference_parameters(self) -> dict[str, nn.Parameter]:
        """Every q(z_{l+1} | z_l): the bottom-up conditionals ``up``."""
        return {name: p for name, p in self.named_parameters() if name.startswith("up.")}


class AncestralPosterior(Posterior):
    """q(z | x) = q(z_1 | x) prod_l q(z_{l+1} | z_l): drawn layer by layer, its density summed over layers."""

    def __init__(self, model: HierarchicalVAE, first_layer: tuple[Tensor, Tensor], detach: bool = False):
        self.model, self.first_layer = model, first_layer  # mean and log sigma of q(z_1 | x), [B, n_1] each
        self.detach = detach  # True: the conditionals q(z_{l+1} | z_l) run with their parameters detached

    def _conditional(self, index: int, below: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log sigma of q(z_{index+1} | z_index = below): with detached parameters, the gradient
        still flows through ``below``."""
        conditional = self.model.up[index]
        if not self.detach:
            return conditional(below)
        frozen = {name: p.detach() for name, p in conditional.named_parameters()}
        return torch.func.functional_call(conditional, frozen, (below,))

    def detached(self) -> AncestralPosterior:
        mean, log_std = self.first_layer
        return AncestralPosterior(self.model, (mean.detach(), log_std.detach()), detach=True)

    def rsample(self, k: int, *, generator: torch.Generator | None = None) -> Latents:
        # The draws of log_weights under the same seed: layer 1, then each layer above it.
        noise = draw_noise(k, self.first_layer[0].device, generator)
        return self.model._draw_posterior(self.first_layer, noise).z

    def log_prob(self, z: Latents) -> Tensor:
        layers = self.model.layers
        total = diagonal_normal_log_prob(z[layers[0]], *self.first_layer)
        for index, (below, name) in enumerate(itertools.pairwise(layers), start=1):
            total = total + diagonal_normal_log_prob(z[name], *self._conditional(index, z[below]))
        return total


@register_model("hvae")
def hvae(**config) -> HierarchicalVAE:
    """Markovian hierarchical VAE with L Gaussian layers (IWAE paper's two-layer architecture by default)."""
    return HierarchicalVAE(HVAEConfig(**config))
