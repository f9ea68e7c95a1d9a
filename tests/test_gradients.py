"""Gradient estimators (reparam, STL, DReG), the importance-weighted objectives and gradient_snr.

Oracle: Rainforth et al.'s Gaussian toy (vaes.gaussian_toy), whose ELBO gradient is closed form.
Every comparison of a mean gradient is per parameter within 4 standard errors, the error of a
mean of R independent gradient draws being sd / sqrt(R) (for a difference of two independent
means, the root sum of squares). All draws are seeded.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import estimators as E
from bench.plan.fits import prepare
from bench.plan.keys import SuiteError
from bench.plan.suite import load_suite, parse_suite
from estimators.gradients import objective_value
from reports.gradient_plots import snr_slope
from vaes import create_model
from vaes.base import MissingCapability, Objective, as_objective, config_hash

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy(perturbation: float = 0.1, batch: int = 4):
    torch.manual_seed(1)
    model = create_model("gaussian-toy", perturbation=perturbation)
    from vaes.gaussian_toy import true_prior_mean
    x = (true_prior_mean(20) + math.sqrt(2) * torch.randn(batch, 20, dtype=torch.float64)).float()
    return model, x


def _draws(model, x, *, estimator: str, k: int, reps: int, objective: str = "iwae", **kw) -> E.GradientSNR:
    return E.gradient_snr(model, x, objective=objective, estimator=estimator, k=k, reps=reps, **kw)


def _z_scores(a: E.GradientSNR, b: E.GradientSNR, names) -> np.ndarray:
    """Per-number z of the difference of two independent mean gradients."""
    return np.concatenate([((a.mean[n] - b.mean[n]) / (a.stderr[n].pow(2) + b.stderr[n].pow(2)).sqrt()).flatten()
                           for n in names])


@pytest.mark.parametrize("estimator", ["reparam", "stl"])
def test_elbo_gradient_matches_the_closed_form_at_k1(estimator):
    model, x = _toy()
    draws = _draws(model, x, estimator=estimator, k=1, reps=4000)
    exact = model.elbo_gradients(x)
    for name, value in exact.items():
        z = ((draws.mean[name] - value.double()) / draws.stderr[name]).abs()
        assert float(z.max()) < 4, (name, float(z.max()))
    # STL drops a score term of mean zero but not of variance zero: the inference network's noise is lower.
    if estimator == "stl":
        reparam = _draws(model, x, estimator="reparam", k=1, reps=4000)
        assert float(draws.stderr["proj"].mean()) < 0.7 * float(reparam.stderr["proj"].mean())


@pytest.mark.parametrize("k", [2, 8, 64])
def test_dreg_is_unbiased_for_the_iwae_gradient(k):
    model, x = _toy()
    torch.manual_seed(2)
    dreg = _draws(model, x, estimator="dreg", k=k, reps=2000)
    reparam = _draws(model, x, estimator="reparam", k=k, reps=2000)
    z = _z_scores(dreg, reparam, dreg.mean)
    assert np.abs(z).max() < 4, np.abs(z).max()


def test_stl_is_biased_for_iwae_at_k_above_1():
    """STL at K = 8 against the reparameterized IWAE gradient on the inference network's 420 numbers: the sum
    of squared z is chi-square with 420 degrees of freedom (mean 420, sd sqrt(840) = 29) if STL were unbiased.
    Measured (seeded): sum z^2 = 84,030, so (sum z^2 - 420) / 29 = 2,885; per number the median |z| is 8.3 and
    the largest 62.5."""
    model, x = _toy()
    torch.manual_seed(3)
    stl = _draws(model, x, estimator="stl", k=8, reps=2000)
    reparam = _draws(model, x, estimator="reparam", k=8, reps=2000)
    z = _z_scores(stl, reparam, ["proj", "shift"])
    excess = (np.sum(z**2) - z.size) / math.sqrt(2 * z.size)
    assert excess > 50, excess
    # The generative network's gradient is the same estimator under both: no difference there.
    assert np.abs(_z_scores(stl, reparam, ["prior_mean"])).max() < 4


def test_dreg_is_unbiased_on_a_nonlinear_bernoulli_vae():
    """The surrogate's hook through an MLP decoder and its Bernoulli likelihood: E[DReG] = E[reparam] at K = 8."""
    torch.manual_seed(4)
    model = create_model("vae", data_dim=6, latent_dim=2, hidden=[8])
    x = (torch.rand(5, 6) > 0.5).float()
    dreg = _draws(model, x, estimator="dreg", k=8, reps=3000)
    reparam = _draws(model, x, estimator="reparam", k=8, reps=3000)
    z = _z_scores(dreg, reparam, dreg.mean)
    assert np.abs(z).max() < 4.5, np.abs(z).max()  # 4.5: 180 numbers, the largest of 180 |z| exceeds 4 at 1%


@pytest.mark.slow
def test_snr_slopes_on_the_toy():
    """Rainforth et al.'s Theorem 1 on their toy (64 examples, perturbation 0.01, 1,000 draws per K, ~60 s).

    Measured (seed 0): reparam inference -0.43 (root-mean-square SNR with the 1/R floor removed; the plain mean
    SNR gives -0.36, held up by its floor of 0.8 / sqrt(R) ~ 0.025), generative +0.50; DReG inference +0.38.
    With R = 10,000 draws (floor 0.008; 14 minutes, so not here) the plain mean SNR gives -0.48, the floor-free
    one -0.50 and the DSNR -0.48: the floor, not the estimator, flattens the plain mean at R = 1,000."""
    torch.manual_seed(0)
    model = create_model("gaussian-toy", perturbation=0.01)
    from vaes.gaussian_toy import true_prior_mean
    x = (true_prior_mean(20) + math.sqrt(2) * torch.randn(64, 20, dtype=torch.float64)).float()
    ks = np.array([4, 16, 64, 256])
    reparam = [_draws(model, x, estimator="reparam", k=int(k), reps=1000) for k in ks]
    dreg = [_draws(model, x, estimator="dreg", k=int(k), reps=1000) for k in ks]
    inference = snr_slope(ks, np.array([r.inference.snr_rms for r in reparam]))
    generative = snr_slope(ks, np.array([r.generative.snr for r in reparam]))
    dreg_inference = snr_slope(ks, np.array([r.inference.snr for r in dreg]))
    assert abs(inference + 0.5) <= 0.1, inference
    assert abs(generative - 0.5) <= 0.1, generative
    assert dreg_inference >= 0, dreg_inference


def test_objective_values_on_given_log_weights():
    log_w = torch.randn(12, 3, dtype=torch.float64) * 3
    lme = lambda a, dim: torch.logsumexp(a, dim) - math.log(a.shape[dim])
    iwae = lme(log_w, 0)
    miwae = lme(log_w.view(3, 4, 3), 1).mean(0)
    torch.testing.assert_close(objective_value(log_w, Objective("iwae", k=12)), iwae)
    torch.testing.assert_close(objective_value(log_w, Objective("miwae", k=4, m=3)), miwae)
    torch.testing.assert_close(objective_value(log_w, Objective("piwae", k=4, m=3)), iwae)
    torch.testing.assert_close(objective_value(log_w, Objective("ciwae", k=12, beta=0.25)),
                               0.25 * log_w.mean(0) + 0.75 * iwae)


@pytest.mark.parametrize("objective", [Objective("iwae", k=8, estimator="dreg"), Objective("miwae", k=4, m=2),
                                       Objective("piwae", k=4, m=2, estimator="dreg"),
                                       Objective("ciwae", k=8, beta=0.5, estimator="stl")])
@pytest.mark.parametrize("name", ["vae", "hvae", "linear-gaussian", "gaussian-toy"])
def test_every_objective_trains_every_family(name, objective):
    """Value finite, shape [B], and every parameter of a posterior-declaring family receives a gradient."""
    small = {"vae": dict(data_dim=6, latent_dim=2, hidden=[8]),
             "hvae": dict(data_dim=6, n_layers=2, latent_dims=[3, 2], hidden=[8]),
             "linear-gaussian": dict(data_dim=6, latent_dim=2), "gaussian-toy": dict(data_dim=6)}[name]
    model = create_model(name, **small)
    x = (torch.rand(3, 6) > 0.5).float()
    surrogate = E.training_objective(model, x, objective)
    assert surrogate.shape == (3,) and bool(torch.isfinite(surrogate).all())
    surrogate.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, missing


def test_hvae_detached_posterior_keeps_the_path_through_z():
    torch.manual_seed(5)
    model = create_model("hvae", data_dim=6, n_layers=3, latent_dims=[3, 2, 2], hidden=[8])
    x = (torch.rand(2, 6) > 0.5).float()
    posterior = model.posterior(x)
    z = {name: t.detach().requires_grad_() for name, t in posterior.rsample(4).items()}
    attached = torch.autograd.grad(posterior.log_prob(z).sum(), list(z.values()))
    detached = posterior.detached().log_prob(z)
    assert detached.grad_fn is not None
    for a, d in zip(attached, torch.autograd.grad(detached.sum(), list(z.values()), retain_graph=True)):
        torch.testing.assert_close(a, d)
    assert all(g is None for g in torch.autograd.grad(detached.sum(), list(model.up.parameters()), allow_unused=True))


def test_inference_and_generative_parameters_split_each_family():
    for name in ("vae", "hvae", "linear-gaussian", "gaussian-toy"):
        model = create_model(name, data_dim=6) if name != "hvae" else create_model(name, data_dim=6, hidden=[8])
        inference, generative = model.inference_parameters(), model.generative_parameters()
        assert inference and generative and not set(inference) & set(generative)
        assert set(inference) | set(generative) == {n for n, _ in model.named_parameters()}


def test_new_objective_fields_leave_old_config_hashes_alone():
    plain = config_hash(Objective("iwae", k=5))
    assert plain == config_hash(Objective("iwae", k=5, m=1, estimator="reparam"))
    assert plain != config_hash(Objective("iwae", k=5, estimator="dreg"))


@pytest.mark.parametrize("settings, message", [
    (dict(name="iwae", k=0), "objective k must be an integer >= 1, got 0"),
    (dict(name="miwae", k=4, m=0), "objective m must be an integer >= 1, got 0"),
    (dict(name="ciwae", beta=1.5), "objective 'ciwae' needs beta in [0, 1]"),
    (dict(name="iwae", estimator="vimco"), "unknown objective estimator 'vimco'; choices: dreg, reparam, stl"),
])
def test_bad_objective_settings_fail_in_one_line(settings, message):
    with pytest.raises(ValueError) as info:
        Objective(**settings)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_settings_an_objective_would_ignore_are_refused():
    with pytest.raises(ValueError, match="objective 'iwae' takes no m"):
        E.check_objective(Objective("iwae", k=4, m=2))
    with pytest.raises(ValueError, match="objective 'elbo' has no gradient estimator choice"):
        E.check_objective(Objective("elbo", estimator="dreg"))


def test_dreg_of_a_model_without_posterior_is_one_clear_error():
    from gaussian_toy import GaussianToy  # the tests' toy: log_weights only, no capabilities
    model = GaussianToy(torch.zeros(4), 0.5)
    with pytest.raises(MissingCapability) as info:
        E.training_objective(model, torch.zeros(2, 4), Objective("iwae", k=4, estimator="dreg"))
    assert str(info.value) == ("objective 'iwae' with estimator 'dreg' needs a model with 'posterior'; "
                               "GaussianToy declares none")
    with pytest.raises(MissingCapability, match="gradient_snr needs a model with 'posterior'"):
        E.gradient_snr(model, torch.zeros(2, 4), k=2, reps=2)


def _suite(objective: dict, model: str = "vae") -> dict:
    return {"datasets": ["digits"], "train": {"steps": 1},
            "models": [{"name": model, "config": {"latent_dim": 2, "hidden": [8], "objective": objective}}],
            "estimators": [{"name": "elbo"}]}


@pytest.mark.parametrize("objective, message", [
    ({"name": "renyi"}, "models[0].config.objective.name names an unknown objective 'renyi'; choices:"),
    ({"name": "iwae", "k": 4, "estimator": "dreg2"}, "unknown objective estimator 'dreg2'"),
    ({"name": "miwae", "k": 0, "m": 2}, "objective k must be an integer >= 1, got 0"),
    ({"name": "ciwae", "k": 4, "beta": -0.5}, "objective beta must be a number >= 0"),
    ({"name": "ciwae", "k": 4, "beta": 2.0}, "objective 'ciwae' needs beta in [0, 1]"),
    ({"name": "iwae", "k": 4, "samples": 2}, "models[0].config.objective.samples is not a known key"),
])
def test_a_bad_objective_table_is_a_suite_error(objective, message):
    with pytest.raises(SuiteError) as info:
        prepare(parse_suite(_suite(objective), source="t.toml", default_name="t", label="t.toml"))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_dreg_on_a_diffusion_model_is_a_suite_error():
    contents = {"datasets": ["digits"], "train": {"steps": 1}, "estimators": [{"name": "elbo"}],
                "models": [{"name": "vdm", "config": {"hidden": [8], "objective": {"name": "iwae", "k": 2,
                                                                                  "estimator": "dreg"}}}]}
    with pytest.raises(SuiteError, match=r"models\[0\]\.config\.objective cannot be trained on this model: "
                                         r"objective 'iwae' with estimator 'dreg' needs a model with 'posterior'"):
        prepare(parse_suite(contents, source="t.toml", default_name="t", label="t.toml"))


def test_the_gradients_suite_prepares():
    plan = prepare(load_suite("gradients"))
    estimators = {cell.estimator for fit in plan.fits for cell in fit.cells}
    assert "gradient_snr" in estimators
    ks = {cell.k for fit in plan.fits for cell in fit.cells if cell.estimator == "gradient_snr"}
    assert ks == {1, 4, 16, 64, 256}


def test_the_toy_data_set_has_the_toy_model_s_exact_density():
    from bench.data import load_dataset
    data = load_dataset("gaussian-toy", seed=0)
    model = create_model("gaussian-toy", perturbation=0.0).double()
    x = data.test[:50].double()
    torch.testing.assert_close(data.exact_log_density(x), model.exact_log_marginal(x).detach())
    # The data's mean is the model's mu (2000 draws: standard error sqrt(2 / 2000) = 0.03 per coordinate).
    assert float((data.train.double().mean(0) - model.prior_mean.detach()).abs().max()) < 4 * math.sqrt(2 / 2000)


def test_snr_summaries_of_known_gradient_draws():
    """The summaries on draws of a known law: g = (3 + e_0, e_1, ..., e_4), e iid N(0, 1), R = 20,000.

    Per parameter the SNR is 3 for the first and 0 for the others, whose |mean| / sd is the noise floor
    |N(0, 1)| / sqrt(R) (mean sqrt(2 / pi) / sqrt(R)); the floor-free root mean square is sqrt(9 / 5). Along
    u = (1, 0, ...): DSNR = 3 / 1. Rainforth et al.'s ratio E[|3 + e_0| / chi_4] = E|3 + e_0| E[1 / chi_4] with
    E|3 + e_0| = 3 (1 - 2 Phi(-3)) + 2 phi(3) and E[1 / chi_4] = Gamma(3/2) / (sqrt(2) Gamma(2)). Tolerances:
    4 standard errors of each statistic over R draws (sd of the ratio from E[ratio^2] = 10 / 2), plus the
    error of u estimated from the same draws (1 / sqrt(R) in angle, second order in these statistics)."""
    from scipy import stats

    from estimators.snr import _network_snr

    reps = 20_000
    draws = torch.randn(reps, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    draws[:, 0] += 3.0
    result = _network_snr([draws[:, :2], draws[:, 2:]])  # two parameter tensors of one network
    floor = math.sqrt(2 / math.pi) / math.sqrt(reps)
    se_snr = math.sqrt((1 + 9 / 2) / reps)  # delta method: sd of mean / sd at SNR 3
    assert abs(result.snr - (3 + 4 * floor) / 5) <= 4 * (se_snr / 5 + floor), result.snr
    assert abs(result.snr_rms - math.sqrt(9 / 5)) <= 4 * se_snr, result.snr_rms
    assert abs(result.dsnr - 3.0) <= 4 * se_snr, result.dsnr
    folded = 3 * (1 - 2 * stats.norm.cdf(-3)) + 2 * stats.norm.pdf(3)
    expected = folded * math.gamma(1.5) / (math.sqrt(2) * math.gamma(2))
    sd_ratio = math.sqrt(10 / 2 - expected**2)
    assert abs(result.dsnr_ratio - expected) <= 4 * sd_ratio / math.sqrt(reps), (result.dsnr_ratio, expected)
    assert result.parameters == 5


# Rainforth et al. (2018), Table 1: every objective at M x K = 64 draws per example.
TABLE_1 = {
    "vae (64 x 1)": Objective("miwae", m=64, k=1),
    "iwae (1 x 64)": Objective("iwae", k=64),
    "miwae (8 x 8)": Objective("miwae", m=8, k=8),
    "piwae (8 x 8)": Objective("piwae", m=8, k=8),
    "ciwae (0.5)": Objective("ciwae", k=64, beta=0.5),
    "iwae-dreg (1 x 64)": Objective("iwae", k=64, estimator="dreg"),
}


def test_the_objectives_suite_is_rainforths_table_1(mnist_dir):
    suite = load_suite("objectives")
    plan = prepare(suite, data_dir=mnist_dir)
    trained = {fit.model.label: as_objective(fit.model_config["objective"]) for fit in plan.fits}
    assert trained == TABLE_1
    # the IWAE paper's 784-200-200-50 network: no size overridden
    assert all(fit.model_config.get("hidden") is None and fit.model.name == "vae" for fit in plan.fits)
    cells = {(cell.estimator, cell.k) for cell in plan.fits[0].cells}
    assert cells == {("train", None), ("elbo", 64), ("iwae", 64), ("log_marginal", 5000), ("ais", None)}
