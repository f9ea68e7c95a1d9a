"""Variational Diffusion Models (Kingma et al. 2021): a fixed Gaussian forward process, a learned reverse one.

Forward process on the signal y(x) (x itself for real data, 2x - 1 for binary):
    q(z_t | x) = N(alpha_t y, sigma_t^2 I),  alpha_t^2 = sigmoid(-gamma(t)), sigma_t^2 = sigmoid(gamma(t)).
Discrete time with n steps has latents z_0, z_{1/n}, ..., z_1 (layers "z0".."z<n>",
"z<i>" living at time i/n), the posterior is the forward process sampled
ancestrally, q(z_1 | x) then q(z_s | z_t, x) with s = t - 1/n, and the model is
    p(z_1) = N(0, I),  p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t)),  p(x | z_0) (decoder below),
    x_hat(z_t) from the noise prediction eps_hat(z_t, t): y_hat = (z_t - sigma_t eps_hat) / alpha_t.
So ``log_weights`` is an ordinary importance weight over whole trajectories and every
shared estimator (ELBO, IWAE-K) applies. ``diffusion_loss_terms`` gives the same ELBO
faster: each step's KL given z_t is 1/2 (exp(gamma_t - gamma_s) - 1) ||eps - eps_hat||^2,
so the T-step sum is L_T = T/2 E_i[...] and its T -> infinity limit L_inf = 1/2 E_t[gamma'(t) ||...||^2].

Decoders p(x | z_0), both without parameters:
- Bernoulli: binary x is coded as y = 2x - 1 in {-1, +1} (a coding of a discrete
  variable, so the bound on log P(x) keeps its units). The logit is the exact
  posterior log-odds of y = +1 against -1 under a uniform prior given z_0:
  logit = 2 alpha_0 z_0 / sigma_0^2 = 2 SNR(0) z_0 / alpha_0.
- Gaussian: N(x; z_0 / alpha_0, exp(gamma_0) I), i.e. the forward noise at t = 0
  mapped back to data scale (sigma_0^2 / alpha_0^2 = exp(gamma_0)). Real data is not rescaled.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from .base import (
    DIFFUSION_TERMS,
    DiffusionDraws,
    LatentVariableModel,
    LogWeights,
    ModelStructure,
    Objective,
    as_objective,
    check_k,
    choose,
    diagonal_normal_kl,
    diagonal_normal_log_prob,
    noise_log_prob,
    standard_normal_log_prob,
)
from .draws import DrawNoise, chunk_noise
from .layers import BernoulliLikelihood, mlp
from .registry import register_model
from .schedules import SCHEDULES, NoiseSchedule, alpha_sigma_squared

# --- how data enters the diffusion and how z_0 gives it back ---------------------------------------


@dataclass(frozen=True)
class DataCoding:
    to_signal: Callable[[Tensor], Tensor]  # x [B, D] -> y [B, D], the signal the forward process noises
    log_likelihood: Callable[[Tensor, Tensor, Tensor], Tensor]  # (x [B, D], z_0 [..., B, D], gamma_0 []) -> [..., B]


def _bernoulli_log_likelihood(x: Tensor, z0: Tensor, gamma0: Tensor) -> Tensor:
    alpha2, sigma2 = alpha_sigma_squared(gamma0)
    logits = 2 * torch.sqrt(alpha2) / sigma2 * z0
    return BernoulliLikelihood().log_prob(x.to(logits.dtype), logits)


def _gaussian_log_likelihood(x: Tensor, z0: Tensor, gamma0: Tensor) -> Tensor:
    alpha2, _ = alpha_sigma_squared(gamma0)
    log_std = (gamma0 / 2).expand(x.shape[-1])
    return diagonal_normal_log_prob(x.to(z0.dtype), z0 / torch.sqrt(alpha2), log_std)


DATA_CODINGS: dict[str, DataCoding] = {
    "bernoulli": DataCoding(lambda x: 2 * x - 1, _bernoulli_log_likelihood),
    "gaussian": DataCoding(lambda x: x, _gaussian_log_likelihood),
}


# --- discrete and continuous time: where the loss is evaluated and how it is weighted ---------------

@dataclass(frozen=True)
class TimeMode:
    # steps of the discrete trajectory that ``log_weights`` samples
    trajectory_steps: Callable[[DiffusionConfig], int]
    # (u ~ U[0, 1) [S, B], schedule, steps) -> (t [S, B], w [S, B]); the loss draw is w ||eps - eps_hat(z_t, t)||^2
    time_and_weight: Callable[[Tensor, NoiseSchedule, int], tuple[Tensor, Tensor]]


def _discrete_time_and_weight(u: Tensor, schedule: NoiseSchedule, steps: int) -> tuple[Tensor, Tensor]:
    # Step i uniform on 1..T: L_T = T/2 E_i[(exp(gamma(t_i) - gamma(t_i - 1/T)) - 1) ||eps - eps_hat||^2].
    i = torch.clamp(torch.floor(u * steps), max=steps - 1) + 1
    t, s = i / steps, (i - 1) / steps
    return t, steps / 2 * torch.expm1(schedule.gamma(t) - schedule.gamma(s))


def _continuous_time_and_weight(u: Tensor, schedule: NoiseSchedule, steps: int) -> tuple[Tensor, Tensor]:
    # L_inf = 1/2 E_{t ~ U(0, 1)}[gamma'(t) ||eps - eps_hat||^2]; ``steps`` is not used.
    return u, schedule.derivative(u) / 2


TIMES: dict[str, TimeMode] = {
    "discrete": TimeMode(lambda config: config.steps, _discrete_time_and_weight),
    # log_weights of a continuous-time model samples the discretization with log_weights_steps steps
    "continuous": TimeMode(lambda config: config.log_weights_steps, _continuous_time_and_weight),
}


# --- configuration ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DiffusionConfig:
    """Settings shared by every diffusion model (the learned one and the closed-form oracle)."""

    data_dim: int = 784  # binarized MNIST, as the VAEs
    likelihood: str = "bernoulli"  # "bernoulli" for binary data, "gaussian" for real-valued data
    time: str = "discrete"  # "discrete": the T-step model (its log_weights and L_T agree); "continuous": L_inf
    steps: int = 32  # T of discrete time: log_weights costs T denoiser calls per draw, affordable on 2 cores
    log_weights_steps: int = 32  # used only with time="continuous": the discretization log_weights/IWAE sample
    schedule: str = "linear"  # gamma(t) linear between the end points, as in the VDM paper
    gamma_min: float = -13.3  # gamma(0): VDM paper's value (SNR(0) ~ 6e5, decoder nearly exact)
    gamma_max: float = 5.0  # gamma(1): VDM paper's value (alpha_1^2 ~ 0.007, prior term small)
    learn_endpoints: bool = True  # VDM paper learns gamma_min, gamma_max with the ELBO

    def __post_init__(self) -> None:
        choose("time", self.time, TIMES)
        choose("likelihood", self.likelihood, DATA_CODINGS)
        choose("noise schedule", self.schedule, SCHEDULES)
        for name in ("data_dim", "steps", "log_weights_steps"):
            check_k(getattr(self, name), name)
        if not self.gamma_min < self.gamma_max:
            raise ValueError(f"need gamma_min < gamma_max, got {self.gamma_min} and {self.gamma_max}")

    def evaluation_only_fields(self) -> tuple[str, ...]:
        """Fields that training never reads, so one trained state serves every value of them.

        In continuous time the loss is L_inf and ``log_weights_steps`` only sets the
        discretization that log_weights (ELBO, IWAE, KL per step) samples: a suite may
        evaluate one network at many T. The network takes t itself as input, so its
        state has the same keys and shapes for every T. In discrete time ``steps`` sets
        the training loss L_T, so nothing may change after training.
        """
        return ("log_weights_steps",) if self.time == "continuous" else ()


@dataclass(frozen=True)
class VDMConfig(DiffusionConfig):
    hidden: tuple[int, ...] = (128, 128)  # small: T network calls per log_weights draw on 2 CPU cores
    activation: str = "silu"  # smooth in z and t, as in the VDM score network
    fourier_features: int = 8  # sin/cos of t at frequencies pi * 2^j, j < 8: resolves steps of 1/256
    # The VDM paper's loss: per-step closed-form KLs at sampled times, one network call per draw.
    objective: Objective = field(default_factory=lambda: Objective("diffusion"))

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "hidden", tuple(self.hidden))  # TOML/JSON give lists
        object.__setattr__(self, "objective", as_objective(self.objective))  # a suite spells it as a table
        if any(h < 1 for h in self.hidden) or self.fourier_features < 0:
            raise ValueError(f"VDMConfig sizes must be positive: hidden={self.hidden}, "
                             f"fourier_features={self.fourier_features}")

    def evaluation_only_fields(self) -> tuple[str, ...]:
        # Trained through log_weights (an "elbo" or "iwae" objective), the discretization is part of training.
        return super().evaluation_only_fields() if self.objective.name == "diffusion" else ()


# --- the noise-prediction network -------------------------------------------------------------------

class NoisePredictionMLP(nn.Module):
    """eps_hat(z_t, t): an MLP on [z_t, sin(pi 2^j t), cos(pi 2^j t)]; float64 in and out, its own dtype inside."""

    def __init__(self, config: VDMConfig):
        super().__init__()
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(config.fourier_features))
        sizes = (config.data_dim + 2 * config.fourier_features, *config.hidden, config.data_dim)
        self.net = mlp(sizes, config.activation, final_activation=False)
        with torch.no_grad():  # start from eps_hat = 0: a finite, schedule-only loss before training
            self.net[-1].weight.zero_()
            self.net[-1].bias.zero_()
        self.floats_per_row = sum(sizes)  # activations of one row, for memory estimates

    def _time_features(self, t: Tensor) -> Tensor:
        """[sin(pi 2^j t), cos(pi 2^j t)] in the network's dtype, [..., 2 * fourier_features]."""
        dtype = self.net[0].weight.dtype
        angles = t.to(dtype)[..., None] * self.frequencies.to(dtype)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    def forward(self, z: Tensor, t: Tensor, gamma: Tensor) -> Tensor:
        features = torch.cat([z.to(self.net[0].weight.dtype), self._time_features(t)], dim=-1)
        return self.net(features).double()

    def at_times(self, times: Tensor, gammas: Tensor) -> list[Callable[[Tensor], Tensor]]:
        """``forward`` for rows that all share one time, one function of z [..., D] per time of ``times``:
        the time features enter the first layer as a bias, computed here once for every time."""
        first = self.net[0]
        features = self._time_features(times)  # [T, 2F]
        data_dim = first.in_features - features.shape[-1]
        time_bias = torch.addmm(first.bias, features, first.weight[:, data_dim:].T)  # [T, hidden]
        data_weight = first.weight[:, :data_dim]
        return [partial(self._at_one_time, weight=data_weight, bias=bias) for bias in time_bias.unbind()]

    def _at_one_time(self, z: Tensor, *, weight: Tensor, bias: Tensor) -> Tensor:
        h = nn.functional.linear(z.to(weight.dtype), weight, bias)
        for layer in itertools.islice(self.net, 1, None):
            h = layer(h)
        return h.double()


# --- the model ------------------------------------------------------------------------------------------

class DiffusionModel(LatentVariableModel):
    """A VDM with any denoiser: ``denoiser(z_t [..., D], t [...], gamma_t [...]) -> eps_hat [..., D]`` (float64),
    and ``denoiser.at_times(times [n], gammas [n])``, one function z [..., D] -> eps_hat per time, for the
    steps of a trajectory, whose rows all share a time.

    The learned ``vdm`` plugs in an MLP; ``vdm-oracle`` the closed-form optimal denoiser.
    Stochastic quantities are float64 (the schedule's small steps need it).

    Neither declares LOG_JOINT, SAMPLE_JOINT or POSTERIOR, so AIS and BDMC give not-applicable
    rows. The latent is the whole trajectory z_0..z_T, (T + 1) x D numbers (1001 x 784 on MNIST
    at T = 1000); log p(x, z) costs T denoiser calls, and so does every leapfrog gradient; and
    the continuous-time model has no finite trajectory at all. The IWAE bound over trajectories
    (``log_weights``) is the available reference. For ``vdm-oracle`` log p(x) is closed form
    (``exact_log_marginal``), so it needs no sampling reference.
    """

    capabilities = frozenset({DIFFUSION_TERMS})

    def __init__(self, config: DiffusionConfig, denoiser: nn.Module):
        super().__init__()
        self.config = config
        self.denoiser = denoiser
        self.schedule = NoiseSchedule(config.schedule, config.gamma_min, config.gamma_max,
                                      learnable=config.learn_endpoints)
        self.coding = DATA_CODINGS[config.likelihood]
        self.time_mode = TIMES[config.time]
        n = self.trajectory_steps
        self.layers = tuple(f"z{i}" for i in range(n, -1, -1))  # the order q samples them: z_1 first

    @property
    def trajectory_steps(self) -> int:
        """Number of steps n of the discrete trajectory that ``log_weights`` samples."""
        return self.time_mode.trajectory_steps(self.config)

    def evaluation_only_fields(self) -> tuple[str, ...]:
        return tuple(self.config.evaluation_only_fields())

    def structure(self) -> ModelStructure:
        c = self.config
        continuous = c.time == "continuous"
        return ModelStructure("vdm", latent_layers=self.trajectory_steps + 1, data_dim=c.data_dim,
                              likelihood=c.likelihood, diffusion_steps=None if continuous else c.steps,
                              continuous_time=continuous)

    def _signal(self, x: Tensor) -> Tensor:
        self.check_batch(x, self.config.data_dim)
        return self.coding.to_signal(x.double())

    def log_weight_chunks(self, x: Tensor, sizes: Sequence[int]) -> Iterator[LogWeights]:
        y = self._signal(x)  # [B, D]
        for source in chunk_noise(sizes, y.device):
            yield self._trajectory_log_weights(x, y, source)

    def _trajectory_log_weights(self, x: Tensor, y: Tensor, source: DrawNoise) -> LogWeights:
        """Log weights of the chunk's whole trajectories z_1, ..., z_0, their noise from ``source``.

        A step t -> s draws z_s = keep z_t + pull y + std noise from q(z_s | z_t, x); p(z_s | z_t) has
        the same law with eps_hat(z_t) in place of the true noise eps = (z_t - alpha_t y) / sigma_t, so
        its mean is shifted by shift (eps_hat - eps) standard deviations, and both log densities come
        from one standard-normal form: log q = log N(noise), log p = log N(noise + shift (eps_hat - eps)).
        Every coefficient, and every term of y alone ([B, D]), is computed once per chunk for all steps;
        the loop holds only the [K, B, D] work, as few passes as fused multiply-adds allow (per-operation
        overhead and memory passes set a step's time on small data)."""
        n, dim = self.trajectory_steps, y.shape[-1]
        times = torch.arange(n + 1, dtype=torch.float64, device=y.device) / n
        gammas = self.schedule.gamma(times)  # [n + 1]
        alpha2, sigma2 = alpha_sigma_squared(gammas)
        alpha, sigma = torch.sqrt(alpha2), torch.sqrt(sigma2)
        # step i (t = i/n, s = (i-1)/n) at index i - 1: q(z_s | z_t, x) = N(ratio ((1 - c) z_t + c alpha_t y),
        # sigma_s^2 c) with c = 1 - exp(gamma_s - gamma_t) and ratio = alpha_s / alpha_t
        gamma_drop = gammas[:-1] - gammas[1:]  # gamma_s - gamma_t < 0
        kept, c, ratio = torch.exp(gamma_drop), -torch.expm1(gamma_drop), alpha[:-1] / alpha[1:]  # kept = 1 - c
        std = sigma[:-1] * torch.sqrt(c)
        keep, pull, shift = ratio * kept, ratio * c * alpha[1:], ratio * c * sigma[1:] / std
        # the y terms of each step, [B, D] (not [K, B, D]): eps = z_t / sigma_t - alpha_t y / sigma_t, so
        # noise + shift (eps_hat - eps) = noise + shift alpha_t y / sigma_t + shift eps_hat - (shift / sigma_t) z_t
        prior_offset = ((shift * alpha[1:] / sigma[1:])[:, None, None] * y).unbind()
        pulled = (pull[:, None, None] * y).unbind()
        steps = list(zip(*(v.unbind() for v in (keep, shift, -shift / sigma[1:], std, dim * torch.log(std)))))
        denoise_at = self.denoiser.at_times(times, gammas)  # eps_hat(z) at each time

        # The noise is drawn in float32 (torch makes float32 normals about 5x faster than float64 on CPU, and
        # drawing was a third of a trajectory's time) and used in float64: each draw is an exact number whose
        # densities below are computed for that number, so the weights stay exact.
        eps = source.normal(y.shape, torch.float32).double()
        z = alpha[n] * y + sigma[n] * eps  # z_1 ~ q(z_1 | x), [K, B, D]
        log_prior = {self.layers[0]: standard_normal_log_prob(z)}
        log_posterior = {self.layers[0]: noise_log_prob(eps, dim * torch.log(sigma[n]))}
        for i in range(n, 0, -1):
            keep_i, shift_i, minus_shift_over_sigma_i, std_i, log_det_i = steps[i - 1]
            eps_hat = denoise_at[i](z)
            noise = source.normal(y.shape, torch.float32).double()
            prior_noise = torch.addcmul(torch.addcmul(noise + prior_offset[i - 1], eps_hat, shift_i),
                                        z, minus_shift_over_sigma_i)
            z = torch.addcmul(torch.addcmul(pulled[i - 1], z, keep_i), noise, std_i)
            log_posterior[f"z{i - 1}"] = noise_log_prob(noise, log_det_i)
            log_prior[f"z{i - 1}"] = noise_log_prob(prior_noise, log_det_i)
        log_likelihood = self.coding.log_likelihood(x, z, gammas[0])
        return LogWeights(log_likelihood, log_prior, log_posterior)

    def prior_kl(self, x: Tensor) -> Tensor:
        """KL(q(z_1 | x) || N(0, I)) in closed form, [B]."""
        y = self._signal(x)
        alpha2, sigma2 = alpha_sigma_squared(self.schedule.gamma(torch.ones((), dtype=torch.float64)))
        zeros = torch.zeros_like(y)
        return diagonal_normal_kl(torch.sqrt(alpha2) * y, (torch.log(sigma2) / 2).expand_as(y), zeros, zeros)

    def diffusion_loss_terms(self, x: Tensor, *, samples: int = 1,
                             generator: torch.Generator | None = None) -> DiffusionDraws:
        """Per-draw reconstruction and diffusion parts of the ELBO and its closed-form prior part (differentiable).

        The diffusion draws are unbiased for L_T (time "discrete", T = ``steps``) or L_inf
        (time "continuous"); their times are stratified, t_j = (u + j / S) mod 1 with one
        u ~ U[0, 1) per example (the VDM paper's low-discrepancy sampler, per example),
        which lowers the variance of their mean below that of independent times. The same
        ``generator`` seed gives the same u and noises for every T (common random numbers
        for comparing T).
        """
        y = self._signal(x)
        batch, dim = y.shape
        opts = {"dtype": torch.float64, "device": y.device, "generator": generator}
        offset = torch.rand(batch, **opts)
        strata = torch.arange(samples, dtype=torch.float64, device=y.device)[:, None] / samples
        u = torch.remainder(offset + strata, 1.0)
        t, weight = self.time_mode.time_and_weight(u, self.schedule, self.config.steps)  # [S, B]
        gamma_t = self.schedule.gamma(t)
        alpha2, sigma2 = alpha_sigma_squared(gamma_t)
        eps = torch.randn((samples, batch, dim), **opts)
        z_t = torch.sqrt(alpha2)[..., None] * y + torch.sqrt(sigma2)[..., None] * eps
        eps_hat = self.denoiser(z_t, t, gamma_t)
        diffusion = weight * (eps - eps_hat).pow(2).sum(-1)  # [S, B]

        gamma0 = self.schedule.gamma(torch.zeros((), dtype=torch.float64, device=y.device))
        alpha2_0, sigma2_0 = alpha_sigma_squared(gamma0)
        z0 = torch.sqrt(alpha2_0) * y + torch.sqrt(sigma2_0) * torch.randn((samples, batch, dim), **opts)
        reconstruction = self.coding.log_likelihood(x, z0, gamma0)  # [S, B]
        return DiffusionDraws(reconstruction, self.prior_kl(x), diffusion)

    def draw_nbytes(self, x: Tensor) -> int:
        """Per draw and example, in float64: the two log densities of every step, kept until the
        weights are summed, and their temporaries (4 per step); then, doubled for the allocator,
        the [.., D] temporaries of one step (about 30 between the denoiser and the log densities)
        and the denoiser's activations, which live only during that step. Measured peaks are
        0.4-0.8 of this for the vdm-oracle mixtures and the digits VDM at T = 32."""
        per_row = 30 * x.shape[1] + getattr(self.denoiser, "floats_per_row", x.shape[1])
        return x.shape[0] * 8 * (4 * (self.trajectory_steps + 1) + 2 * per_row)


@register_model("vdm")
def vdm(**config) -> DiffusionModel:
    """Variational Diffusion Model: linear log-SNR schedule, MLP noise predictor, T = 32 discrete steps by default."""
    vdm_config = VDMConfig(**config)
    return DiffusionModel(vdm_config, NoisePredictionMLP(vdm_config))
