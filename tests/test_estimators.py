"""Estimator mechanics: streaming logsumexp over chunks, chunk choice, memory flat in K, objectives."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import estimators as E
import vaes
from estimators.chunking import BUDGET_ENV, MIN_CHUNK_ELEMENTS, MIN_CHUNK_ROWS, choose_chunk
from estimators.diffusion import reduce_diffusion_draws
from estimators.estimate import RunningLogMeanExp, RunningMoments
from vaes.base import DiffusionDraws, LatentVariableModel, LogWeights, MissingCapability, UnknownChoice, choose


class ReplayModel(LatentVariableModel):
    """Returns consecutive rows of a fixed table of log weights: chunking cannot change the draws."""

    layers = ("z",)

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table, self.cursor = table, 0  # table [K, B]

    def log_weights(self, x, k):
        rows = self.table[self.cursor:self.cursor + k]
        self.cursor += k
        zeros = torch.zeros_like(rows)
        return LogWeights(rows, {"z": zeros}, {"z": zeros})


def test_streaming_logmeanexp_equals_one_shot_for_k_5000():
    table = 3.0 * torch.randn(5000, 32, dtype=torch.float64) - 100.0
    x = torch.zeros(32, 1)
    one_shot = torch.logsumexp(table, 0) - math.log(5000)
    for chunk in (5000, 64, 7, 1):
        got = E.iwae(ReplayModel(table), x, k=5000, chunk=chunk)
        torch.testing.assert_close(got.value, one_shot, rtol=0, atol=1e-5)
    # The effective sample size is (sum w)^2 / sum w^2 on the same table.
    w = torch.exp(table - table.max(0).values)
    torch.testing.assert_close(got.terms["ess"], w.sum(0) ** 2 / w.pow(2).sum(0), rtol=1e-10, atol=0)


def test_chunked_iwae_of_a_real_model_equals_one_log_weights_call_on_the_same_draws():
    model = vaes.create_model("vae", data_dim=64, latent_dim=8, hidden=(32,)).double()
    x = (torch.rand(16, 64, dtype=torch.float64) > 0.5).double()
    torch.manual_seed(5)
    chunked = E.iwae(model, x, k=5000, chunk=300)
    torch.manual_seed(5)
    with torch.no_grad():
        draws = model.log_weights(x, 5000).total()
    torch.testing.assert_close(chunked.value, torch.logsumexp(draws, 0) - math.log(5000), rtol=0, atol=1e-5)


def test_running_moments_match_torch():
    draws = torch.randn(1000, 5, dtype=torch.float64) * 2 + 1
    moments = RunningMoments()
    for part in draws.split(137):
        moments.update(part)
    torch.testing.assert_close(moments.mean(), draws.mean(0))
    torch.testing.assert_close(moments.stderr(), draws.std(0) / math.sqrt(1000))


def test_delta_stderr_predicts_the_spread_of_iwae():
    # Repeat IWAE-100 many times on one example with light-tailed weights (a linear
    # Gaussian model whose encoder is the posterior shifted by 0.5 standard deviations):
    # the spread of the values matches the delta-method standard error within 10%
    # (the relative sampling error of a std from 4000 values is ~1.1%). With
    # heavy-tailed weights the delta method understates the error, as documented.
    from vaes.linear_gaussian import posterior_linear_map

    model = vaes.create_model("linear-gaussian", data_dim=6, latent_dim=2).double()
    mean_map, scale_tril = posterior_linear_map(model)
    with torch.no_grad():
        model.encoder.proj.copy_(mean_map)
        model.encoder.shift.copy_(0.5 * torch.diagonal(scale_tril))
        model.encoder.log_std.copy_(torch.log(torch.diagonal(scale_tril)))
    x = torch.randn(1, 6, dtype=torch.float64).expand(4000, 6)
    est = E.iwae(model, x, k=100)
    spread = float(est.value.std())
    predicted = float(est.stderr.pow(2).mean().sqrt())
    assert abs(predicted / spread - 1) < 0.1, (predicted, spread)


def test_running_logmeanexp_survives_huge_offsets():
    acc = RunningLogMeanExp()
    acc.update(torch.tensor([[-1e4], [-1e4 + 1]], dtype=torch.float64))
    acc.update(torch.tensor([[1e3]], dtype=torch.float64))  # a new max far above the old one
    expected = torch.logsumexp(torch.tensor([-1e4, -1e4 + 1, 1e3], dtype=torch.float64), 0) - math.log(3)
    torch.testing.assert_close(acc.log_mean(), expected.reshape(1, 1))


def _zero_weight_table() -> torch.Tensor:
    """[8, 3] log weights: column 0 starts with 3 zero weights (-inf), so a first chunk of 1 or 2
    holds nothing else; column 1 is all zero weights; column 2 has one zero weight in the middle."""
    table = torch.randn(8, 3, dtype=torch.float64)
    table[:3, 0] = -torch.inf
    table[:, 1] = -torch.inf
    table[4, 2] = -torch.inf
    return table


@pytest.mark.parametrize("chunk", [1, 2, 8])
def test_zero_weights_give_the_same_iwae_in_any_chunks_and_minus_inf_when_all_are_zero(chunk):
    table = _zero_weight_table()
    got = E.iwae(ReplayModel(table), torch.zeros(3, 1), k=8, chunk=chunk)
    expected = torch.logsumexp(table, 0) - math.log(8)  # torch's one-shot reduction handles -inf
    assert got.value[1] == -torch.inf
    torch.testing.assert_close(got.value, expected, rtol=0, atol=1e-12)
    # ESS of the positive weights; an example without any has ESS 0 and an unbounded error.
    with_weight = table[:, [0, 2]]
    w = torch.exp(with_weight - with_weight.max(0).values)
    torch.testing.assert_close(got.terms["ess"][[0, 2]], w.sum(0) ** 2 / w.pow(2).sum(0), rtol=1e-12, atol=0)
    assert got.terms["ess"][1] == 0 and got.stderr[1] == torch.inf
    assert torch.isfinite(got.stderr[[0, 2]]).all()


def test_zero_weights_in_replicates_and_in_the_elbo_give_minus_inf_with_an_unbounded_error():
    table = _zero_weight_table()
    replicated = E.iwae(ReplayModel(table), torch.zeros(3, 1), k=4, replicates=2, chunk=3)
    halves = torch.logsumexp(table.view(2, 4, 3), 1) - math.log(4)  # [R, B]
    torch.testing.assert_close(replicated.value, halves.mean(0), rtol=0, atol=1e-12)
    # Column 0's first replicate is 3 zero weights and one positive one: finite.
    assert torch.isfinite(replicated.value[[0, 2]]).all() and replicated.value[1] == -torch.inf
    assert replicated.stderr[1] == torch.inf and torch.isfinite(replicated.stderr[[0, 2]]).all()
    bound = E.elbo(ReplayModel(table), torch.zeros(3, 1), samples=8, analytic_kl=False, chunk=3)
    assert (bound.value == -torch.inf).all() and (bound.stderr == torch.inf).all()


@pytest.mark.parametrize("chunk", [1, 3, 5, 20])
def test_replicates_are_consecutive_groups_of_k_draws_whatever_the_chunk(chunk):
    # R = 4 replicates of K = 5 from a table of 20 draws; chunks of 3 straddle replicates.
    table = 2.0 * torch.randn(20, 6, dtype=torch.float64)
    got = E.iwae(ReplayModel(table), torch.zeros(6, 1), k=5, replicates=4, chunk=chunk)
    per_replicate = torch.logsumexp(table.view(4, 5, 6), 1) - math.log(5)  # [R, B]
    torch.testing.assert_close(got.value, per_replicate.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(got.stderr, per_replicate.std(0) / 2, rtol=1e-10, atol=0)
    assert got.stderr_dof == 3
    # The delta-method error of the mean of 4 kept for comparison: sqrt(sum of squares) / 4.
    w = torch.exp(table.view(4, 5, 6) - table.view(4, 5, 6).max(1, keepdim=True).values)
    ess = w.sum(1) ** 2 / w.pow(2).sum(1)
    delta = torch.sqrt((5 / ess - 1) / 4)
    torch.testing.assert_close(got.terms["delta_stderr"], delta.pow(2).sum(0).sqrt() / 4, rtol=1e-10, atol=0)
    torch.testing.assert_close(got.terms["ess"], ess.mean(0), rtol=1e-10, atol=0)


@pytest.mark.parametrize("bad", [0, 2.0, True])
def test_bad_replicates_are_rejected(bad):
    with pytest.raises(ValueError, match="replicates must be an integer >= 1"):
        E.iwae(ReplayModel(torch.zeros(4, 1)), torch.zeros(1, 1), k=2, replicates=bad)


def test_chunk_is_chosen_from_the_memory_budget(monkeypatch):
    model = vaes.create_model("vae", data_dim=784)
    x = torch.zeros(100, 784)
    per_draw = model.draw_nbytes(x)
    assert choose_chunk(model, x, 5000, budget_bytes=10 * per_draw) == 10
    # Under the budget's first draw a chunk still holds MIN_CHUNK_ROWS rows: 512 / 100 examples -> 6 draws,
    assert choose_chunk(model, x, 5000, budget_bytes=per_draw // 2) == math.ceil(MIN_CHUNK_ROWS / 100) == 6
    # one draw for a batch of that size, and never more than K.
    assert choose_chunk(model, torch.zeros(MIN_CHUNK_ROWS, 784), 5000, budget_bytes=1) == 1
    assert choose_chunk(model, x, 3, budget_bytes=1) == 3
    assert choose_chunk(model, x, 3, budget_bytes=10**12) == 3
    # On 2-dimensional data it holds MIN_CHUNK_ELEMENTS numbers per [rows, 2] tensor: 16,384 rows, 132 draws
    # of 125 examples (not the 5 of the row floor), and one draw of a batch of 16,384.
    small = vaes.create_model("vae", data_dim=2, likelihood="gaussian")
    floor = choose_chunk(small, torch.zeros(125, 2), 5000, budget_bytes=1)
    assert floor == math.ceil(MIN_CHUNK_ELEMENTS / 2 / 125) == 132
    assert choose_chunk(small, torch.zeros(MIN_CHUNK_ELEMENTS // 2, 2), 5000, budget_bytes=1) == 1
    monkeypatch.setenv(BUDGET_ENV, str(40 * per_draw / 2**20))
    assert choose_chunk(model, x, 5000) == 40
    monkeypatch.setenv(BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=BUDGET_ENV):
        choose_chunk(model, x, 5000)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "5"])
def test_bad_k_is_rejected(bad):
    model = vaes.create_model("vae", data_dim=8, latent_dim=2, hidden=(4,))
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        E.iwae(model, torch.zeros(2, 8), k=bad)


_PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    import estimators as E, vaes
    torch.set_num_threads(1)
    k, chunk = int(sys.argv[1]), int(sys.argv[2])
    model = vaes.create_model("vae")  # 784-200-200-50
    x = (torch.rand(100, 784) > 0.5).float()
    E.iwae(model, x, k=2, chunk=2)  # warm-up: allocator and kernels
    with open("/proc/self/statm") as f:
        rss_before = int(f.read().split()[1]) * resource.getpagesize()
    E.iwae(model, x, k=k, chunk=chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(peak - rss_before))
""")


def _peak_growth_bytes(k: int, chunk: int) -> int:
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(k), str(chunk)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


@pytest.mark.slow  # 4.5 s of subprocesses measuring peak memory
def test_peak_memory_does_not_grow_with_k_at_a_fixed_chunk():
    # One chunk of 50 draws x 100 examples x 784 logits is ~16 MB per temporary;
    # unchunked K = 5000 would need ~1.6 GB per temporary. Peak RSS growth over the
    # warm-up level must stay the same (20% plus 8 MB of allocator slack).
    small, large = _peak_growth_bytes(50, 50), _peak_growth_bytes(5000, 50)
    assert small > 8 * 2**20  # the probe sees the chunk's temporaries
    assert large <= 1.2 * small + 8 * 2**20, (small, large)


def test_beta_elbo_objective_is_reconstruction_minus_beta_kl():
    model = vaes.create_model("beta-vae", data_dim=12, latent_dim=3, hidden=(8,), beta=4.0).double()
    x = (torch.rand(6, 12, dtype=torch.float64) > 0.5).double()
    torch.manual_seed(1)
    surrogate = E.training_objective(model, x)
    torch.manual_seed(1)
    lw = model.log_weights(x, 1)
    expected = lw.log_likelihood[0] - 4.0 * model.analytic_kl(x)["z"]
    torch.testing.assert_close(surrogate, expected)


def test_iwae_objective_value_equals_the_iwae_bound_on_the_same_draws():
    model = vaes.create_model("iwae", data_dim=12, latent_dim=3, hidden=(8,), k=7).double()
    x = (torch.rand(6, 12, dtype=torch.float64) > 0.5).double()
    torch.manual_seed(2)
    surrogate = E.training_objective(model, x)
    torch.manual_seed(2)
    bound = E.iwae(model, x, k=7, chunk=7)
    torch.testing.assert_close(surrogate.detach(), bound.value)


def test_unknown_objective_lists_choices():
    model = vaes.create_model("vae", data_dim=4, latent_dim=2, hidden=(4,))
    with pytest.raises(ValueError, match="choices: beta-elbo, ciwae, diffusion, elbo, iwae, miwae, piwae"):
        E.training_objective(model, torch.zeros(2, 4), vaes.Objective("renyi"))


def test_log_marginal_auto_picks_exact_or_iwae():
    lg = vaes.create_model("linear-gaussian").double()
    x = torch.randn(4, 20, dtype=torch.float64)
    assert E.log_marginal(lg, x).method == "exact"
    vae = vaes.create_model("vae", data_dim=8, latent_dim=2, hidden=(4,))
    est = E.log_marginal(vae, torch.zeros(3, 8), k=10)
    assert est.method == "iwae" and est.value.shape == (3,)
    with pytest.raises(ValueError, match="no exact log p"):
        E.log_marginal(vae, torch.zeros(3, 8), method="exact")
    with pytest.raises(ValueError, match="choices: ais, auto, exact, iwae"):
        E.log_marginal(vae, torch.zeros(3, 8), method="renyi")


def test_a_chunk_of_the_wrong_shape_is_named():
    class OneDrawShort(ReplayModel):
        def log_weight_chunks(self, x, sizes):
            for k in sizes:
                yield self.log_weights(x, k - 1)

    with pytest.raises(ValueError, match=r"OneDrawShort log weights of a chunk have shape \(2, 4\), expected \[3, 4\]"):
        E.iwae(OneDrawShort(torch.zeros(10, 4)), torch.zeros(4, 1), k=3, chunk=3)


@pytest.mark.parametrize("call, message", [
    (lambda m, x: E.elbo(m, x, samples=0), "samples must be an integer >= 1, got 0"),
    (lambda m, x: E.elbo(m, x, samples=2, chunk=0), "chunk must be an integer >= 1, got 0"),
    (lambda m, x: E.iwae(m, x, k=5, chunk=1.5), "chunk must be an integer >= 1, got 1.5"),
    (lambda m, x: E.kl_terms(m, x, samples=-2, method="mc"), "samples must be an integer >= 1, got -2"),
    (lambda m, x: E.log_marginal(m, x, k=0), "k must be an integer >= 1, got 0"),
    (lambda m, x: E.log_marginal(m, x, method="exact", k=0), "k must be an integer >= 1, got 0"),
    (lambda m, x: E.kl_terms(m, x, method="guess"), "unknown KL method 'guess'; choices: analytic, auto, mc"),
])
def test_each_estimator_names_its_bad_argument(call, message):
    model = vaes.create_model("vae", data_dim=8, latent_dim=2, hidden=(4,))
    with pytest.raises(ValueError, match=re.escape(message)):
        call(model, torch.zeros(2, 8))


def test_choose_names_the_choices_sorted():
    table = {"b": 2, "a": 1}
    assert choose("letter", "a", table) == 1
    with pytest.raises(UnknownChoice, match=re.escape("unknown letter 'c'; choices: a, b")):
        choose("letter", "c", table)
    with pytest.raises(UnknownChoice, match=re.escape("unknown letter ['a']; choices: a, b")):
        choose("letter", ["a"], table)  # unhashable: still the one clear error


def test_diffusion_elbo_reduces_the_draws_as_mean_minus_prior_with_quadrature_errors():
    s = 6
    recon = torch.randn(s, 3, dtype=torch.float64)
    diffusion = torch.rand(s, 3, dtype=torch.float64)
    prior = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    got = reduce_diffusion_draws(DiffusionDraws(recon, prior, diffusion))
    torch.testing.assert_close(got.value, recon.mean(0) - prior - diffusion.mean(0), rtol=0, atol=1e-15)
    variance = (recon.var(0) + diffusion.var(0)) / s  # unbiased sample variances of two independent means
    torch.testing.assert_close(got.stderr, variance.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(got.terms["diffusion_stderr"], (diffusion.var(0) / s).sqrt(), rtol=1e-12, atol=0)
    one = reduce_diffusion_draws(DiffusionDraws(recon[:1], prior, diffusion[:1]))
    assert one.stderr is None and "reconstruction_stderr" not in one.terms


def test_diffusion_objective_is_the_diffusion_elbo_on_the_same_draws():
    model = vaes.create_model("vdm", data_dim=5, steps=4, hidden=(8,))
    x = (torch.rand(6, 5) > 0.5).float()
    torch.manual_seed(3)
    surrogate = E.training_objective(model, x, vaes.Objective("diffusion", k=4))
    torch.manual_seed(3)
    bound = E.diffusion_elbo(model, x, samples=4)
    assert torch.equal(surrogate.detach(), bound.value)


def test_diffusion_needs_the_declared_capability():
    model = vaes.create_model("vae", data_dim=8, latent_dim=2, hidden=(4,))
    with pytest.raises(MissingCapability, match="diffusion_elbo needs a model with 'diffusion_terms'"):
        E.diffusion_elbo(model, torch.zeros(2, 8), samples=2)
    with pytest.raises(MissingCapability, match="objective 'diffusion' needs a model with 'diffusion_terms'"):
        E.training_objective(model, torch.zeros(2, 8), vaes.Objective("diffusion", k=2))
