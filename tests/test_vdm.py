"""The learned VDM: protocol basics, gradients, discrete vs continuous loss, closed forms with a known denoiser.

Tolerances as in test_vdm_oracle.py: 4 standard errors of a batch mean, paired
(common random numbers, std of per-example differences / sqrt(N)) when two
settings are compared, the model's own per-example standard errors
(sqrt(sum se_i^2) / N) when compared with a closed form.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import estimators
from vaes import Objective, create_model
from vaes.mixture import get_mixture
from vaes.vdm import VDMConfig
from vaes.vdm_oracle import MixtureDenoiser, single_gaussian_elbo_terms

Z = 4.0


def _binary(n: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand(d, generator=gen)
    return (torch.rand(n, d, generator=gen) < probs).float()


def _random_network(model) -> None:
    """Replace the zero-initialized output layer so eps_hat depends on z and t."""
    with torch.no_grad():
        torch.nn.init.normal_(model.denoiser.net[-1].weight, std=0.3)
        torch.nn.init.normal_(model.denoiser.net[-1].bias, std=0.3)


def _paired_se(d: torch.Tensor) -> float:
    return float(d.std() / math.sqrt(d.numel()))


def _mean_se(stderr: torch.Tensor) -> float:
    return float(stderr.pow(2).sum().sqrt() / stderr.numel())


@pytest.mark.parametrize("likelihood, data", [("bernoulli", _binary(5, 64)), ("gaussian", torch.randn(5, 64))])
@pytest.mark.parametrize("time", ["discrete", "continuous"])
def test_defaults_log_weights_shapes_finite_and_backward(likelihood, data, time):
    model = create_model("vdm", data_dim=64, likelihood=likelihood, time=time, hidden=(32,))
    _random_network(model)
    log_weights = model.log_weights(data, 3)
    assert len(model.layers) == 33 and model.layers[0] == "z32" and model.layers[-1] == "z0"
    assert log_weights.total().shape == (3, 5)
    assert torch.isfinite(log_weights.total()).all()
    estimators.training_objective(model, data).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.schedule.ends.grad.abs().min() > 0  # the end points are learned through the ELBO


def test_a_trajectory_step_is_the_network_at_one_time():
    """``at_times`` folds the time features into the first layer's bias; it is the network itself (float32
    rounding apart) at every time, and training through log_weights reaches the time columns through it."""
    model = create_model("vdm", data_dim=8, likelihood="bernoulli", hidden=(16, 16))
    _random_network(model)
    times = torch.linspace(0, 1, 5, dtype=torch.float64)
    gammas = model.schedule.gamma(times)
    z = torch.randn(3, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for t, gamma, at_one_time in zip(times, gammas, model.denoiser.at_times(times, gammas), strict=True):
        expected = model.denoiser(z, t.expand(3, 4), gamma.expand(3, 4))
        assert expected.std() > 0.1
        assert torch.allclose(at_one_time(z), expected, rtol=0, atol=1e-5)
    estimators.training_objective(model, _binary(6, 8), Objective("elbo", k=2)).mean().backward()
    time_columns = model.denoiser.net[0].weight.grad[:, 8:]
    assert time_columns.abs().min() > 0 and torch.isfinite(time_columns).all()
    assert model.schedule.ends.grad.abs().min() > 0


def test_loss_terms_backward_and_fixed_end_points():
    model = create_model("vdm", data_dim=8, likelihood="bernoulli", learn_endpoints=False, hidden=(16,))
    assert "ends" not in dict(model.named_parameters())
    estimators.training_objective(model, _binary(6, 8), Objective("diffusion", k=2)).mean().backward()
    assert model.denoiser.net[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("config, message", [
    ({"time": "discrete-ish"}, "unknown time"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"likelihood": "poisson"}, "unknown likelihood"),
    ({"schedule": "quadratic"}, "unknown noise schedule"),
    ({"gamma_min": 1.0, "gamma_max": 0.0}, "gamma_min < gamma_max"),
])
def test_bad_config_is_one_clear_error(config, message):
    with pytest.raises(ValueError, match=message):
        create_model("vdm", **config)


def test_config_hash_separates_time_and_steps():
    hashes = {create_model("vdm", data_dim=4, **c).config_hash() for c in
              [{"time": "discrete", "steps": 8}, {"time": "discrete", "steps": 16}, {"time": "continuous"}]}
    assert len(hashes) == 3
    assert VDMConfig(hidden=[8, 8]) == VDMConfig(hidden=(8, 8))


def test_discrete_loss_log_weights_agree_for_a_network():
    model = create_model("vdm", data_dim=6, likelihood="bernoulli", steps=3, gamma_min=-6.0, gamma_max=2.0,
                         hidden=(32,))
    _random_network(model)
    x = _binary(100, 6)
    with torch.no_grad():
        diffusion_bound = estimators.diffusion_elbo(model, x, samples=2000)
    from_weights = estimators.elbo(model, x, samples=2000)
    tolerance = Z * math.hypot(from_weights.mean_stderr(), _mean_se(diffusion_bound.stderr))
    assert abs(from_weights.mean() - float(diffusion_bound.value.mean())) <= tolerance
    reconstruction = float(diffusion_bound.terms["reconstruction"].mean())
    assert from_weights.terms["reconstruction"].mean() == pytest.approx(reconstruction, abs=0.05)


def _diffusion_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Per-example diffusion loss with common random numbers (the same generator seed for every T)."""
    with torch.no_grad():
        bound = estimators.diffusion_elbo(model, x, samples=8, generator=torch.Generator().manual_seed(4))
        return bound.terms["diffusion"]


def _assert_doubling_never_hurts(model_at, x: torch.Tensor, steps_grid: list[int]) -> torch.Tensor:
    """L_2T <= L_T within Z paired standard errors along the grid; returns the loss at the last T."""
    previous = None
    for steps in steps_grid:
        loss = _diffusion_loss(model_at(steps), x)
        if previous is not None:
            gain = previous - loss
            assert gain.mean() >= -Z * _paired_se(gain), steps
        previous = loss
    return previous


def test_doubling_steps_never_hurts_with_the_optimal_denoiser_plugged_in():
    """A 'vdm' whose network is swapped for the closed-form denoiser of its (ring) data: L_2T <= L_T, paired."""
    mixture = get_mixture("ring-2d")
    x = mixture.sample(1500, torch.Generator().manual_seed(1))

    def model_at(steps: int):
        model = create_model("vdm", data_dim=2, likelihood="gaussian", steps=steps)
        model.denoiser = MixtureDenoiser(mixture)
        return model

    _assert_doubling_never_hurts(model_at, x, [1, 2, 4, 8, 16, 32, 64, 128])


def test_continuous_loss_is_the_limit_of_the_discrete_one_for_a_network():
    model_kw = {"data_dim": 10, "likelihood": "bernoulli", "hidden": (32,)}
    continuous = create_model("vdm", time="continuous", **model_kw)
    _random_network(continuous)
    x = _binary(500, 10)
    state = continuous.state_dict()

    def loss(**config):
        model = create_model("vdm", **model_kw, **config)
        model.load_state_dict(state)
        with torch.no_grad():
            bound = estimators.diffusion_elbo(model, x, samples=8, generator=torch.Generator().manual_seed(7))
            return bound.terms["diffusion"]

    limit = loss(time="continuous")
    errors = []
    for steps in [16, 64, 256, 1024]:
        excess = loss(steps=steps) - limit
        errors.append(float(excess.mean().abs()))
    assert errors[-1] <= Z * _paired_se(loss(steps=1024) - limit) + 0.01 * float(limit.mean())
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-2] / errors[-1] > 2.5  # shrinks like 1/T (a factor 4 per factor 4 in T)


@pytest.mark.parametrize("config", [{"steps": 8}, {"steps": 128}, {"time": "continuous"}])
def test_gaussian_data_with_its_optimal_denoiser_matches_the_analytic_elbo(config):
    mixture = get_mixture("single-4d")
    x = mixture.sample(1500, torch.Generator().manual_seed(2))
    model = create_model("vdm", data_dim=4, likelihood="gaussian", gamma_min=-10.0, gamma_max=6.0, **config)
    model.denoiser = MixtureDenoiser(mixture)
    with torch.no_grad():
        diffusion_bound = estimators.diffusion_elbo(model, x, samples=16, generator=torch.Generator().manual_seed(3))
    n = model.trajectory_steps
    gammas = torch.linspace(-10.0, 6.0, n + 1, dtype=torch.float64)
    exact = single_gaussian_elbo_terms(mixture.means[0], mixture.stds[0] ** 2, x, gammas)
    diffusion = exact["diffusion_continuous" if "time" in config else "diffusion_discrete"]
    exact_elbo = (exact["reconstruction"] - exact["prior"] - diffusion).mean()
    assert abs(float(diffusion_bound.value.mean() - exact_elbo)) <= Z * _mean_se(diffusion_bound.stderr)


def test_doubling_steps_never_hurts_for_a_trained_network():
    """A 'vdm' trained briefly (continuous time, its diffusion loss) on ring data: L_2T <= L_T, paired."""
    mixture = get_mixture("ring-2d")
    train = mixture.sample(2000, torch.Generator().manual_seed(2)).float()
    torch.manual_seed(0)
    model = create_model("vdm", data_dim=2, likelihood="gaussian", time="continuous", hidden=(64, 64))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        batch = train[torch.randint(0, train.shape[0], (128,))]
        loss = -estimators.training_objective(model, batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = model.state_dict()
    x = mixture.sample(1500, torch.Generator().manual_seed(3)).float()

    def model_at(steps: int):
        discrete = create_model("vdm", data_dim=2, likelihood="gaussian", steps=steps, hidden=(64, 64))
        discrete.load_state_dict(state)
        return discrete

    trained = _assert_doubling_never_hurts(model_at, x, [1, 2, 4, 8, 16, 32, 64])
    # Training did something: the trained network beats its own initialisation's loss by a wide margin.
    untrained = _diffusion_loss(create_model("vdm", data_dim=2, likelihood="gaussian", steps=64, hidden=(64, 64)), x)
    assert float(untrained.mean() - trained.mean()) > 1.0


@pytest.mark.parametrize("config, expected", [
    ({"time": "continuous"}, ("log_weights_steps",)),
    ({"time": "discrete", "steps": 8}, ()),  # L_T is trained: T is part of training
    ({"time": "continuous", "objective": {"name": "iwae", "k": 2}}, ()),  # trained through log_weights
])
def test_evaluation_only_fields_are_those_training_never_reads(config, expected):
    assert create_model("vdm", data_dim=4, **config).config.evaluation_only_fields() == expected
    assert create_model("vdm-oracle", time=config["time"]).config.evaluation_only_fields() == (
        ("log_weights_steps",) if config["time"] == "continuous" else ())


def test_one_continuous_time_state_serves_every_T():
    """The network takes t itself: the state has the same keys and shapes at every T and loads into each."""
    kw = {"data_dim": 6, "likelihood": "bernoulli", "time": "continuous", "hidden": (16,)}
    trained = create_model("vdm", **kw, log_weights_steps=32)
    _random_network(trained)
    shapes = {name: t.shape for name, t in trained.state_dict().items()}
    x = _binary(50, 6)
    limits = []
    for steps in [1, 2, 64]:
        model = create_model("vdm", **kw, log_weights_steps=steps)
        assert {name: t.shape for name, t in model.state_dict().items()} == shapes
        model.load_state_dict(trained.state_dict())
        assert len(model.layers) == steps + 1 and model.trajectory_steps == steps
        with torch.no_grad():  # the training loss (L_inf) does not see log_weights_steps at all
            generator = torch.Generator().manual_seed(1)
            limits.append(estimators.diffusion_elbo(model, x, samples=4, generator=generator).value)
    assert all(torch.equal(limits[0], other) for other in limits[1:])
