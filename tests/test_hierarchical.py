"""The hierarchical VAE: shapes, exact densities, the L = 1 reduction to the MLP VAE, bounds and training."""
from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch.distributions import Bernoulli, Normal

import estimators
from vaes import create_model, list_models
from vaes.base import Objective
from vaes.hierarchical import HierarchicalVAE, HVAEConfig
from vaes.mlp_vae import MLPVAE, MLPVAEConfig

DATA_DIM = 12


def tiny(n_layers: int, **overrides) -> HierarchicalVAE:
    config = dict(data_dim=DATA_DIM, n_layers=n_layers, latent_dims=3, hidden=(8, 6))
    return HierarchicalVAE(HVAEConfig(**{**config, **overrides}))


def binary_batch(rows: int, dim: int = DATA_DIM) -> torch.Tensor:
    return (torch.rand(rows, dim) < 0.4).float()


def digits() -> torch.Tensor:
    return torch.tensor(load_digits().data / 16 > 0.5, dtype=torch.float32)  # [1797, 64]


# --- protocol: shapes, finiteness, gradients ------------------------------------------------------

@pytest.mark.parametrize("n_layers", [1, 2, 4])
def test_log_weights_shapes_finite_and_backward(n_layers):
    model = tiny(n_layers)
    x = binary_batch(5)
    log_weights = model.log_weights(x, 7)
    assert model.layers == tuple(f"z{l}" for l in range(1, n_layers + 1))
    assert log_weights.layers == model.layers
    for tensor in (log_weights.log_likelihood, *log_weights.log_prior.values(), *log_weights.log_posterior.values()):
        assert tensor.shape == (7, 5)
        assert torch.isfinite(tensor).all()
    (-estimators.training_objective(model, x).mean()).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, f"{name} gets no gradient"
    means = model.posterior_means(x)
    assert {name: tuple(mean.shape) for name, mean in means.items()} == {name: (5, 3) for name in model.layers}


def test_registered_and_default_is_iwae_two_layer_architecture():
    assert "hvae" in list_models()
    model = create_model("hvae")
    assert model.config.latent_dims == (100, 50) and model.config.hidden == ((200, 200), (100, 100))
    widths = [[m.out_features for m in block.modules() if isinstance(m, torch.nn.Linear)]
              for block in (*model.up, *model.down, model.decoder)]
    # q(z1|x), q(z2|z1), p(z1|z2), p(x|z1); Gaussian heads end in a (mean, log sigma) pair.
    assert widths == [[200, 200, 100, 100], [100, 100, 50, 50], [100, 100, 100, 100], [200, 200, 784]]
    assert model.objective == Objective("elbo")
    assert create_model("hvae", objective={"name": "iwae", "k": 5}).objective == Objective("iwae", k=5)


# --- exact checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_one_layer_equals_mlp_vae_with_copied_weights(likelihood):
    vae = MLPVAE(MLPVAEConfig(data_dim=DATA_DIM, latent_dim=3, hidden=(8, 6), likelihood=likelihood))
    hvae = tiny(1, likelihood=likelihood)
    hvae.up[0].net.load_state_dict(vae.encoder.state_dict())
    hvae.up[0].head.load_state_dict(vae.posterior_head.state_dict())
    hvae.decoder.load_state_dict(vae.decoder.state_dict())
    hvae.likelihood.load_state_dict(vae.likelihood.state_dict())
    x = binary_batch(6) if likelihood == "bernoulli" else torch.randn(6, DATA_DIM)
    torch.manual_seed(11)
    ours = hvae.log_weights(x, 9)
    torch.manual_seed(11)
    theirs = vae.log_weights(x, 9)
    assert torch.equal(ours.log_likelihood, theirs.log_likelihood)
    assert torch.equal(ours.log_prior["z1"], theirs.log_prior["z"])
    assert torch.equal(ours.log_posterior["z1"], theirs.log_posterior["z"])
    assert torch.equal(hvae.posterior_means(x)["z1"], vae.posterior_means(x)["z"])


def test_log_weights_match_independent_normal_densities():
    """Every [K, B] density of log_weights equals torch.distributions' log_prob of the same draws (float64)."""
    model = tiny(3, latent_dims=(4, 3, 2), hidden=((7,), (5, 5), ())).double()
    x = binary_batch(4).double()
    torch.manual_seed(5)
    log_weights = model.log_weights(x, 6)
    torch.manual_seed(5)  # the same RNG stream gives the same draws
    z = model.sample_posterior(x, 6).z
    z1, z2, z3 = z["z1"], z["z2"], z["z3"]

    def normal(params):
        mean, log_std = params
        return Normal(mean, log_std.exp())

    expected_posterior = {
        "z1": normal(model.up[0](x)).log_prob(z1).sum(-1),
        "z2": normal(model.up[1](z1)).log_prob(z2).sum(-1),
        "z3": normal(model.up[2](z2)).log_prob(z3).sum(-1),
    }
    expected_prior = {
        "z1": normal(model.down[0](z2)).log_prob(z1).sum(-1),
        "z2": normal(model.down[1](z3)).log_prob(z2).sum(-1),
        "z3": Normal(torch.zeros_like(z3), torch.ones_like(z3)).log_prob(z3).sum(-1),
    }
    expected_likelihood = Bernoulli(logits=model.decoder(z1)).log_prob(x).sum(-1)
    torch.testing.assert_close(log_weights.log_likelihood, expected_likelihood, atol=1e-6, rtol=0)
    for name in model.layers:
        torch.testing.assert_close(log_weights.log_posterior[name], expected_posterior[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(log_weights.log_prior[name], expected_prior[name], atol=1e-6, rtol=0)


def test_per_layer_kl_from_shared_estimators():
    """elbo's kl/z_l and kl_terms use the same draws under the same seed, and the bound is recon - sum KL."""
    model = tiny(2).double()
    x = binary_batch(8).double()
    torch.manual_seed(3)
    bound = estimators.elbo(model, x, samples=50)
    torch.manual_seed(3)
    kls = estimators.kl_terms(model, x, samples=50)
    assert model.analytic_kl(x) is None and set(kls) == {"z1", "z2"}
    for name in model.layers:
        assert kls[name].method == "mc"
        torch.testing.assert_close(bound.terms[f"kl/{name}"], kls[name].value, atol=1e-12, rtol=0)
    torch.testing.assert_close(bound.value, bound.terms["reconstruction"] - bound.terms["kl"], atol=1e-9, rtol=0)
    torch.testing.assert_close(bound.terms["kl"], bound.terms["kl/z1"] + bound.terms["kl/z2"], atol=1e-12, rtol=0)


def test_set_output_bias_gives_the_mean_example():
    """With the last decoder weights zeroed, p(x | z) is the product of Bernoulli(mean pixel) for every z."""
    model = tiny(2)
    train = binary_batch(200)
    model.set_output_bias(train.mean(0))
    with torch.no_grad():
        model.decoder[-1].weight.zero_()
    x = binary_batch(5)
    expected = Bernoulli(probs=train.mean(0).clamp(1e-3, 1 - 1e-3)).log_prob(x).sum(-1)  # [B]
    torch.testing.assert_close(model.log_weights(x, 4).log_likelihood, expected.expand(4, 5), atol=1e-5, rtol=0)


# --- Monte Carlo checks ---------------------------------------------------------------------------

def test_posterior_mean_of_upper_layer_matches_sampled_mean():
    """posterior_means' z2 is an average over z1 draws; compare it with the mean of many direct z2 draws.

    Both are unbiased for E_q[z2 | x]. The draws' mean has variance Var(z2)/K; posterior_means
    averages S values of E[z2 | z1], whose variance is at most Var(z2) (law of total variance),
    so the difference has standard deviation at most sqrt(Var(z2) (1/K + 1/S)); 5 of those.
    """
    model = tiny(2)
    x = binary_batch(4)
    samples, k = 4000, 4000
    means = model.posterior_means(x, samples=samples)["z2"]
    with torch.no_grad():
        draws = model.sample_posterior(x, k).z["z2"]  # [K, B, n2]
    bound = 5 * torch.sqrt(draws.var(0) * (1 / k + 1 / samples))
    difference = (means - draws.mean(0)).abs()
    assert (difference < bound).all(), (difference, bound)


def test_elbo_below_iwae_50():
    """E[IWAE_50] >= ELBO: the mean gap exceeds 4 Monte Carlo standard errors (both estimates' errors combined)."""
    model = tiny(2)
    x = binary_batch(64)
    bound = estimators.elbo(model, x, samples=200)
    tighter = estimators.iwae(model, x, k=50)
    gap = tighter.mean() - bound.mean()
    stderr = math.hypot(bound.mean_stderr(), tighter.mean_stderr())
    assert gap - 4 * stderr > 0, (gap, stderr)


def test_training_on_digits_improves_the_objective():
    """300 Adam steps on binarized digits, L = 2, small widths.

    Seeds 0-2 went from about -43 nats (mean of the first 20 steps) to about -24 (last 20):
    about 18 nats. The window means' standard errors are below 1 nat (per-step spread
    <= 3.7 nats / sqrt(20)), so a 10-nat margin cannot be met by noise alone.
    """
    data = digits()
    model = HierarchicalVAE(HVAEConfig(data_dim=64, latent_dims=(8, 4), hidden=((32,), (16,))))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(300):
        batch = data[torch.randint(0, len(data), (100,))]
        objective = estimators.training_objective(model, batch).mean()
        optimizer.zero_grad()
        (-objective).backward()
        optimizer.step()
        history.append(objective.item())
    first, last = sum(history[:20]) / 20, sum(history[-20:]) / 20
    assert last - first > 10.0, (first, last)


# --- configuration --------------------------------------------------------------------------------

def test_uniform_layers_are_broadcast_and_hash_like_explicit_tuples():
    short = HVAEConfig(data_dim=64, n_layers=4, latent_dims=8, hidden=(32, 32))
    explicit = HVAEConfig(data_dim=64, n_layers=4, latent_dims=[8, 8, 8, 8], hidden=[[32, 32]] * 4)
    assert short.latent_dims == (8, 8, 8, 8) and short.hidden == ((32, 32),) * 4
    assert tiny(4, data_dim=64).config_hash() != tiny(2, data_dim=64).config_hash()
    assert HierarchicalVAE(short).config_hash() == HierarchicalVAE(explicit).config_hash()


@pytest.mark.parametrize("overrides, message", [
    (dict(n_layers=3), r"latent_dims has 2 entries .* n_layers is 3"),
    (dict(latent_dims=(10, 5, 3)), r"latent_dims has 3 entries .* n_layers is 2"),
    (dict(hidden=((200,), (100,), (50,))), r"hidden has 3 per-layer entries .* n_layers is 2"),
    (dict(hidden=(200, (100,))), r"hidden mixes ints and per-layer tuples"),
    (dict(latent_dims=(100, 0)), r"latent_dims must be positive integers"),
    (dict(hidden=((200, 0), (100,))), r"hidden must be positive integers"),
    (dict(data_dim=0), r"data_dim must be positive integers"),
    (dict(n_layers=0, latent_dims=3, hidden=()), r"n_layers must be an integer >= 1"),
    (dict(objective="iwae"), r"objective must be an Objective"),
])
def test_bad_config_raises_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        HVAEConfig(**overrides)


def test_bad_likelihood_and_activation_name_the_choices():
    with pytest.raises(ValueError, match=r"unknown likelihood 'poisson'; choices: bernoulli, gaussian"):
        create_model("hvae", likelihood="poisson")
    with pytest.raises(ValueError, match=r"unknown activation 'gelu'; choices:"):
        create_model("hvae", activation="gelu")
