"""Building blocks shared by the model families: MLPs, Gaussian stochastic layers, likelihoods."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

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


# --- fast evaluation of an MLP decoder with a Bernoulli likelihood (no autograd) --------------------

@dataclass(frozen=True)
class AffineActivation:
    """An activation written as out_scale * f(in_scale * a) + out_shift with f applied in place.

    The scales and shift fold into the neighbouring linear layers, so only f runs per element.
    """

    inplace: Callable[[Tensor], Tensor]
    in_scale: float = 1.0
    out_scale: float = 1.0
    out_shift: float = 0.0


# tanh(a) = 2 sigmoid(2a) - 1 exactly, and on CPU sigmoid is several times cheaper than tanh.
FOLDABLE_ACTIVATIONS: dict[type[nn.Module], AffineActivation] = {
    nn.Tanh: AffineActivation(torch.sigmoid_, 2.0, 2.0, -1.0),
    nn.ReLU: AffineActivation(torch.relu_),
}

# Rows per block of the fast decoder: the widest block ([rows, D] float32, ~3 MB for D = 784)
# stays in cache between the matmul that writes it and the softplus that reads it.
BLOCK_ELEMENTS = 1024 * 784


@dataclass(frozen=True)
class FoldedLinear:
    """One linear layer with its neighbours' activation scales folded in: f(h @ weight_t + bias)."""

    weight_t: Tensor  # [n_in, n_out], contiguous for addmm
    bias: Tensor  # [n_out]
    activation: Callable[[Tensor], Tensor] | None  # in place; None after the output layer


def fold_mlp(net: nn.Sequential) -> list[FoldedLinear] | None:
    """``net`` (Linear, activation, ..., Linear) as folded layers; None if it has another shape."""
    modules = list(net)
    folded: list[FoldedLinear] = []
    scale, shift = 1.0, 0.0  # the previous activation's output affine map
    i = 0
    while i < len(modules):
        linear = modules[i]
        if not isinstance(linear, nn.Linear):
            return None
        follower = modules[i + 1] if i + 1 < len(modules) else None
        act = FOLDABLE_ACTIVATIONS.get(type(follower)) if follower is not None else None
        if follower is not None and act is None:
            return None
        weight = linear.weight.detach()
        bias = linear.bias.detach() if linear.bias is not None else weight.new_zeros(weight.shape[0])
        # W (scale * f + shift) + b = (scale W) f + (b + shift W 1), then times the next in_scale.
        in_scale = act.in_scale if act is not None else 1.0
        folded.append(FoldedLinear((in_scale * scale * weight).t().contiguous(),
                                   in_scale * (bias + shift * weight.sum(1)),
                                   act.inplace if act is not None else None))
        if act is not None:
            scale, shift = act.out_scale, act.out_shift
        i += 2 if follower is not None else 1
    if not folded or folded[-1].activation is not None:
        return None  # the output layer must be linear: it gives the logits
    return folded


def _block_rows(rows: int, widest: int) -> int:
    """Rows per block: about BLOCK_ELEMENTS of the widest layer, a multiple of 16 so that noise drawn
    block by block is the same stream as one draw of the whole (CPU normal_ fills in 16s)."""
    return min(rows, max(16, BLOCK_ELEMENTS // widest // 16 * 16))


def _tile_rows(per_example: Tensor, block: int) -> Tensor:
    """Per-example rows [B, ...] repeated to [>= block + B, ...]: flat draw row r belongs to example
    r % B, so the rows of any block starting at ``start`` are ``tiled[start % B:][:n]``."""
    reps = math.ceil(block / per_example.shape[0]) + 1
    return per_example.repeat(reps, *([1] * (per_example.dim() - 1)))


class _BlockedBernoulliDecoder:
    """sum_d log Bernoulli(x_d; sigmoid(l_d)) with logits l = MLP(z) for blocks of flat draw rows.

    Row r of the flat draws belongs to example r % B. Buffers are preallocated once per call
    and the x-term folds into the last layer, sum_d x_d (h W + b)_d = h . (W x) + b . x, so
    only softplus(l) touches the full logits. No autograd (buffers are written in place).
    """

    def __init__(self, layers: list[FoldedLinear], x: Tensor, block: int):
        self.layers, self.batch = layers, x.shape[0]
        self.buffers = [x.new_empty(block, layer.weight_t.shape[1]) for layer in layers]
        last = layers[-1]
        # W x per example and b . x, tiled so that any block's rows can slice them.
        self.x_proj = _tile_rows(x @ last.weight_t.t(), block)  # [B, H] -> [block + B, H]
        self.x_bias = _tile_rows(x @ last.bias, block)
        self.product = x.new_empty(block, self.x_proj.shape[1])

    def __call__(self, h: Tensor, start: int, out: Tensor) -> None:
        """Write log p(x | z) of the rows z = h (flat rows start .. start + n) into out [n]."""
        n = h.shape[0]
        for layer, buffer in zip(self.layers[:-1], self.buffers):
            h = torch.addmm(layer.bias, h, layer.weight_t, out=buffer[:n])
            layer.activation(h)
        last = self.layers[-1]
        logits = torch.addmm(last.bias, h, last.weight_t, out=self.buffers[-1][:n])
        offset = start % self.batch
        x_term = torch.mul(h, self.x_proj[offset:offset + n], out=self.product[:n]).sum(-1)
        torch.sub(x_term + self.x_bias[offset:offset + n], F.softplus(logits).sum(-1), out=out)


def bernoulli_mlp_log_prob(layers: list[FoldedLinear], x: Tensor, z: Tensor) -> Tensor:
    """sum_d log Bernoulli(x_d; sigmoid(l_d)) with logits l = MLP(z); x [B, D], z [K, B, n] -> [K, B].

    Same value as ``BernoulliLikelihood.log_prob(x, decoder(z))`` without the [K, B, D]
    tensors: rows run in cache-sized blocks through preallocated buffers.
    """
    k, batch = z.shape[0], z.shape[1]
    rows = k * batch
    flat = z.reshape(rows, z.shape[-1])
    block = _block_rows(rows, max(layer.weight_t.shape[1] for layer in layers))
    decode = _BlockedBernoulliDecoder(layers, x, block)
    out = flat.new_empty(rows)
    for start in range(0, rows, block):
        n = min(block, rows - start)
        decode(flat[start:start + n], start, out[start:start + n])
    return out.view(k, batch)


def gaussian_bernoulli_log_weights(layers: list[FoldedLinear], x: Tensor, mean: Tensor, log_std: Tensor,
                                   k: int) -> tuple[Tensor, Tensor, Tensor]:
    """K draws z = mean + sigma * eps from q = N(mean, sigma^2) [B, n] and, per draw, log p(x | z) of the
    folded Bernoulli MLP decoder, log N(z; 0, I) and log q(z): three [K, B] tensors.

    The draws are made and consumed block by block, so nothing of size [K, B, n] exists and
    memory does not grow with K beyond the [K, B] outputs. The noise is the same stream as
    ``reparameterize(mean, log_std, k)`` draws under the same seed, so both paths agree up to
    rounding. No autograd.
    """
    batch, latent = mean.shape
    rows = k * batch
    block = _block_rows(rows, max(latent, *(layer.weight_t.shape[1] for layer in layers)))
    decode = _BlockedBernoulliDecoder(layers, x, block)
    means, sigmas = _tile_rows(mean, block), _tile_rows(log_std.exp(), block)
    eps_buffer, z_buffer = mean.new_empty(block, latent), mean.new_empty(block, latent)
    log_lik, eps_sq, z_sq = mean.new_empty(rows), mean.new_empty(rows), mean.new_empty(rows)
    for start in range(0, rows, block):
        n = min(block, rows - start)
        offset = start % batch
        eps = eps_buffer[:n].normal_()
        z = torch.addcmul(means[offset:offset + n], eps, sigmas[offset:offset + n], out=z_buffer[:n])
        torch.linalg.vector_norm(eps, dim=-1, out=eps_sq[start:start + n]).square_()
        torch.linalg.vector_norm(z, dim=-1, out=z_sq[start:start + n]).square_()
        decode(z, start, log_lik[start:start + n])
    constant = 0.5 * latent * math.log(2 * math.pi)
    log_prior = z_sq.mul_(-0.5).sub_(constant)
    log_q = eps_sq.mul_(-0.5).sub_(constant).view(k, batch).sub_(log_std.sum(-1))
    return log_lik.view(k, batch), log_prior.view(k, batch), log_q


def decoder_log_prob(decoder: nn.Sequential, likelihood: nn.Module, x: Tensor, z: Tensor) -> Tensor:
    """log p(x | z) [K, B] of an MLP decoder's likelihood; x [B, D], z [K, B, n].

    Without autograd (estimators run under inference mode) a Bernoulli decoder of
    foldable layers takes the fast blocked path; training takes the plain path so
    gradients flow. Both give the same values up to rounding.
    """
    folded = fast_bernoulli_decoder(decoder, likelihood)
    if folded is not None:
        return bernoulli_mlp_log_prob(folded, x, z)
    return likelihood.log_prob(x, decoder(z))


def fast_bernoulli_decoder(decoder: nn.Sequential, likelihood: nn.Module) -> list[FoldedLinear] | None:
    """The decoder folded for the blocked Bernoulli evaluation, or None where it does not apply
    (autograd on, another likelihood, or layers that do not fold)."""
    if torch.is_grad_enabled() or not isinstance(likelihood, BernoulliLikelihood):
        return None
    return fold_mlp(decoder)


def make_likelihood(name: str, data_dim: int) -> nn.Module:
    factories = {"bernoulli": lambda: BernoulliLikelihood(), "gaussian": lambda: GaussianLikelihood(data_dim)}
    if name not in factories:
        raise ValueError(f"unknown likelihood {name!r}; choices: {', '.join(sorted(factories))}")
    return factories[name]()
