"""AIS and BDMC against closed forms: the HMC kernel, importance sampling as the one-step case, exact
log p(x) on a linear Gaussian and a Gaussian-mixture latent model, the BDMC sandwich, and bad input.

Tolerances: an AIS value's error is judged against its own standard error (mean over B examples,
stderr sqrt(sum se_i^2) / B). At 3 SE a correct estimator fails a check about 0.3% of the time,
and every test is seeded, so a failure is a change, not noise.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import estimators as E
import vaes
from estimators.ais import linear_schedule, sigmoid_schedule
from estimators.hmc import HMCState, hmc_transition, leapfrog
from vaes.base import (
    LOG_JOINT,
    POSTERIOR,
    SAMPLE_JOINT,
    LatentVariableModel,
    MissingCapability,
)
from vaes.latents import DiagonalGaussianPosterior
from vaes.linear_gaussian import posterior_linear_map

SMALL_MODELS = {
    "vae": {"data_dim": 40, "latent_dim": 5, "hidden": (16,)},
    "iwae": {"data_dim": 40, "latent_dim": 5, "hidden": (16,)},
    "beta-vae": {"data_dim": 40, "latent_dim": 5, "hidden": (16,), "likelihood": "gaussian"},
    "hvae": {"data_dim": 40, "latent_dims": (5, 3), "hidden": ((16,), (8,))},
    "linear-gaussian": {},
    "mixture-latent": {},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # AIS runs many small tensor operations


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear_gaussian(sigma: float = 0.5) -> vaes.linear_gaussian.LinearGaussian:
    """d = 20, q = 5, with an amortized q(z | x): the exact posterior's mean shifted by one posterior
    standard deviation and its scale doubled, so q is a poor but usable start."""
    torch.manual_seed(1)
    model = vaes.create_model("linear-gaussian", data_dim=20, latent_dim=5).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(20, 5, dtype=torch.float64))
        model.mu.copy_(torch.randn(20, dtype=torch.float64))
        model.log_sigma.fill_(math.log(sigma))
        mean_map, scale_tril = posterior_linear_map(model)
        std = torch.diagonal(scale_tril)
        model.encoder.proj.copy_(mean_map)
        model.encoder.shift.copy_(std)
        model.encoder.log_std.copy_(torch.log(2 * std))
    return model


class MixtureLatentModel(LatentVariableModel):
    """A 2-d latent with a three-component Gaussian-mixture prior, x | z ~ N(A z, sigma^2 I_3):

        p(x) = sum_c w_c N(x; A m_c, s_c^2 A A^T + sigma^2 I)     (closed form)

    The posterior is multimodal where the components overlap. q(z | x) = N(0, 2.5^2 I), broad.
    """

    layers = ("z",)
    capabilities = frozenset({LOG_JOINT, SAMPLE_JOINT, POSTERIOR})

    def __init__(self):
        super().__init__()
        f64 = torch.float64
        self.register_buffer("log_w", torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=f64)))
        self.register_buffer("means", torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], dtype=f64))
        self.register_buffer("stds", torch.tensor([0.6, 0.8, 0.5], dtype=f64))
        self.register_buffer("a", torch.tensor([[1.0, 0.5], [-0.3, 1.0], [0.8, -0.6]], dtype=f64))
        self.sigma = 0.5

    def log_prior(self, z):
        z = z["z"][..., None, :]  # [*S, B, 1, 2] against the components
        scaled = (z - self.means) / self.stds[:, None]
        per = -0.5 * scaled.pow(2).sum(-1) - 2 * torch.log(self.stds) - math.log(2 * math.pi)
        return torch.logsumexp(per + self.log_w, -1)

    def log_joint(self, x, z):
        residual = x - z["z"] @ self.a.T
        log_norm = 3 * (math.log(self.sigma) + 0.5 * math.log(2 * math.pi))
        log_lik = -0.5 * (residual.pow(2).sum(-1) / self.sigma**2) - log_norm
        return self.log_prior(z) + log_lik

    def sample_prior(self, n, batch, *, generator=None):
        component = torch.multinomial(self.log_w.exp(), n * batch, replacement=True, generator=generator)
        noise = torch.randn(n * batch, 2, dtype=torch.float64, generator=generator)
        z = self.means[component] + self.stds[component, None] * noise
        return {"z": z.view(n, batch, 2)}

    def sample_joint(self, n, *, generator=None):
        z = self.sample_prior(n, 1, generator=generator)["z"][:, 0]
        noise = torch.randn(n, 3, dtype=torch.float64, generator=generator)
        return z @ self.a.T + self.sigma * noise, {"z": z}

    def posterior(self, x):
        zeros = torch.zeros(x.shape[0], 2, dtype=torch.float64)
        return DiagonalGaussianPosterior("z", zeros, zeros + math.log(2.5))

    def exact_log_marginal(self, x):
        covs = self.stds[:, None, None] ** 2 * (self.a @ self.a.T) + self.sigma**2 * torch.eye(3, dtype=torch.float64)
        components = torch.distributions.MultivariateNormal(self.means @ self.a.T, covs)
        return torch.logsumexp(components.log_prob(x[:, None, :]) + self.log_w, -1)


ORACLES = {"linear-gaussian": linear_gaussian, "mixture": MixtureLatentModel}


# --- the one-step case is importance sampling -------------------------------------------------------

@pytest.mark.parametrize("name", ["vae", "hvae", "linear-gaussian"])
def test_one_step_from_the_posterior_is_iwae_on_the_same_draws(name):
    model = vaes.create_model(name, **SMALL_MODELS[name]).double()
    x, _ = model.sample_joint(7, generator=generator(1))
    torch.manual_seed(5)
    bound = E.iwae(model, x, k=64)
    torch.manual_seed(5)
    annealed = E.ais(model, x, steps=1, chains=64, init="posterior")
    torch.testing.assert_close(annealed.value, bound.value, rtol=0, atol=1e-10)
    torch.testing.assert_close(annealed.terms["ess"], bound.terms["ess"], rtol=1e-10, atol=0)
    assert "acceptance" not in annealed.terms  # one step has no transitions
    assert annealed.method == "ais"


# --- the capabilities agree with log_weights ----------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_log_joint_minus_log_q_is_the_log_weight(name):
    model = vaes.create_model(name, **SMALL_MODELS[name]).double()
    assert {LOG_JOINT, SAMPLE_JOINT, POSTERIOR} <= model.capabilities
    x, z = model.sample_joint(6, generator=generator(1))
    assert x.shape == (6, model.config.data_dim) and all(z[name].shape[0] == 6 for name in model.layers)
    torch.manual_seed(3)
    log_weights = model.log_weights(x, 4)
    torch.manual_seed(3)
    draws = model.posterior(x).rsample(4)
    total = model.log_joint(x, draws) - model.posterior(x).log_prob(draws)
    torch.testing.assert_close(total, log_weights.total(), rtol=0, atol=1e-10)
    torch.testing.assert_close(model.log_prior(draws), sum(log_weights.log_prior.values()), rtol=0, atol=1e-10)
    prior = model.sample_prior(3, 6, generator=generator(2))
    assert [prior[name].shape[:2] for name in model.layers] == [(3, 6)] * len(model.layers)


@pytest.mark.parametrize("name", ["vdm", "vdm-oracle"])
def test_diffusion_models_do_not_declare_the_ais_capabilities(name):
    model = vaes.create_model(name)
    assert not {LOG_JOINT, SAMPLE_JOINT, POSTERIOR} & model.capabilities
    with pytest.raises(MissingCapability, match="ais needs a model with 'log_joint'"):
        E.ais(model, torch.zeros(2, model.config.data_dim), steps=2, chains=2)


# --- the HMC kernel ---------------------------------------------------------------------------------

COV = torch.tensor([[1.0, 0.8, 0.2], [0.8, 1.5, -0.3], [0.2, -0.3, 0.5]], dtype=torch.float64)
MEAN = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
PRECISION = torch.linalg.inv(COV)


def gaussian_target(z: torch.Tensor) -> HMCState:
    """log N(z; MEAN, COV) up to a constant, as the single part of an HMC target."""
    centered = z - MEAN
    grad = -centered @ PRECISION
    return HMCState(z, (0.5 * (centered * grad).sum(-1))[None], grad[None])


def test_hmc_leaves_a_correlated_gaussian_invariant():
    n = 4000
    start = MEAN + torch.randn(n, 1, 3, dtype=torch.float64, generator=generator(0)) @ torch.linalg.cholesky(COV).T
    state, one = gaussian_target(start), torch.ones(1, dtype=torch.float64)
    # Large enough steps that leapfrog's energy error is real (acceptance ~0.8): without the
    # Metropolis test the chains would drift away from N(MEAN, COV).
    step = torch.full((n, 1), 0.45, dtype=torch.float64)
    acceptance = []
    for _ in range(30):
        state, accept_prob = hmc_transition(state, one, step, 5, gaussian_target, generator(len(acceptance) + 1))
        acceptance.append(float(accept_prob.mean()))
    assert 0.5 < sum(acceptance) / len(acceptance) < 0.95
    z = state.z[:, 0]
    # Each chain's final state is an exact draw if the kernel is invariant; the n chains are independent.
    # SE of a mean: sqrt(COV_ii / n); of a covariance entry: sqrt((COV_ii COV_jj + COV_ij^2) / n).
    mean_se = torch.sqrt(torch.diagonal(COV) / n)
    assert float(((z.mean(0) - MEAN) / mean_se).abs().max()) < 4
    cov_se = torch.sqrt((torch.outer(torch.diagonal(COV), torch.diagonal(COV)) + COV**2) / n)
    assert float(((torch.cov(z.T) - COV) / cov_se).abs().max()) < 4


def test_a_tiny_step_is_accepted_almost_always():
    start = torch.randn(500, 2, 3, dtype=torch.float64, generator=generator(0))
    step = torch.full((500, 2), 1e-4, dtype=torch.float64)
    _, accept_prob = hmc_transition(gaussian_target(start), torch.ones(1, dtype=torch.float64), step, 10,
                                    gaussian_target, generator(1))
    # The energy error of leapfrog is O(step^2) per unit time: ~1e-8 here.
    assert float(accept_prob.min()) > 1 - 1e-6


def test_a_reversed_leapfrog_trajectory_returns_to_its_start():
    start = torch.randn(50, 4, 3, dtype=torch.float64, generator=generator(0))
    momentum = torch.randn(50, 4, 3, dtype=torch.float64, generator=generator(1))
    step = torch.rand(50, 4, dtype=torch.float64, generator=generator(2)) * 0.5 + 0.1
    one = torch.ones(1, dtype=torch.float64)
    end, end_momentum = leapfrog(gaussian_target(start), momentum, step, 20, one, gaussian_target)
    assert float((end.z - start).abs().max()) > 0.1  # it went somewhere
    back, back_momentum = leapfrog(end, -end_momentum, step, 20, one, gaussian_target)
    torch.testing.assert_close(back.z, start, rtol=0, atol=1e-10)
    torch.testing.assert_close(-back_momentum, momentum, rtol=0, atol=1e-10)


# --- schedules --------------------------------------------------------------------------------------

def test_schedules_run_from_zero_to_one_increasing():
    for schedule in (sigmoid_schedule, linear_schedule):
        for steps in (1, 2, 10, 1000):
            betas = schedule(steps)
            assert betas.shape == (steps + 1,) and float(betas[0]) == 0.0 and float(betas[-1]) == 1.0
            assert bool((betas.diff() > 0).all())
    betas = sigmoid_schedule(1000)  # Wu et al.: dense at both ends, sigmoid(-4 + 8 t) rescaled
    torch.testing.assert_close(betas[500], torch.tensor(0.5, dtype=torch.float64))
    assert float(betas[1] - betas[0]) < 0.1 * float(betas[501] - betas[500])


# --- exact log p(x) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("oracle", sorted(ORACLES))
@pytest.mark.parametrize("init", ["prior", "posterior"])
@pytest.mark.parametrize("schedule", ["sigmoid", "linear"])
def test_ais_matches_the_exact_log_marginal(oracle, init, schedule):
    model = ORACLES[oracle]()
    x, _ = model.sample_joint(30, generator=generator(1))
    exact = model.exact_log_marginal(x).detach()
    estimate = E.ais(model, x, steps=100, chains=8, init=init, schedule=schedule, generator=generator(2))
    error = estimate.value - exact
    assert abs(float(error.mean())) < 3 * estimate.mean_stderr(), (float(error.mean()), estimate.mean_stderr())
    # Per example: an honest error bar covers the truth at 3 SE for (nearly) every one of the 30; the
    # error bar is an upper estimate, so it covers more often than a Gaussian 99.7%, not less.
    assert int((error.abs() < 3 * estimate.stderr).sum()) >= 27
    assert 0.5 < float(estimate.terms["acceptance"].mean()) < 0.85  # tuned toward 0.65
    assert estimate.terms["ess"].shape == estimate.terms["log_weight_var"].shape == (30,)


def test_values_do_not_depend_on_the_chunk_of_examples():
    model = linear_gaussian()
    x, _ = model.sample_joint(10, generator=generator(1))
    whole = E.ais(model, x, steps=20, chains=4, generator=generator(2))
    chunked = E.ais(model, x, steps=20, chains=4, chunk=3, generator=generator(2))
    torch.testing.assert_close(chunked.value, whole.value, rtol=0, atol=1e-9)


def test_log_marginal_method_ais_is_ais():
    model = linear_gaussian()
    x, _ = model.sample_joint(5, generator=generator(1))
    via = E.log_marginal(model, x, method="ais", steps=10, chains=4, generator=generator(2))
    direct = E.ais(model, x, steps=10, chains=4, generator=generator(2))
    assert via.method == "ais"
    torch.testing.assert_close(via.value, direct.value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="AIS settings leapfrog given to log-marginal method 'iwae'"):
        E.log_marginal(model, x, method="iwae", k=5, leapfrog=3)


# --- BDMC -------------------------------------------------------------------------------------------

def paired_gap_drop(results: dict[int, E.BDMCResult], fewer: int, more: int) -> tuple[float, float]:
    """Mean over examples of gap(fewer steps) - gap(more steps) on the same simulated x, and its standard
    error from the spread of the per-example differences (which includes each run's Monte Carlo error)."""
    drop = (results[fewer].gap - results[more].gap).detach()
    return float(drop.mean()), float(drop.std() / math.sqrt(drop.numel()))


@pytest.mark.parametrize("oracle", sorted(ORACLES))
def test_bdmc_brackets_the_exact_log_marginal_and_its_gap_falls_with_steps(oracle):
    model = ORACLES[oracle]()
    # The same generator seed simulates the same 50 examples at every number of steps.
    results = {steps: E.bdmc(model, 50, steps=steps, chains=16, generator=generator(3)) for steps in (10, 100)}
    for result in results.values():
        exact = float(model.exact_log_marginal(result.x).detach().mean())
        lower, upper = result.lower, result.upper
        assert lower.method == "ais" and upper.method == "reverse-ais"
        assert lower.mean() - 3 * lower.mean_stderr() <= exact <= upper.mean() + 3 * upper.mean_stderr()
    torch.testing.assert_close(results[10].x, results[100].x, rtol=0, atol=0)
    drop, se = paired_gap_drop(results, 10, 100)
    assert drop > 3 * se, (drop, se)


@pytest.mark.slow
def test_bdmc_gap_at_1000_steps_is_below_that_at_100():
    model = linear_gaussian()
    results = {steps: E.bdmc(model, 30, steps=steps, chains=8, generator=generator(3)) for steps in (100, 1000)}
    drop, se = paired_gap_drop(results, 100, 1000)
    assert drop > 3 * se, (drop, se)
    assert results[1000].mean_gap() < 0.25
    exact = float(model.exact_log_marginal(results[1000].x).detach().mean())
    lower = results[1000].lower
    assert abs(lower.mean() - exact) < 3 * lower.mean_stderr()


@pytest.mark.slow  # 4 s: the default tier keeps the oracle sandwiches above
def test_bdmc_on_a_small_hvae_sandwiches_a_common_value():
    """No closed form here: the two bounds must meet (within SE) once AIS has converged, which they
    cannot if sample_joint's z were not an exact posterior draw of its x under log_joint."""
    torch.manual_seed(0)
    model = vaes.create_model("hvae", **SMALL_MODELS["hvae"]).double()
    result = E.bdmc(model, 10, steps=200, chains=4, leapfrog=5, generator=generator(1))
    se = math.hypot(result.lower.mean_stderr(), result.upper.mean_stderr())
    assert -3 * se < result.mean_gap() < max(3 * se, 0.05), (result.mean_gap(), se)


# --- trained digits models: AIS against IWAE-5000 ----------------------------------------------------

def binarized_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits at threshold 0.5 (64 binary pixels): 1,500 training rows, the rest test."""
    from sklearn.datasets import load_digits

    data = torch.from_numpy(load_digits().data / 16.0 > 0.5).float()
    order = torch.randperm(len(data), generator=generator(0))
    return data[order[:1500]], data[order[1500:]]


def trained(name: str, config: dict, train: torch.Tensor) -> LatentVariableModel:
    """1,500 Adam steps on the model's own objective, batches of 100: a few seconds, a usable model."""
    torch.manual_seed(0)
    model = vaes.create_model(name, data_dim=64, **config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = generator(1)
    for _ in range(1500):
        batch = train[torch.randint(len(train), (100,), generator=order)]
        loss = -E.training_objective(model, batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name, config", [
    ("vae", {"latent_dim": 8, "hidden": (64,)}),
    ("hvae", {"latent_dims": (8, 4), "hidden": ((64,), (32,))}),
])
def test_ais_on_trained_digits_models_is_at_least_iwae_5000(name, config):
    train, test = binarized_digits()
    model = trained(name, config, train)
    steps, chains = 200, 16
    sandwich = E.bdmc(model, 50, steps=steps, chains=chains, generator=generator(2))
    assert sandwich.mean_gap() < 0.5, sandwich.mean_gap()  # converged enough to be a reference
    x = test[:50]
    annealed = E.ais(model, x, steps=steps, chains=chains, generator=generator(3))
    torch.manual_seed(4)
    bound = E.iwae(model, x, k=5000)
    difference = annealed.mean() - bound.mean()
    se = math.hypot(annealed.mean_stderr(), bound.mean_stderr())
    print(f"{name}: AIS - IWAE-5000 = {difference:.3f} +- {se:.3f} nats; BDMC gap {sandwich.mean_gap():.3f}")
    assert difference > -3 * se, (difference, se)


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    ({"steps": 0}, "AIS steps must be an integer >= 1, got 0"),
    ({"chains": 0}, "AIS chains must be an integer >= 1, got 0"),
    ({"leapfrog": 0}, "AIS leapfrog must be an integer >= 1, got 0"),
    ({"steps": 2.5}, "AIS steps must be an integer >= 1, got 2.5"),
    ({"schedule": "cosine"}, "unknown AIS schedule 'cosine'; choices: sigmoid, linear"),
    ({"init": "encoder"}, "unknown AIS init 'encoder'; choices: prior, posterior"),
    ({"step_size": -0.1}, "AIS step_size must be a positive number, got -0.1"),
    ({"chunk": 0}, "AIS chunk must be an integer >= 1 examples, got 0"),
])
def test_bad_settings_give_one_clear_error(settings, message):
    model = linear_gaussian()
    x = torch.zeros(3, 20, dtype=torch.float64)
    full = {"steps": 5, "chains": 2, **settings}
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        E.ais(model, x, **full)
    if "chunk" not in settings:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            E.bdmc(model, 3, **full)


def test_bdmc_needs_at_least_one_example():
    with pytest.raises(ValueError, match="bdmc needs n >= 1 simulated examples, got 0"):
        E.bdmc(linear_gaussian(), 0, steps=2, chains=2)


def test_a_non_finite_log_joint_is_named():
    class Broken(MixtureLatentModel):
        def log_joint(self, x, z):
            return super().log_joint(x, z) * torch.nan

    with pytest.raises(ValueError, match=r"Broken log_joint is not finite at 8 of 8 starting draws"):
        E.ais(Broken(), torch.zeros(2, 3, dtype=torch.float64), steps=3, chains=2)


def test_missing_capabilities_are_named():
    class PriorOnly(MixtureLatentModel):
        capabilities = frozenset({LOG_JOINT})

    model, x = PriorOnly(), torch.zeros(2, 3, dtype=torch.float64)
    assert E.ais(model, x, steps=2, chains=2).value.shape == (2,)
    with pytest.raises(MissingCapability, match="ais with init 'posterior' needs a model with 'posterior'"):
        E.ais(model, x, steps=2, chains=2, init="posterior")
    with pytest.raises(MissingCapability, match="bdmc needs a model with 'sample_joint'; PriorOnly declares log_joint"):
        E.bdmc(model, 2, steps=2, chains=2)
