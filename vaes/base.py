"""The protocol every model implements.

Everything an estimator needs is the importance weight
``log w = log p(x, z) - log q(z | x)`` for K posterior draws, split into its
parts. A model exposes densities only; it never computes a bound.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


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


@dataclass(frozen=True)
class Objective:
    """Which training objective a model variant is fitted with (a name, not code).

    The estimators package maps ``name`` to the function that computes it, so a
    model never holds bound maths. ``k`` and ``beta`` are read only by the
    objectives that use them.
    """

    name: str = "elbo"  # "elbo", "beta-elbo", "iwae" or "diffusion" (see estimators.bounds.OBJECTIVES)
    k: int = 1  # importance samples per example for "iwae"; draws per example otherwise
    beta: float = 1.0  # KL weight for "beta-elbo"

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"objective k must be an integer >= 1, got {self.k!r}")
        if self.beta < 0:
            raise ValueError(f"objective beta must be >= 0, got {self.beta!r}")


def as_objective(value: "Objective | Mapping") -> Objective:
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
        fields = {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__type__": type(value).__name__, **fields}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


class LatentVariableModel(nn.Module):
    """Base class of every registered model.

    Subclasses set ``layers`` (stochastic layer names, in the order the
    posterior samples them), ``config`` (a frozen dataclass: the model's
    identity for hashing and checkpoints) and implement ``log_weights``.
    """

    layers: tuple[str, ...] = ()
    config: object = None

    def log_weights(self, x: Tensor, k: int) -> LogWeights:
        """K reparameterized posterior draws for each of the B rows of x."""
        raise NotImplementedError

    def log_weight_chunks(self, x: Tensor, sizes: Sequence[int]) -> Iterator[LogWeights]:
        """``LogWeights`` for successive chunks of ``sizes[i]`` draws: the same draws, in the same
        order, as calling ``log_weights(x, k)`` for each k of ``sizes`` in turn.

        Estimators draw a large K this way. Models override it to do the work that depends
        only on x (the encoder, the decoder's projection of x) once for all chunks.
        """
        for k in sizes:
            yield self.log_weights(x, k)

    def analytic_kl(self, x: Tensor) -> dict[str, Tensor] | None:
        """Closed-form KL(q(z_l | x) || p(z_l)) per layer, [B] each; None where not closed form."""
        return None

    def exact_log_marginal(self, x: Tensor) -> Tensor | None:
        """log p(x), [B], where tractable; None otherwise."""
        return None

    def posterior_means(self, x: Tensor) -> dict[str, Tensor] | None:
        """E_q[z_l | x] per layer, [B, n_l] each (for active units); None where the model has none."""
        return None

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


def check_k(k: object) -> int:
    """K must be a positive integer (bool is not an integer here)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return k


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dimension."""
    return -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * _LOG_2PI)


def diagonal_normal_log_prob(z: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log N(z; mean, diag(exp(2 log_std))) summed over the last dimension."""
    scaled = (z - mean) * torch.exp(-log_std)
    return -0.5 * (scaled.pow(2).sum(-1) + z.shape[-1] * _LOG_2PI) - log_std.sum(-1)


def diagonal_normal_kl(mean_q: Tensor, log_std_q: Tensor, mean_p: Tensor, log_std_p: Tensor) -> Tensor:
    """KL(N(mean_q, s_q^2) || N(mean_p, s_p^2)) for diagonal Gaussians, summed over the last dimension."""
    var_ratio = torch.exp(2 * (log_std_q - log_std_p))
    mean_term = ((mean_q - mean_p) * torch.exp(-log_std_p)).pow(2)
    return 0.5 * (var_ratio + mean_term - 1 - 2 * (log_std_q - log_std_p)).sum(-1)


_LOG_2PI = float(torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64)))
