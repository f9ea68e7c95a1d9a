"""The registry, and the invariants every registered model must hold (parametrized over the whole zoo)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import estimators as E
import vaes
from vaes import registry
from vaes.base import (
    CAPABILITIES,
    DIFFUSION_TERMS,
    LOG_JOINT,
    OUTPUT_BIAS,
    POSTERIOR,
    SAMPLE_JOINT,
    DiffusionDraws,
    MissingCapability,
    ModelStructure,
)

ALL_MODELS = vaes.list_models()


def test_unknown_model_names_the_known_ones():
    with pytest.raises(vaes.UnknownModelError) as info:
        vaes.create_model("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message
    for name in ALL_MODELS:
        assert name in message


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="'vae' is already registered"):
        vaes.register_model("vae")(lambda **c: None)


def test_register_create_and_describe():
    @vaes.register_model("test-tiny-vae", description="a tiny VAE for this test")
    def tiny(**config):
        return vaes.create_model("vae", data_dim=4, latent_dim=2, hidden=(3,), **config)

    try:
        model = vaes.create_model("test-tiny-vae")
        assert model.config.latent_dim == 2
        assert "test-tiny-vae" in vaes.list_models()
        assert vaes.model_descriptions()["test-tiny-vae"] == "a tiny VAE for this test"
    finally:
        vaes.unregister_model("test-tiny-vae")
    assert "test-tiny-vae" not in vaes.list_models()


def test_models_from_entry_points_are_registered(monkeypatch):
    def load():
        vaes.register_model("plugin-vae")(lambda **c: vaes.create_model("vae", **c))

    fake = SimpleNamespace(load=load, value="plugin_pkg.models")
    monkeypatch.setattr(registry, "entry_points", lambda group: [fake] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    try:
        assert "plugin-vae" in vaes.list_models()
        assert vaes.create_model("plugin-vae", data_dim=10).config.data_dim == 10
    finally:
        vaes.unregister_model("plugin-vae")


def test_config_hash_is_stable_and_sensitive():
    a = vaes.create_model("vae", data_dim=64).config_hash()
    assert a == vaes.create_model("vae", data_dim=64).config_hash()
    assert a != vaes.create_model("vae", data_dim=64, latent_dim=10).config_hash()
    assert a != vaes.create_model("iwae", data_dim=64).config_hash()  # the objective is part of the identity
    assert vaes.create_model("iwae", k=5).config_hash() != vaes.create_model("iwae", k=50).config_hash()


def test_descriptions_are_one_line():
    for name, line in vaes.model_descriptions().items():
        assert line and "\n" not in line, name


# --- every registered model ---------------------------------------------------------------------

def tiny_batch(model: vaes.LatentVariableModel, n: int) -> torch.Tensor:
    """Data of the kind the model's config declares: binary for Bernoulli, real otherwise.

    A model of a known data distribution (the VDM oracle's mixture) gets draws from it:
    its exact log p(x) is that density, which bounds the ELBO only on average over it.
    """
    config = model.config
    if hasattr(model, "mixture"):
        return model.mixture.sample(n, torch.Generator().manual_seed(0)).float()
    shape = (n, config.data_dim)
    if getattr(config, "likelihood", "gaussian") == "bernoulli":
        return (torch.rand(shape) > 0.5).float()
    return torch.randn(shape)


@pytest.fixture(params=ALL_MODELS)
def model(request) -> vaes.LatentVariableModel:
    return vaes.create_model(request.param)


def test_log_weights_shapes_finite_and_differentiable(model):
    x = tiny_batch(model, 3)
    log_weights = model.log_weights(x, 4)
    assert set(log_weights.layers) == set(model.layers) and len(model.layers) >= 1
    total = log_weights.total()
    assert total.shape == (4, 3)
    for tensor in (log_weights.log_likelihood, *log_weights.log_prior.values(), *log_weights.log_posterior.values()):
        assert tensor.shape == (4, 3)
        assert bool(torch.isfinite(tensor).all())
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable:
        total.sum().backward()
        grads = [p.grad for p in trainable if p.grad is not None]
        assert grads, "no parameter received a gradient"
        assert all(bool(torch.isfinite(g).all()) for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def test_iwae_one_is_the_elbo_on_the_same_draws(model):
    x = tiny_batch(model, 5)
    torch.manual_seed(4)
    elbo = E.elbo(model, x, samples=1, analytic_kl=False)
    torch.manual_seed(4)
    iwae = E.iwae(model, x, k=1)
    torch.testing.assert_close(iwae.value, elbo.value, rtol=0, atol=1e-5)


def test_elbo_is_below_iwae(model):
    # Paired on the same examples: IWAE_50 - ELBO has expectation >= 0. The
    # difference is tested against 4 Monte Carlo standard errors of the two means.
    x = tiny_batch(model, 16)
    elbo = E.elbo(model, x, samples=50)
    iwae = E.iwae(model, x, k=50)
    se = math.hypot(elbo.mean_stderr(), iwae.mean_stderr() or 0.0)
    assert iwae.mean() - elbo.mean() > -4 * se, (iwae.mean(), elbo.mean(), se)


def test_bounds_are_below_the_exact_log_marginal(model):
    x = tiny_batch(model, 16)
    with torch.no_grad():
        exact = model.exact_log_marginal(x)
    if exact is None:
        pytest.skip(f"{type(model).__name__} has no exact log p(x)")
    iwae = E.iwae(model, x, k=50)
    assert float(exact.mean()) - iwae.mean() > -4 * iwae.mean_stderr()


def test_kl_terms_cover_every_layer_and_sum_to_the_elbo_kl(model):
    x = tiny_batch(model, 6)
    kls = E.kl_terms(model, x, samples=20)
    assert set(kls) == set(model.layers)
    for estimate in kls.values():
        assert estimate.value.shape == (6,) and bool(torch.isfinite(estimate.value).all())


# --- declared structure and capabilities ----------------------------------------------------------

# Besides each model's defaults, settings that change what the structure must say.
STRUCTURE_VARIANTS = [
    *((name, {}) for name in ALL_MODELS),
    ("hvae", {"n_layers": 3, "latent_dims": 2, "hidden": (4,), "data_dim": 6}),
    ("vdm", {"time": "continuous", "log_weights_steps": 3, "data_dim": 5, "hidden": (8,)}),
    ("vdm", {"steps": 4, "data_dim": 5, "likelihood": "gaussian", "hidden": (8,)}),
    ("vdm-oracle", {"mixture": "random-16d", "data_dim": 16, "steps": 2}),
    ("vae", {"data_dim": 7, "latent_dim": 2, "hidden": (3,), "likelihood": "gaussian"}),
]


@pytest.mark.parametrize("name, config", STRUCTURE_VARIANTS)
def test_structure_agrees_with_the_config_and_the_layers(name, config):
    model = vaes.create_model(name, **config)
    structure = model.structure()
    assert isinstance(structure, ModelStructure)
    assert structure.data_dim == model.config.data_dim
    assert structure.latent_layers == len(model.layers)
    assert structure.likelihood == model.config.likelihood
    time = getattr(model.config, "time", None)  # only diffusion models have a time
    assert structure.continuous_time == (time == "continuous")
    assert structure.diffusion_steps == (model.config.steps if time == "discrete" else None)
    x = tiny_batch(model, 2)  # data of the declared size is what log_weights takes
    assert model.log_weights(x, 1).total().shape == (1, 2)


def _use_log_joint(model, x):
    z = model.sample_prior(3, x.shape[0])
    assert set(z) == set(model.layers) and all(z[name].shape[:2] == (3, x.shape[0]) for name in model.layers)
    return model.log_joint(x, z)  # [3, B]


def _use_sample_joint(model, x):
    data, z = model.sample_joint(3)
    assert data.shape == (3, model.structure().data_dim)
    assert set(z) == set(model.layers) and all(z[name].shape[0] == 3 for name in model.layers)
    return torch.cat([data.flatten(), *(layer.flatten() for layer in z.values())])


def _use_posterior(model, x):
    q = model.posterior(x)
    z = q.rsample(3)
    assert set(z) == set(model.layers) and all(z[name].shape[:2] == (3, x.shape[0]) for name in model.layers)
    return q.log_prob(z)  # [3, B]


def _use_diffusion_terms(model, x):
    draws = model.diffusion_loss_terms(x, samples=3)
    assert isinstance(draws, DiffusionDraws)
    assert draws.reconstruction.shape == draws.diffusion.shape == (3, x.shape[0])
    assert draws.prior.shape == (x.shape[0],)
    return torch.cat([draws.reconstruction, draws.diffusion, draws.prior[None]])


def _use_output_bias(model, x):
    model.set_output_bias(x.float().mean(0).clamp(0.01, 0.99))
    return model.log_weights(x, 3).total()  # [3, B]


# Each capability, exercised through every method it promises; each returns a tensor that must be finite.
USE_CAPABILITY = {
    LOG_JOINT: _use_log_joint,
    SAMPLE_JOINT: _use_sample_joint,
    POSTERIOR: _use_posterior,
    DIFFUSION_TERMS: _use_diffusion_terms,
    OUTPUT_BIAS: _use_output_bias,
}


def test_every_capability_has_a_check():
    assert set(USE_CAPABILITY) == set(CAPABILITIES)


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_declared_capabilities_work_and_the_others_are_missing(model, capability):
    x = tiny_batch(model, 4)
    if model.supports(capability):
        with torch.no_grad():
            assert bool(torch.isfinite(USE_CAPABILITY[capability](model, x)).all())
        model.require(capability, "this test")  # does not raise
        return
    with pytest.raises(MissingCapability):
        USE_CAPABILITY[capability](model, x)
    with pytest.raises(MissingCapability, match=f"this test needs a model with '{capability}'"):
        model.require(capability, "this test")


def test_a_capability_that_does_not_exist_is_named(model):
    with pytest.raises(ValueError, match="unknown capability 'telepathy'; choices: diffusion_terms, log_joint"):
        model.supports("telepathy")


def test_posterior_and_log_joint_give_the_elbo_of_log_weights(model):
    # Where a model declares both, log_joint(x, z) - log q(z | x) at draws of q is a log weight, so its mean
    # over S draws and the estimators' ELBO (same model, other draws) differ by noise: within 4 standard
    # errors of the difference of the two batch means (independent draws, errors added in quadrature).
    if not (model.supports(POSTERIOR) and model.supports(LOG_JOINT)):
        pytest.skip(f"{type(model).__name__} does not declare both posterior and log_joint")
    x = tiny_batch(model, 8)
    with torch.no_grad():
        q = model.posterior(x)
        z = q.rsample(400)
        log_w = (model.log_joint(x, z) - q.log_prob(z)).double()  # [400, B]
    mean = float(log_w.mean())
    se = float(log_w.std(0).pow(2).sum().sqrt() / (math.sqrt(400) * x.shape[0]))
    elbo = E.elbo(model, x, samples=400, analytic_kl=False)
    assert abs(mean - elbo.mean()) <= 4 * math.hypot(se, elbo.mean_stderr()), (mean, elbo.mean())
