"""Building blocks shared by the model families: MLPs, Gaussian stochastic layers, likelihoods."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .base import diagonal_normal_log_prob

# Name -> activation module; configs name one of these keys.
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus, "silu": nn.SiLU}


def mlp(sizes: Sequence[int], activation: str, *, final_activation: bool = True) -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` between them (and after the last if asked)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choices: {', '.join(sorted(ACTIVATIONS))}")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if final_activation or i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class GaussianHead(nn.Module):
    """Maps features to a diagonal Gaussian: mean = linear, sigma = exp(linear)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.mean = nn.Linear(n_in, n_out)
        self.log_std = nn.Linear(n_in, n_out)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.mean(h), self.log_std(h)


def reparameterize(mean: Tensor, log_std: Tensor, k: int | None) -> tuple[Tensor, Tensor]:
    """Draw z = mean + sigma * eps and return (z, log q(z)).

    With ``k`` set, mean and log_std are [B, n] and z is [K, B, n]; with k None
    they already carry the sample dimension. log q comes from eps directly, so no
    division by sigma is needed.
    """
    shape = mean.shape if k is None else (k, *mean.shape)
    eps = torch.randn(shape, dtype=mean.dtype, device=mean.device)
    z = mean + eps * torch.exp(log_std)
    log_q = -0.5 * (eps.pow(2).sum(-1) + mean.shape[-1] * math.log(2 * math.pi)) - log_std.sum(-1)
    return z, log_q


class BernoulliLikelihood(nn.Module):
    """p(x | z) = prod_d Bernoulli(x_d; sigmoid(logit_d)); the decoder outputs one logit per dimension."""

    def log_prob(self, x: Tensor, logits: Tensor) -> Tensor:
        # sum_d x_d l_d - softplus(l_d); x is [B, D], logits [..., B, D]. The x-term is a
        # batched dot product, so x is never broadcast to the logits' shape.
        x_term = torch.einsum("...bd,bd->...b", logits, x)
        return x_term - F.softplus(logits).sum(-1)

    def mean(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)


class GaussianLikelihood(nn.Module):
    """p(x | z) = N(x; decoder mean, diag(sigma^2)) with one learned sigma per data dimension."""

    def __init__(self, data_dim: int, init_log_std: float = 0.0):
        super().__init__()
        self.log_std = nn.Parameter(torch.full((data_dim,), float(init_log_std)))

    def log_prob(self, x: Tensor, mean: Tensor) -> Tensor:
        return diagonal_normal_log_prob(x, mean, self.log_std)

    def mean(self, decoder_output: Tensor) -> Tensor:
        return decoder_output


def make_likelihood(name: str, data_dim: int) -> nn.Module:
    factories = {"bernoulli": lambda: BernoulliLikelihood(), "gaussian": lambda: GaussianLikelihood(data_dim)}
    if name not in factories:
        raise ValueError(f"unknown likelihood {name!r}; choices: {', '.join(sorted(factories))}")
    return factories[name]()
