"""Building blocks shared by the model families: MLPs, Gaussian stochastic layers, likelihoods."""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import choose, diagonal_normal_log_prob, noise_log_prob, standard_normal_log_prob_from_square_
from .draws import DrawNoise

# Name -> activation module; configs name one of these keys.
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus, "silu": nn.SiLU}


def mlp(sizes: Sequence[int], activation: str, *, final_activation: bool = True) -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` between them (and after the last if asked)."""
    make_activation = choose("activation", activation, ACTIVATIONS)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if final_activation or i < len(sizes) - 2:
            layers.append(make_activation())
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
    return reparameterize_noise(mean, log_std, torch.randn(shape, dtype=mean.dtype, device=mean.device))


def reparameterize_noise(mean: Tensor, log_std: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """z = mean + sigma * eps for given standard noise eps [K, B, n] (mean, log_std broadcast to it), and log q(z)."""
    return mean + eps * torch.exp(log_std), noise_log_prob(eps, log_std.sum(-1))


class BernoulliLikelihood(nn.Module):
    """p(x | z) = prod_d Bernoulli(x_d; sigmoid(logit_d)); the decoder outputs one logit per dimension."""

    def log_prob(self, x: Tensor, logits: Tensor) -> Tensor:
        """sum_d x_d l_d - softplus(l_d), [..., B], for x [B, D] and logits [..., B, D]."""
        return _BernoulliLogProb.apply(logits, x)

    def mean(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)

    def sample(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x ~ p(x | z), same shape as the logits."""
        return torch.bernoulli(torch.sigmoid(logits), generator=generator)


class GaussianLikelihood(nn.Module):
    """p(x | z) = N(x; decoder mean, diag(sigma^2)) with one learned sigma per data dimension."""

    def __init__(self, data_dim: int, init_log_std: float = 0.0):
        super().__init__()
        self.log_std = nn.Parameter(torch.full((data_dim,), float(init_log_std)))

    def log_prob(self, x: Tensor, mean: Tensor) -> Tensor:
        return diagonal_normal_log_prob(x, mean, self.log_std)

    def mean(self, decoder_output: Tensor) -> Tensor:
        return decoder_output

    def sample(self, mean: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x ~ p(x | z), same shape as the decoder's mean."""
        noise = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device, generator=generator)
        return mean + torch.exp(self.log_std) * noise


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
# stays in cache between the matmul that writes it and the elementwise work that reads it.
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
    """Rows per block: about BLOCK_ELEMENTS of the widest layer, in steps of 16 rows."""
    return min(rows, max(16, BLOCK_ELEMENTS // widest // 16 * 16))


def _tile_rows(per_example: Tensor, block: int) -> Tensor:
    """Per-example rows [B, ...] repeated to [>= block + B, ...]: flat draw row r belongs to example
    r % B, so the rows of any block starting at ``start`` are ``tiled[start % B:][:n]``."""
    reps = math.ceil(block / per_example.shape[0]) + 1
    return per_example.repeat(reps, *([1] * (per_example.dim() - 1)))


class _BernoulliLogProb(torch.autograd.Function):
    """sum_d x_d l_d - softplus(l_d) over the last dimension, exact for every l, with its gradient
    x - sigmoid(l) written out.

    Forward, as in the blocked decoder: (x - 1/2) l - |l| / 2 + log sigmoid(|l|), with the logs
    taken on group products, in one [..., B, D] buffer (x is never broadcast into a tensor of its
    own). Backward is one sigmoid, one subtraction and one product in the output tensor. Autograd
    through log-sigmoid and a dot product instead costs several passes and fresh [..., B, D]
    tensors (each a round of page faults on CPU) and a transposing copy; under HMC, which
    differentiates this at every leapfrog step, that was most of the time.
    """

    @staticmethod
    def forward(logits: Tensor, x: Tensor) -> Tensor:
        buffer = torch.mul(logits, x - 0.5)
        total = buffer.sum(-1)
        magnitude = torch.abs(logits, out=buffer)
        total -= 0.5 * magnitude.sum(-1)
        total += _log_sigmoid_sum_(magnitude.view(-1, magnitude.shape[-1])).view(total.shape)
        return total

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def vmap(info, in_dims: tuple[int | None, int | None], logits: Tensor, x: Tensor) -> tuple[Tensor, int]:
        """Under torch.func.vmap (gradient_snr's repetitions): the logits already allow any leading
        dimensions, so the mapped one goes first; a mapped x, which the fast form does not broadcast,
        takes the plain formula."""
        logits_dim, x_dim = in_dims
        if x_dim is not None:
            logits = logits if logits_dim is not None else logits.unsqueeze(0)
            logits = logits.movedim(logits_dim or 0, 0)
            x = x.movedim(x_dim, 0).reshape(info.batch_size, *([1] * (logits.dim() - x.dim())), *x.shape[1:])
            return (x * logits - torch.nn.functional.softplus(logits)).sum(-1), 0
        return _BernoulliLogProb.apply(logits.movedim(logits_dim, 0), x), 0

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        logits, x = ctx.saved_tensors
        per_element = grad[..., None]
        grad_logits = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_logits = torch.sigmoid(logits).sub_(x).mul_(-per_element)  # (x - sigmoid(l)) grad
        if ctx.needs_input_grad[1]:
            grad_x = (per_element * logits).reshape(-1, *x.shape).sum(0)
        return grad_logits, grad_x


def _log_sigmoid_sum_(a: Tensor) -> Tensor:
    """sum over the last dim of log sigmoid(a) for a >= 0, [n, D] -> [n]; overwrites a.

    Each sigmoid(a_d) lies in [1/2, 1], so a product of g of them stays at or above 2^-g
    and, for g up to log2 of the dtype's smallest normal number (126 in float32), never
    underflows. Summing the logs of such group products takes one log per group instead
    of one per element. (Where sigmoid(a_d) rounds to 1, a_d > 17 in float32, the term
    lost is below 4e-8.)
    """
    width = a.shape[-1]
    max_group = int(-math.log2(torch.finfo(a.dtype).tiny))
    group = math.ceil(width / math.ceil(width / max_group))
    whole = width // group * group
    torch.sigmoid_(a)
    total = a[:, :whole].unflatten(1, (whole // group, group)).prod(-1).log_().sum(-1)
    if whole < width:
        total += a[:, whole:].prod(-1).log_()
    return total


class BlockedBernoulliDecoder:
    """sum_d log Bernoulli(x_d; sigmoid(l_d)) with logits l = MLP(z), for one batch x [B, D] and up to
    ``max_rows`` flat draw rows at a time, in blocks of cache-sized rows.

    Row r of the flat draws belongs to example r % B. What depends only on x and the
    buffers are prepared once and shared by every call. Per element only |l| and one
    sigmoid are computed:

        sum_d x_d l_d - softplus(l_d) = sum_d (x_d - 1/2) l_d - |l_d| / 2 + log sigmoid(|l_d|)

    (softplus(l) = max(l, 0) - log sigmoid(|l|), max(l, 0) = (l + |l|) / 2), and the linear
    part folds into the last layer: sum_d (x_d - 1/2)(h W + b)_d = h . (W (x - 1/2)) + b . (x - 1/2).
    That is half the work of softplus, whose exp and log1p run per element. No autograd
    (buffers are written in place).
    """

    def __init__(self, layers: list[FoldedLinear], x: Tensor, max_rows: int, *, widest_input: int = 0):
        self.layers, self.batch = layers, x.shape[0]
        self.block = _block_rows(max_rows, max(widest_input, *(layer.weight_t.shape[1] for layer in layers)))
        self.buffers = [x.new_empty(self.block, layer.weight_t.shape[1]) for layer in layers]
        last = layers[-1]
        # W (x - 1/2) per example and b . (x - 1/2), tiled so that any block's rows can slice them.
        centred = x - 0.5
        self.x_proj = _tile_rows(centred @ last.weight_t.t(), self.block)  # [B, H] -> [block + B, H]
        self.x_bias = _tile_rows(centred @ last.bias, self.block)
        self.product = x.new_empty(self.block, self.x_proj.shape[1])

    def decode_block(self, h: Tensor, start: int, out: Tensor) -> None:
        """Write log p(x | z) of the rows z = h (flat rows start .. start + n, n <= block) into out [n]."""
        n = h.shape[0]
        for layer, buffer in zip(self.layers[:-1], self.buffers):
            h = torch.addmm(layer.bias, h, layer.weight_t, out=buffer[:n])
            layer.activation(h)
        last = self.layers[-1]
        logits = torch.addmm(last.bias, h, last.weight_t, out=self.buffers[-1][:n])
        offset = start % self.batch
        linear = torch.mul(h, self.x_proj[offset:offset + n], out=self.product[:n]).sum(-1)
        linear += self.x_bias[offset:offset + n]
        magnitude = logits.abs_()
        torch.sub(linear, magnitude.sum(-1), alpha=0.5, out=out)
        out += _log_sigmoid_sum_(magnitude)

    def log_prob(self, z: Tensor) -> Tensor:
        """log p(x | z) [K, B] for z [K, B, n] with K * B <= max_rows."""
        k, batch = z.shape[0], z.shape[1]
        rows = k * batch
        flat = z.reshape(rows, z.shape[-1])
        out = flat.new_empty(rows)
        for start in range(0, rows, self.block):
            stop = min(start + self.block, rows)
            self.decode_block(flat[start:stop], start, out[start:stop])
        return out.view(k, batch)


class GaussianBernoulliDraws:
    """Draws z = mean + sigma * eps from q = N(mean, sigma^2) [B, n] and, per draw, log p(x | z) of a
    folded Bernoulli MLP decoder, log N(z; 0, I) and log q(z). Prepared once for a batch and
    called once per chunk of at most ``max_k`` draws.

    The draws are made and consumed a few whole draws at a time (about one decoder block of
    rows), so nothing of size [K, B, n] exists and memory does not grow with K beyond the
    [K, B] outputs. The noise is the chunk's ``DrawNoise``, as on the plain path, so both paths
    agree up to rounding. No autograd.
    """

    def __init__(self, layers: list[FoldedLinear], x: Tensor, mean: Tensor, log_std: Tensor, max_k: int):
        self.batch, self.latent = mean.shape
        self.decoder = BlockedBernoulliDecoder(layers, x, max_k * self.batch, widest_input=self.latent)
        self.draws_per_block = max(1, self.decoder.block // self.batch)
        self.mean, self.sigma, self.log_std_sum = mean, log_std.exp(), log_std.sum(-1)
        self.eps_buffer = mean.new_empty(self.draws_per_block, self.batch, self.latent)
        self.z_buffer = torch.empty_like(self.eps_buffer)

    def __call__(self, noise: DrawNoise) -> tuple[Tensor, Tensor, Tensor]:
        """log p(x | z), log p(z) and log q(z) of the chunk's draws, [K, B] each."""
        k, batch, block = noise.count, self.batch, self.decoder.block
        log_lik, eps_sq, z_sq = self.eps_buffer.new_empty((3, k * batch))
        for first in range(0, k, self.draws_per_block):
            n = min(self.draws_per_block, k - first)
            eps = noise.fill_(self.eps_buffer[:n], first)
            z = torch.addcmul(self.mean, eps, self.sigma, out=self.z_buffer[:n]).view(-1, self.latent)
            start, stop = first * batch, (first + n) * batch
            torch.linalg.vector_norm(eps.view(-1, self.latent), dim=-1, out=eps_sq[start:stop]).square_()
            torch.linalg.vector_norm(z, dim=-1, out=z_sq[start:stop]).square_()
            for row in range(start, stop, block):  # more than one block only when B exceeds a block
                end = min(row + block, stop)
                self.decoder.decode_block(z[row - start:end - start], row, log_lik[row:end])
        log_prior = standard_normal_log_prob_from_square_(z_sq, self.latent)
        log_q = standard_normal_log_prob_from_square_(eps_sq, self.latent).view(k, batch).sub_(self.log_std_sum)
        return log_lik.view(k, batch), log_prior.view(k, batch), log_q


def prepare_decoder_log_prob(decoder: nn.Sequential, likelihood: nn.Module, x: Tensor,
                             max_k: int) -> Callable[[Tensor], Tensor]:
    """z [K, B, n] -> log p(x | z) [K, B] of an MLP decoder's likelihood for this batch x [B, D], K <= max_k.

    Without autograd (estimators run under inference mode) a Bernoulli decoder of foldable
    layers takes the fast blocked path, prepared once for x; training takes the plain path
    so gradients flow. Both give the same values up to rounding.
    """
    folded = fast_bernoulli_decoder(decoder, likelihood)
    if folded is None:
        return lambda z: likelihood.log_prob(x, decoder(z))
    return BlockedBernoulliDecoder(folded, x, max_k * x.shape[0]).log_prob


def fast_bernoulli_decoder(decoder: nn.Sequential, likelihood: nn.Module) -> list[FoldedLinear] | None:
    """The decoder folded for the blocked Bernoulli evaluation, or None where it does not apply
    (autograd on, another likelihood, or layers that do not fold)."""
    if torch.is_grad_enabled() or not isinstance(likelihood, BernoulliLikelihood):
        return None
    return fold_mlp(decoder)


def make_likelihood(name: str, data_dim: int) -> nn.Module:
    factories = {"bernoulli": lambda: BernoulliLikelihood(), "gaussian": lambda: GaussianLikelihood(data_dim)}
    return choose("likelihood", name, factories)()
