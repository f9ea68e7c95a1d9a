"""The protocol every model implements.

Everything an estimator needs is the importance weight
``log w = log p(x, z) - log q(z | x)`` for K posterior draws, split into its
parts. A model exposes densities only; it never computes a bound.
"""
from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor, nn

from .draws import chunk_noise, draw_seed, vectorized_draws  # noqa: F401  (part of the protocol)


@dataclass(frozen=True)
class LogWeights:
    """Per-draw log densities of K reparameterized posterior draws; every tensor [K, B], nats."""

    log_likelihood: Tensor  # [K, B]  log p(x | z)
    log_prior: dict[str, Tensor]  # per stochastic layer: [K, B] log p(z_l | parents)
    log_posterior: dict[str, Tensor]  # per stochastic layer: [K, B] log q(z_l | x, ...)

    def __post_init__(self) -> None:
        shape = self.log_likelihood.shape
        if self.log_likelihood.dim() != 2:
            raise ValueError(f"log_likelihood must be [K, B], got shape {tuple(shape)}")
        if self.log_prior.keys() != self.log_posterior.keys():
            raise ValueError(
                f"prior layers {sorted(self.log_prior)} differ from posterior layers "
                f"{sorted(self.log_posterior)}"
            )
        for name in self.log_prior:
            for part, tensor in (("log_prior", self.log_prior[name]), ("log_posterior", self.log_posterior[name])):
                if tensor.shape != shape:
                    raise ValueError(f"{part}[{name!r}] has shape {tuple(tensor.shape)}, expected {tuple(shape)}")

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.log_prior)

    def layer_kl(self, name: str) -> Tensor:
        """Single-draw estimate of layer ``name``'s KL term: log q - log p, [K, B]."""
        return self.log_posterior[name] - self.log_prior[name]

    def total(self) -> Tensor:
        """log w = log p(x | z) + sum_l log p(z_l | .) - sum_l log q(z_l | .), [K, B]."""
        total = self.log_likelihood
        for name in self.log_prior:
            total = total - self.layer_kl(name)
        return total

    @staticmethod
    def cat(parts: Sequence[LogWeights]) -> LogWeights:
        """The draws of ``parts`` one after the other, [sum K, B]."""
        layers = parts[0].layers
        return LogWeights(torch.cat([part.log_likelihood for part in parts]),
                          {name: torch.cat([part.log_prior[name] for part in parts]) for name in layers},
                          {name: torch.cat([part.log_posterior[name] for part in parts]) for name in layers})


# Gradient estimators an importance-weighted objective can be trained with (estimators.gradients maps each
# name to its surrogate): "reparam" differentiates the objective through its reparameterized draws; "stl"
# (sticking the landing) drops q's score term; "dreg" (doubly reparameterized) rewrites it as a path term.
GRADIENT_ESTIMATORS = ("reparam", "stl", "dreg")
# Objective fields that enter a config's hash only when set away from their default, so configs written
# before the field existed keep their hash (and their cells and checkpoints their identity).
OMITTED_AT_DEFAULT = {"omitted_at_default": True}


@dataclass(frozen=True)
class Objective:
    """Which training objective a model variant is fitted with (a name, not code).

    The estimators package maps ``name`` to the function that computes it, so a
    model never holds bound maths. ``k``, ``m``, ``beta`` and ``estimator`` are read
    only by the objectives that use them (``estimators.check_objective`` rejects a
    setting an objective would ignore).
    """

    name: str = "elbo"  # "elbo", "beta-elbo", "iwae", "miwae", "piwae", "ciwae" or "diffusion" (estimators.OBJECTIVES)
    k: int = 1  # importance samples per bound for the importance-weighted objectives; draws per example otherwise
    beta: float = 1.0  # KL weight for "beta-elbo"; the ELBO's share for "ciwae" (beta ELBO + (1 - beta) IWAE)
    m: int = field(default=1, metadata=OMITTED_AT_DEFAULT)  # "miwae" and "piwae": M independent IWAE-K bounds
    estimator: str = field(default="reparam", metadata=OMITTED_AT_DEFAULT)  # of GRADIENT_ESTIMATORS

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"objective name must be a non-empty string, got {self.name!r}")
        check_k(self.k, "objective k")
        check_k(self.m, "objective m")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or self.beta < 0:
            raise ValueError(f"objective beta must be a number >= 0, got {self.beta!r}")
        if self.name == "ciwae" and not 0 <= self.beta <= 1:
            raise ValueError(f"objective 'ciwae' needs beta in [0, 1] (beta ELBO + (1 - beta) IWAE), got {self.beta!r}")
        choose("objective estimator", self.estimator, dict.fromkeys(GRADIENT_ESTIMATORS))


def as_objective(value: Objective | Mapping) -> Objective:
    """An Objective from itself or from a mapping of its fields (a suite file spells it as a table)."""
    if isinstance(value, Mapping):
        value = Objective(**value)
    if not isinstance(value, Objective):
        raise ValueError(f"objective must be an Objective or a mapping of its fields, got {value!r}")
    return value


def config_hash(config: object) -> str:
    """A short stable hash of a frozen config dataclass (keys sorted, JSON-encoded)."""
    payload = json.dumps(_jsonable(config), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                  if not (f.metadata.get("omitted_at_default") and getattr(value, f.name) == f.default)}
        return {"__type__": type(value).__name__, **fields}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


# --- optional capabilities ---------------------------------------------------------------------------
# A model lists the ones it implements in ``capabilities``; estimators ask ``model.supports(name)`` (or
# ``require``), never getattr, and a model without one gives a "not applicable" row.
LOG_JOINT = "log_joint"  # log_joint(x, z), log_prior(z) and sample_prior(n, batch): AIS, BDMC
SAMPLE_JOINT = "sample_joint"  # sample_joint(n): BDMC's simulated data with exact posterior samples
POSTERIOR = "posterior"  # posterior(x) -> Posterior: the AIS start from q, STL, DReG
DIFFUSION_TERMS = "diffusion_terms"  # diffusion_loss_terms(x, samples) -> DiffusionDraws
OUTPUT_BIAS = "output_bias"  # set_output_bias(train_mean): the IWAE paper's decoder initialisation
CAPABILITIES = (LOG_JOINT, SAMPLE_JOINT, POSTERIOR, DIFFUSION_TERMS, OUTPUT_BIAS)

Latents = dict[str, Tensor]
"""A latent state in a model's own layout: one tensor per stochastic layer (keys ``model.layers``),
each [*S, B, n_l] (S: any leading draw/chain dimensions, B: examples, n_l: the layer's width)."""


class MissingCapability(ValueError):
    """An estimator asked a model for a capability it does not declare (a not-applicable row)."""


class Posterior(abc.ABC):
    """q(z | x) for one batch x: reparameterized draws and their log density over every layer."""

    @abc.abstractmethod
    def rsample(self, k: int, *, generator: torch.Generator | None = None) -> Latents:
        """K reparameterized draws, each layer [k, B, n_l] (from ``generator``, else the global RNG)."""

    @abc.abstractmethod
    def log_prob(self, z: Latents) -> Tensor:
        """log q(z | x) summed over layers, [*S, B]."""

    @abc.abstractmethod
    def detached(self) -> Posterior:
        """The same q with every parameter cut from autograd: its ``log_prob(z)`` is differentiable in z only
        (through every layer's conditioning on the layer below, as a function of z with q held fixed).

        STL and DReG evaluate log q this way, so that q's score term drops out of the gradient."""


@dataclass(frozen=True)
class DiffusionDraws:
    """Per-draw parts of a diffusion model's ELBO, nats; estimators reduce them to a bound and its error.

    ELBO = E[reconstruction] - prior - E[diffusion].
    """

    reconstruction: Tensor  # [S, B] log p(x | z_0) at S draws of z_0 ~ q(z_0 | x)
    prior: Tensor  # [B] KL(q(z_1 | x) || p(z_1)), closed form
    diffusion: Tensor  # [S, B] weighted denoising losses at S stratified times (unbiased for L_T or L_inf)


@dataclass(frozen=True)
class ModelStructure:
    """What a model is, declared by it and written into every row: reports read this, never config keys."""

    family: str  # e.g. "mlp-vae", "hvae", "vdm", "linear-gaussian", "mixture-oracle"
    latent_layers: int  # stochastic layers of ``log_weights`` (a discrete-time VDM with T steps: T + 1)
    data_dim: int  # numbers per example; bits/dim divides by it
    likelihood: str  # "bernoulli" (binary data) or "gaussian"
    diffusion_steps: int | None = None  # T of a discrete-time diffusion; None: not a diffusion, or continuous time
    continuous_time: bool = False  # a diffusion whose bound is the T -> infinity limit


class LatentVariableModel(nn.Module):
    """Base class of every registered model.

    Subclasses set ``layers`` (stochastic layer names, in the order the
    posterior samples them), ``config`` (a frozen dataclass: the model's
    identity for hashing and checkpoints) and implement ``log_weights``.
    """

    layers: tuple[str, ...] = ()
    config: object = None
    capabilities: frozenset[str] = frozenset()  # of CAPABILITIES; see the optional methods below

    def supports(self, capability: str) -> bool:
        choose("capability", capability, dict.fromkeys(CAPABILITIES))
        return capability in self.capabilities

    def require(self, capability: str, wanted_by: str) -> None:
        """Raise MissingCapability naming the model, the capability and who wanted it."""
        if not self.supports(capability):
            raise MissingCapability(f"{wanted_by} needs a model with {capability!r}; {type(self).__name__} "
                                    f"declares {', '.join(sorted(self.capabilities)) or 'none'}")

    def structure(self) -> ModelStructure:
        """Family, depth and data shape of this model (written into rows)."""
        raise NotImplementedError(f"{type(self).__name__} does not declare its structure")

    def log_weights(self, x: Tensor, k: int) -> LogWeights:
        """K reparameterized posterior draws for each of the B rows of x.

        A model implements this or ``log_weight_chunks``; by default it is the one chunk of K draws."""
        check_k(k)
        if type(self).log_weight_chunks is LatentVariableModel.log_weight_chunks:
            raise NotImplementedError(f"{type(self).__name__} implements neither log_weights nor log_weight_chunks")
        (log_weights,) = self.log_weight_chunks(x, [k])
        return log_weights

    def log_weight_chunks(self, x: Tensor, sizes: Sequence[int]) -> Iterator[LogWeights]:
        """``LogWeights`` for successive chunks of ``sizes[i]`` draws, whose values do not depend on
        ``sizes``: draw j's noise comes from a generator of its own (``vaes.draws``), seeded from one seed
        taken from torch's global generator when the first chunk is asked for.

        Estimators draw K this way. Models override it to draw a chunk at once with ``chunk_noise``
        and to do the work that depends only on x (the encoder, the decoder's projection of x) once
        for all chunks. This default makes each draw alone, ``log_weights(x, 1)`` with torch's global
        generator seeded for that draw (and restored after), so a model that has only
        ``log_weights`` gets the same property, one call per draw.
        """
        cuda = [x.device.index or 0] if x.device.type == "cuda" else []
        for noise in chunk_noise(sizes, x.device):
            parts = []
            with torch.random.fork_rng(devices=cuda):
                for draw in range(noise.first, noise.first + noise.count):
                    torch.random.default_generator.manual_seed(draw_seed(noise.seed, draw))
                    if cuda:
                        torch.cuda.manual_seed(draw_seed(noise.seed, draw))
                    parts.append(self.log_weights(x, 1))
            yield LogWeights.cat(parts)

    def analytic_kl(self, x: Tensor) -> dict[str, Tensor] | None:
        """Closed-form KL(q(z_l | x) || p(z_l)) per layer, [B] each; None where not closed form."""
        return None

    def exact_log_marginal(self, x: Tensor) -> Tensor | None:
        """log p(x), [B], where tractable; None otherwise."""
        return None

    def evaluation_only_fields(self) -> tuple[str, ...]:
        """Config fields training never reads, so one trained model may be evaluated under other values of
        them (a suite's ``eval_configs``); none unless a model says so."""
        return ()

    def posterior_means(self, x: Tensor) -> dict[str, Tensor] | None:
        """E_q[z_l | x] per layer, [B, n_l] each (for active units); None where the model has none."""
        return None

    # --- optional capabilities: implemented where ``capabilities`` lists them -----------------------

    def log_joint(self, x: Tensor, z: Latents) -> Tensor:
        """log p(x, z), [*S, B], differentiable in z (capability LOG_JOINT)."""
        raise MissingCapability(f"{type(self).__name__} has no log_joint")

    def log_prior(self, z: Latents) -> Tensor:
        """log p(z) over every layer, [*S, B] (LOG_JOINT): AIS's normalized start distribution."""
        raise MissingCapability(f"{type(self).__name__} has no log_prior")

    def sample_prior(self, n: int, batch: int, *, generator: torch.Generator | None = None) -> Latents:
        """n ancestral draws of z ~ p(z) for each of ``batch`` examples, each layer [n, batch, n_l] (LOG_JOINT)."""
        raise MissingCapability(f"{type(self).__name__} has no sample_prior")

    def sample_joint(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Latents]:
        """n ancestral draws (x, z) ~ p(x, z): x [n, D], each layer of z [n, n_l] (SAMPLE_JOINT).

        Each z is an exact posterior sample of its x (BDMC's reverse chain starts there)."""
        raise MissingCapability(f"{type(self).__name__} has no sample_joint")

    def posterior(self, x: Tensor) -> Posterior:
        """q(z | x) for the batch x (capability POSTERIOR)."""
        raise MissingCapability(f"{type(self).__name__} has no posterior")

    def set_output_bias(self, train_mean: Tensor) -> None:
        """Set the decoder's output bias from the mean training example, [D] (capability OUTPUT_BIAS)."""
        raise MissingCapability(f"{type(self).__name__} has no output bias to initialise")

    def inference_parameters(self) -> dict[str, nn.Parameter]:
        """The inference network's parameters (q's own), by name as ``named_parameters`` gives them (POSTERIOR).

        Empty where q has no parameters of its own (it is computed from the generative ones)."""
        raise MissingCapability(f"{type(self).__name__} does not declare its inference network")

    def generative_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter that is not the inference network's (POSTERIOR), by name."""
        inference = self.inference_parameters()
        return {name: p for name, p in self.named_parameters() if name not in inference}

    def diffusion_loss_terms(self, x: Tensor, *, samples: int = 1,
                             generator: torch.Generator | None = None) -> DiffusionDraws:
        """Per-draw parts of a diffusion model's ELBO (capability DIFFUSION_TERMS)."""
        raise MissingCapability(f"{type(self).__name__} has no diffusion_loss_terms")

    @property
    def objective(self) -> Objective:
        """The objective this variant is trained on; variants override through their config."""
        return getattr(self.config, "objective", Objective())

    def draw_nbytes(self, x: Tensor) -> int:
        """Rough peak bytes that one posterior draw for the whole batch x costs in ``log_weights``.

        Used to choose the chunk of K from a memory budget. The default assumes
        the decoder's output dominates and allows a handful of [B, D] temporaries
        (logits, their softplus, the product with x, ...). Models with larger
        intermediates override it.
        """
        return 8 * x.numel() * x.element_size()

    def config_hash(self) -> str:
        return config_hash(self.config)

    def check_batch(self, x: Tensor, data_dim: int) -> None:
        if x.dim() != 2 or x.shape[1] != data_dim:
            raise ValueError(f"{type(self).__name__} expects x of shape [B, {data_dim}], got {tuple(x.shape)}")


def check_k(k: object, name: str = "k") -> int:
    """A count of draws (or any size) must be a positive integer (bool is not an integer here).

    Public entry points check their own arguments once, under the caller's name for them."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {k!r}")
    return k


# --- named choices ---------------------------------------------------------------------------------

Choice = TypeVar("Choice")


class UnknownChoice(ValueError):
    """A name that is not a key of the table it should pick from."""


def choose(what: str, name: object, table: Mapping[str, Choice]) -> Choice:
    """``table[name]``, or UnknownChoice saying "unknown {what} {name!r}; choices: ..." (sorted)."""
    try:
        return table[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        raise UnknownChoice(f"unknown {what} {name!r}; choices: {', '.join(sorted(table))}") from None


# --- Gaussian densities: the one copy every family uses --------------------------------------------
# The float operations keep one order (constant added inside the -1/2, log scale subtracted after),
# so every path that computes the same density gives the same bits.

LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * LOG_2PI)


def noise_log_prob(eps: Tensor, log_scale_det: Tensor | float) -> Tensor:
    """log N(mean + S eps; mean, S S^T) from the standard noise eps, summed over the last dimension.

    ``log_scale_det`` is log |det S| (for a diagonal S, the sum of its log sigmas), so no division
    by the scale is needed. Written as four operations: on small tensors their count sets the time."""
    return eps.pow(2).sum(-1).mul(-0.5).sub(log_scale_det + eps.shape[-1] * LOG_2PI / 2)


def diagonal_normal_log_prob(z: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log N(z; mean, diag(exp(2 log_std))) summed over the last dimension."""
    return noise_log_prob((z - mean) * torch.exp(-log_std), log_std.sum(-1))


def standard_normal_log_prob_from_square_(square_norm: Tensor, dim: int) -> Tensor:
    """log N(z; 0, I_dim) from |z|^2, in place (the blocked fast paths keep only squared norms)."""
    return square_norm.mul_(-0.5).sub_(0.5 * dim * LOG_2PI)


def diagonal_normal_kl(mean_q: Tensor, log_std_q: Tensor, mean_p: Tensor, log_std_p: Tensor) -> Tensor:
    """KL(N(mean_q, s_q^2) || N(mean_p, s_p^2)) for diagonal Gaussians, summed over the last dimension."""
    var_ratio = torch.exp(2 * (log_std_q - log_std_p))
    mean_term = ((mean_q - mean_p) * torch.exp(-log_std_p)).pow(2)
    return 0.5 * (var_ratio + mean_term - 1 - 2 * (log_std_q - log_std_p)).sum(-1)
