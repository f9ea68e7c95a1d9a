"""The closed-form VDM oracle on Gaussian mixtures: bound vs T, its limit, its parts, the single-Gaussian closed form.

Tolerances. Every comparison is of a batch mean over N examples drawn from the
mixture. Comparisons between two settings use common random numbers (the same
generator seed gives the same times and noises) and the standard error of the mean
per-example difference, std(d) / sqrt(N), which is the Monte Carlo standard error
of that mean over examples and draws together. Comparisons with a closed form use
the model's own per-example standard errors, sqrt(sum se_i^2) / N (conservative:
the time draws are stratified). We allow 4 standard errors (a false alarm rate of
about 6e-5 per assertion).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import estimators
from vaes import create_model
from vaes.mixture import get_mixture
from vaes.vdm_oracle import MixtureDenoiser, single_gaussian_elbo_terms

Z = 4.0  # standard errors allowed
STEPS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
DIMS = {"ring-2d": 2, "random-16d": 16, "single-4d": 4}


def _data(mixture: str, n: int, seed: int = 1) -> torch.Tensor:
    return get_mixture(mixture).sample(n, torch.Generator().manual_seed(seed))


def _diffusion_bound(mixture: str, x: torch.Tensor, samples: int = 16, seed: int = 5, **config):
    model = create_model("vdm-oracle", mixture=mixture, data_dim=DIMS[mixture], **config)
    return estimators.diffusion_elbo(model, x, samples=samples, generator=torch.Generator().manual_seed(seed))


def _paired_se(d: torch.Tensor) -> float:
    return float(d.std() / math.sqrt(d.numel()))


def _mean_se(stderr: torch.Tensor) -> float:
    return float(stderr.pow(2).sum().sqrt() / stderr.numel())


def test_registry_shapes_and_finite():
    model = create_model("vdm-oracle", steps=4)
    x = _data("ring-2d", 7).float()
    log_weights = model.log_weights(x, 3)
    assert model.layers == ("z4", "z3", "z2", "z1", "z0")
    assert log_weights.total().shape == (3, 7)
    assert all(torch.isfinite(log_weights.log_prior[name]).all() for name in model.layers)
    assert torch.isfinite(log_weights.total()).all()
    assert torch.allclose(model.exact_log_marginal(x), get_mixture("ring-2d").log_prob(x))


@pytest.mark.parametrize("config, message", [
    (dict(mixture="ring-2d", data_dim=3), "2-dimensional"),
    (dict(mixture="ring-2d", data_dim=2, likelihood="bernoulli"), "real-valued"),
    (dict(mixture="moons", data_dim=2), "choices"),
    (dict(time="sometimes"), "choices: continuous, discrete"),
    (dict(steps=0), "steps"),
])
def test_bad_config_is_one_clear_error(config, message):
    with pytest.raises(ValueError, match=message):
        create_model("vdm-oracle", **config)


@pytest.mark.parametrize("mixture", ["ring-2d", "random-16d"])
def test_bound_non_decreasing_in_T_below_log_p_and_parts_sum(mixture):
    x = _data(mixture, 1500)
    log_p = get_mixture(mixture).log_prob(x)
    previous = None
    for steps in STEPS:
        diffusion_bound = _diffusion_bound(mixture, x, steps=steps)
        terms = diffusion_bound.terms
        assert torch.allclose(diffusion_bound.value, terms["reconstruction"] - terms["prior"] - terms["diffusion"])
        gap = diffusion_bound.value - log_p
        assert gap.mean() <= Z * _mean_se(diffusion_bound.stderr), (steps, float(gap.mean()))
        if previous is not None:
            gain = diffusion_bound.value - previous.value  # bound(2T) - bound(T), same times and noises
            assert gain.mean() >= -Z * _paired_se(gain), (steps, float(gain.mean()))
        previous = diffusion_bound
    limit = _diffusion_bound(mixture, x, time="continuous")
    assert (limit.value - log_p).mean() <= Z * _mean_se(limit.stderr)


def test_continuous_time_is_the_limit_like_one_over_T():
    x = _data("ring-2d", 1500)
    limit = _diffusion_bound("ring-2d", x, time="continuous")
    scaled = []
    for steps in [64, 128, 256, 512, 1024]:
        # L_T - L_inf, paired
        excess = _diffusion_bound("ring-2d", x, steps=steps).terms["diffusion"] - limit.terms["diffusion"]
        assert excess.mean() > Z * _paired_se(excess)  # the discrete loss is above its limit...
        scaled.append(steps * float(excess.mean()))
    # ... by c / T + O(1/T^2): T * (L_T - L_inf) settles (measured: 110.6, 105.7, 103.8, 102.0, 101.4)
    assert max(scaled) / min(scaled) < 1.15, scaled
    assert abs(scaled[-1] - scaled[-2]) / scaled[-1] < 0.03, scaled


def test_single_gaussian_matches_closed_form():
    mixture = get_mixture("single-4d")
    x = _data("single-4d", 1500)
    log_p = mixture.log_prob(x)
    for config in [dict(steps=1), dict(steps=4), dict(steps=32), dict(steps=1024), dict(time="continuous")]:
        model = create_model("vdm-oracle", mixture="single-4d", data_dim=4, **config)
        diffusion_bound = estimators.diffusion_elbo(model, x, samples=16, generator=torch.Generator().manual_seed(3))
        steps = model.trajectory_steps
        gammas = model.schedule.gamma(torch.arange(steps + 1, dtype=torch.float64) / steps)
        exact = single_gaussian_elbo_terms(mixture.means[0], mixture.stds[0] ** 2, x, gammas)
        diffusion = exact["diffusion_continuous" if "time" in config else "diffusion_discrete"]
        exact_elbo = exact["reconstruction"] - exact["prior"] - diffusion
        assert torch.allclose(diffusion_bound.terms["prior"], exact["prior"])
        # gap log p(x) - bound, estimated vs closed form
        error = (log_p - diffusion_bound.value).mean() - (log_p - exact_elbo).mean()
        assert abs(error) <= Z * _mean_se(diffusion_bound.stderr), (config, float(error))
        reconstruction_error = diffusion_bound.terms["reconstruction"].mean() - exact["reconstruction"].mean()
        assert abs(reconstruction_error) <= Z * _mean_se(diffusion_bound.terms["reconstruction_stderr"])


def test_single_gaussian_closed_form_is_monotone_with_its_limit():
    """The population closed form (a = v, i.e. averaged over x) is an upper Riemann sum in SNR: exact checks."""
    mixture = get_mixture("single-4d")
    model = create_model("vdm-oracle", mixture="single-4d", data_dim=4)
    mean, variance = mixture.means[0], mixture.stds[0] ** 2
    at_mean_distance = (mean + mixture.stds[0])[None]  # (x - m)^2 = v: the population average of the formula
    losses = []
    for steps in [2 ** j for j in range(17)]:
        gammas = model.schedule.gamma(torch.arange(steps + 1, dtype=torch.float64) / steps)
        terms = single_gaussian_elbo_terms(mean, variance, at_mean_distance, gammas)
        losses.append(float(terms["diffusion_discrete"]))
    limit = float(terms["diffusion_continuous"])
    assert all(a > b for a, b in itertools.pairwise(losses))
    assert all(b > limit for b in losses)
    assert losses[-1] - limit < 1e-3 * limit
    # with a = v, L_inf = 1/2 sum_d log((1 + SNR(0) v) / (1 + SNR(1) v)) exactly
    snr0, snr1 = math.exp(13.3), math.exp(-5.0)
    expected = 0.5 * float(torch.log((1 + snr0 * variance) / (1 + snr1 * variance)).sum())
    assert limit == pytest.approx(expected, rel=1e-12)


def test_continuous_bound_depends_on_schedule_end_points_only():
    x = _data("ring-2d", 1500)
    linear = _diffusion_bound("ring-2d", x, time="continuous", schedule="linear")
    cosine = _diffusion_bound("ring-2d", x, time="continuous", schedule="cosine", seed=6)
    difference = float((linear.value - cosine.value).mean())
    assert abs(difference) <= Z * math.hypot(_mean_se(linear.stderr), _mean_se(cosine.stderr)), difference
    # the discrete loss does depend on the schedule's shape
    discrete = [_diffusion_bound("ring-2d", x, steps=4, schedule=name).value.mean() for name in ("linear", "cosine")]
    assert abs(discrete[0] - discrete[1]) > 10


def test_loss_terms_agree_with_log_weights_elbo_and_iwae_is_tighter():
    # A narrow schedule keeps the weights' variance small at T = 2.
    config = dict(steps=2, gamma_min=-6.0, gamma_max=2.0)
    model = create_model("vdm-oracle", **config)
    x = _data("ring-2d", 200).float()
    from_weights = estimators.elbo(model, x, samples=1000)
    diffusion_bound = estimators.diffusion_elbo(model, x, samples=1000)
    tolerance = Z * math.hypot(from_weights.mean_stderr(), _mean_se(diffusion_bound.stderr))
    assert abs(from_weights.mean() - float(diffusion_bound.value.mean())) <= tolerance
    bound = estimators.iwae(model, x, k=64)
    log_p = float(model.exact_log_marginal(x).mean())
    assert from_weights.mean() < bound.mean() <= log_p + Z * bound.mean_stderr()


def test_iwae_with_default_schedule_stays_below_log_p():
    """E_data[IWAE_K] <= E_data[log p_T(x)] <= E_data[log p(x)] (Gibbs): a wrong reverse-step mean breaks it.

    With 32 steps the weights are heavy-tailed (log w spreads over ~20 nats), so a
    p(z_s | z_t) whose mean moved the wrong way would push IWAE far above log p(x).
    The tolerance is 4 standard errors of the batch mean of IWAE - log p over examples.
    """
    model = create_model("vdm-oracle")
    x = _data("ring-2d", 32, seed=3).float()
    excess = estimators.iwae(model, x, k=200).value - model.exact_log_marginal(x)
    assert excess.mean() <= Z * _paired_se(excess), float(excess.mean())


def test_mixture_denoiser_is_the_posterior_mean_of_the_noise():
    """E[eps | z_t] from the formula vs a self-normalized Monte Carlo average over joint draws near z_t."""
    mixture = get_mixture("ring-2d")
    denoiser = MixtureDenoiser(mixture)
    gamma = torch.tensor(0.0, dtype=torch.float64)  # alpha^2 = sigma^2 = 1/2
    gen = torch.Generator().manual_seed(2)
    x = mixture.sample(400_000, gen)
    eps = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    z = math.sqrt(0.5) * (x + eps)
    # E[eps | z] is linear in the conditional law; a regression on a fine bin around one point estimates it
    point = torch.tensor([1.0, 0.3], dtype=torch.float64)
    near = (z - point).norm(dim=-1) < 0.03
    estimate = eps[near].mean(0)
    se = eps[near].std(0) / math.sqrt(int(near.sum()))
    exact = denoiser(point[None], gamma[None], gamma[None])[0]
    # the bin's width adds a bias of order (radius^2) times the curvature; 0.02 covers it
    assert ((estimate - exact).abs() <= Z * se + 0.02).all(), (estimate, exact, se)


@pytest.mark.parametrize("mixture", sorted(DIMS))
def test_mixture_denoiser_at_one_time_equals_the_per_row_formula(mixture):
    """A trajectory step asks for every row at one gamma, answered by matrix products (``at_times``); rows
    of different gammas take the per-component formula. Both are the same function: float64 rounding
    apart (1e-11)."""
    denoiser = MixtureDenoiser(get_mixture(mixture))
    z = 2 * torch.randn(64, 3, DIMS[mixture], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    gammas = torch.tensor([-9.0, -1.0, 0.0, 2.5, 8.0], dtype=torch.float64)
    for gamma, at_one_time in zip(gammas, denoiser.at_times(torch.linspace(0, 1, 5), gammas), strict=True):
        per_row = denoiser(z, torch.zeros(64, 3), gamma.expand(64, 3))
        assert per_row.abs().max() > 0.1  # a comparison of numbers, not of zeros
        assert torch.allclose(at_one_time(z), per_row, rtol=0, atol=1e-11)
