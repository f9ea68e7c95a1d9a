"""Oracle tests on the linear Gaussian model, whose log p(x), posterior and ML fit are closed form."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

import estimators as E
import vaes
from vaes.linear_gaussian import LinearGaussian, posterior_linear_map

D, Q, B = 20, 5, 64


def random_model(encoder: str, seed: int = 1) -> LinearGaussian:
    torch.manual_seed(seed)
    model = vaes.create_model("linear-gaussian", data_dim=D, latent_dim=Q, encoder=encoder).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(D, Q, dtype=torch.float64))
        model.mu.copy_(torch.randn(D, dtype=torch.float64))
        model.log_sigma.fill_(math.log(0.7))
    return model


def data_from(model: LinearGaussian, n: int = B, seed: int = 2) -> torch.Tensor:
    return model.sample(n, torch.Generator().manual_seed(seed))


def wrong_encoder_model() -> LinearGaussian:
    """An amortized encoder with the true posterior's mean map, shifted by 0.8 posterior
    standard deviations per latent dimension, and a diagonal covariance (the true one
    is not diagonal). Wrong enough that the ELBO is ~1.5 nats loose, mild enough that
    the importance weights have ESS ~ 200 at K = 5000, so IWAE visibly converges.
    """
    model = random_model("amortized")
    mean_map, scale_tril = posterior_linear_map(model)
    std = torch.diagonal(scale_tril)
    signs = torch.tensor([1.0, -1.0] * Q, dtype=torch.float64)[:Q]
    with torch.no_grad():
        model.encoder.proj.copy_(mean_map)
        model.encoder.shift.copy_(0.8 * std * signs)
        model.encoder.log_std.copy_(torch.log(std))
    return model


def test_exact_log_marginal_matches_scipy():
    model = random_model("exact")
    x = data_from(model)
    cov = (model.weight @ model.weight.T + model.sigma2 * torch.eye(D, dtype=torch.float64)).detach().numpy()
    expected = multivariate_normal(mean=model.mu.detach().numpy(), cov=cov).logpdf(x.numpy())
    got = model.exact_log_marginal(x).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("k", [1, 7, 1000])
def test_exact_posterior_makes_every_bound_log_px(k):
    model = random_model("exact")
    x = data_from(model)
    exact = model.exact_log_marginal(x).detach()
    # With q = p(z | x) every log weight is log p(x), so the bounds are exact with zero spread.
    bound = E.iwae(model, x, k=k)
    torch.testing.assert_close(bound.value, exact, rtol=0, atol=1e-6)
    elbo = E.elbo(model, x, samples=k, analytic_kl=False)
    torch.testing.assert_close(elbo.value, exact, rtol=0, atol=1e-6)
    if k > 1:
        assert float(bound.stderr.max()) < 1e-6
        assert float(elbo.stderr.max()) < 1e-6
        torch.testing.assert_close(bound.terms["ess"], torch.full_like(exact, float(k)), rtol=1e-6, atol=0)


def test_exact_posterior_elbo_with_closed_form_kl_is_unbiased():
    # With the closed-form KL only the reconstruction term is Monte Carlo, so the
    # value scatters around log p(x): check the batch mean within 4 standard errors.
    model = random_model("exact")
    x = data_from(model)
    exact = float(model.exact_log_marginal(x).detach().mean())
    est = E.elbo(model, x, samples=200, analytic_kl=True)
    assert abs(est.mean() - exact) < 4 * est.mean_stderr()
    assert est.mean_stderr() < 0.05  # the check above is informative, not vacuous


@pytest.mark.slow  # 4 s
def test_wrong_encoder_bounds_are_ordered_and_converge():
    model = wrong_encoder_model()
    x = data_from(model, n=2048)
    exact = float(model.exact_log_marginal(x).detach().mean())
    torch.manual_seed(3)
    elbo = E.elbo(model, x, samples=100, analytic_kl=False)
    iwae10 = E.iwae(model, x, k=10)
    iwae1000 = E.iwae(model, x, k=1000)
    iwae5000 = E.iwae(model, x, k=5000)

    def separated(lower: E.Estimate, upper_mean: float, upper_se: float = 0.0) -> None:
        gap = upper_mean - lower.mean()
        se = math.hypot(lower.mean_stderr(), upper_se)
        assert gap > 4 * se, (gap, se)

    separated(elbo, iwae10.mean(), iwae10.mean_stderr())
    separated(iwae10, iwae1000.mean(), iwae1000.mean_stderr())
    separated(iwae1000, exact)
    assert abs(iwae5000.mean() - exact) < max(3 * iwae5000.mean_stderr(), 0.05)
    # The encoder is wrong enough that the test means something: the ELBO is off by > 1 nat.
    assert exact - elbo.mean() > 1.0


def test_iwae_with_one_sample_is_the_elbo_on_the_same_draws():
    model = wrong_encoder_model()
    x = data_from(model)
    torch.manual_seed(11)
    elbo = E.elbo(model, x, samples=1, analytic_kl=False)
    torch.manual_seed(11)
    iwae1 = E.iwae(model, x, k=1)
    torch.testing.assert_close(iwae1.value, elbo.value, rtol=0, atol=1e-12)
    assert elbo.stderr is None and iwae1.stderr is None  # one draw cannot give a spread


def test_closed_form_kl_matches_monte_carlo_kl():
    model = wrong_encoder_model()
    x = data_from(model, n=8)
    closed = E.kl_terms(model, x, method="analytic")["z"]
    mc = E.kl_terms(model, x, samples=100_000, method="mc")["z"]
    z = (mc.value - closed.value) / mc.stderr
    assert float(z.abs().max()) < 4, z


def test_ml_fit_is_the_maximum_of_the_likelihood():
    truth = random_model("exact")
    data = data_from(truth, n=4000, seed=5)
    fitted = random_model("amortized", seed=9).fit_maximum_likelihood(data)
    best = float(fitted.exact_log_marginal(data).detach().mean())
    # The fit beats the generating parameters on its own data, and any small perturbation of it.
    assert best > float(truth.exact_log_marginal(data).detach().mean())
    for param in (fitted.weight, fitted.mu, fitted.log_sigma):
        with torch.no_grad():
            saved = param.clone()
            param.add_(1e-2 * torch.randn_like(param))
            assert float(fitted.exact_log_marginal(data).detach().mean()) < best
            param.copy_(saved)
    # The ML gradient vanishes there.
    fitted.zero_grad()
    fitted.exact_log_marginal(data).mean().backward()
    for param in (fitted.weight, fitted.mu, fitted.log_sigma):
        assert float(param.grad.abs().max()) < 1e-8
    # At the ML solution the amortized (diagonal) encoder is the exact posterior: IWAE = ELBO = log p(x).
    x = data[:32]
    torch.testing.assert_close(E.iwae(fitted, x, k=50).value, fitted.exact_log_marginal(x).detach(), rtol=0, atol=1e-6)


def closed_form_elbo(model: LinearGaussian, x: torch.Tensor) -> torch.Tensor:
    """E_q[log p(x | z)] - KL for the amortized encoder, in closed form, [B].

    E_q |x - W z - mu|^2 = |x - W m - mu|^2 + tr(W S W^T) with S = diag(s^2).
    """
    mean, scale_tril = model.encode(x)
    cov = scale_tril @ scale_tril.T
    residual = x - mean @ model.weight.T - model.mu
    expected_sq = residual.pow(2).sum(-1) + torch.trace(model.weight @ cov @ model.weight.T)
    recon = -0.5 * (expected_sq / model.sigma2 + D * (math.log(2 * math.pi) + 2 * model.log_sigma))
    return recon - model.analytic_kl(x)["z"]


def test_elbo_value_matches_closed_form():
    model = wrong_encoder_model()
    x = data_from(model)
    exact = float(closed_form_elbo(model, x).detach().mean())
    est = E.elbo(model, x, samples=2000, analytic_kl=False)
    assert abs(est.mean() - exact) < 4 * est.mean_stderr()


def test_elbo_objective_gradient_matches_closed_form():
    """The reparameterized ELBO surrogate's gradient is unbiased for the closed-form gradient."""
    model = wrong_encoder_model()
    x = data_from(model, n=16)
    params = [model.encoder.proj, model.encoder.shift, model.encoder.log_std, model.weight]

    def flat_grad(value: torch.Tensor) -> torch.Tensor:
        return torch.cat([g.flatten() for g in torch.autograd.grad(value, params)])

    exact = flat_grad(closed_form_elbo(model, x).mean())
    objective = vaes.Objective("elbo", k=500)
    # Without the closed-form KL the surrogate is fully Monte Carlo: switch it off through a wrapper.
    model.analytic_kl = lambda x: None  # type: ignore[method-assign]
    draws = torch.stack([flat_grad(E.training_objective(model, x, objective).mean()) for _ in range(40)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    z = (mean - exact) / (se + 1e-12)
    assert float(z.abs().max()) < 5, float(z.abs().max())  # 5 SE over ~120 coordinates
    assert float(exact.abs().max()) > 1.0  # the gradient is not trivially zero
