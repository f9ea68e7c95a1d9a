"""The registry, and the invariants every registered model must hold (parametrized over the whole zoo)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import estimators as E
import vaes
from vaes import registry

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
