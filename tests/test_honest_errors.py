"""Per-example honesty of the reported standard errors, on a Gaussian model with closed-form log p(x).

Rows are seeds x examples of Rainforth et al.'s toy (tests/gaussian_toy.py): 200 seeds of 10
examples, the seeds a tensor dimension (the batch repeated). Every row's IWAE_K - log p(x)
has the same distribution, so the rows are iid and a coverage over them is a binomial
proportion: its standard deviation at 95% over 2,000 rows is 0.0049, and the tolerance of
0.03 is 6 of them.

IWAE_K is biased for log p(x), so its intervals are checked against E[IWAE_K], which is
log p(x) + c_K with c_K the same for every example: c_K is the mean of IWAE_K - log p(x)
over 2,000 independent rows, whose error (1/45 of one estimate's spread) moves the coverage
by less than 0.003. The draws are float32 (twice as fast; the estimators sum in float64). The
ELBO's expectation is closed form: log p(x) - KL(q || p(z|x)).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from gaussian_toy import GaussianToy
from scipy import stats

import estimators as E

DIM, EXAMPLES, SEEDS, REFERENCE_ROWS = 20, 10, 200, 2000
NOMINAL, TOLERANCE = 0.95, 0.03
LIGHT, HEAVY = 2 / 3, (0.30, 0.24)  # q variances: wider than the posterior's 1/2 (Rainforth's), and narrower
# On one thread a q takes 0.03 s at K = 10, 0.3 s at K = 100 and 3 s at K = 1,000 (slow tier).
K_GRID = [10, 100, pytest.param(1000, marks=pytest.mark.slow)]
CHUNK_ROWS = 200_000  # draws x rows per chunk: a few MB of [chunk, rows, D] normals


def _toy(q_var: float) -> GaussianToy:
    prior_mean = torch.randn(DIM, generator=torch.Generator().manual_seed(0))
    return GaussianToy(prior_mean, q_var)


def _data(model: GaussianToy, n: int, seed: int) -> torch.Tensor:
    """n draws of x ~ p(x) = N(m, 2I), [n, D]."""
    noise = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))
    return model.prior_mean + math.sqrt(2) * noise


def _coverage(estimate: E.Estimate, target: torch.Tensor) -> float:
    """Share of rows whose 95% interval (Student's t with the estimate's dof, normal without) holds target."""
    dof = estimate.stderr_dof
    quantile = stats.norm.ppf(0.975) if dof is None else stats.t.ppf(0.975, dof)
    return float(((estimate.value - target).abs() <= quantile * estimate.stderr).double().mean())


@functools.cache
def _run(q_var: float, k: int) -> dict[str, float]:
    """Coverages and error ratios of ELBO (k draws), IWAE-k (delta method) and IWAE-k (2 replicates)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a shared machine: more threads only wait on each other
    try:
        return _measure(q_var, k)
    finally:
        torch.set_num_threads(threads)


def _measure(q_var: float, k: int) -> dict[str, float]:
    model = _toy(q_var)
    torch.manual_seed(k)
    reference_x = _data(model, REFERENCE_ROWS, seed=2)
    reference = E.iwae(model, reference_x, k=k, chunk=max(1, CHUNK_ROWS // REFERENCE_ROWS))
    bias = float((reference.value - model.exact_log_marginal(reference_x).double()).mean())  # E[IWAE_K] - log p(x)

    x = _data(model, EXAMPLES, seed=1).repeat(SEEDS, 1)  # [seeds x examples, D]
    chunk = max(1, CHUNK_ROWS // x.shape[0])
    exact = model.exact_log_marginal(x).double()
    delta = E.iwae(model, x, k=k, chunk=chunk)
    replicated = E.iwae(model, x, k=k, replicates=2, chunk=chunk)
    bound = E.elbo(model, x, samples=k, chunk=chunk)
    spread = lambda estimate: float((estimate.value - exact).std())
    return {
        "elbo": _coverage(bound, exact - model.kl_to_posterior(DIM)),
        "delta": _coverage(delta, exact + bias),
        "replicates": _coverage(replicated, exact + bias),
        "flagged": float((replicated.terms["khat"] > 0.7).double().mean()),
        "delta_ratio": float(delta.stderr.pow(2).mean().sqrt()) / spread(delta),
        "replicate_ratio": float(replicated.stderr.pow(2).mean().sqrt()) / spread(replicated),
    }


@pytest.mark.parametrize("k", K_GRID)
def test_light_tails_intervals_cover_their_nominal_level(k):
    run = _run(LIGHT, k)
    assert abs(run["elbo"] - NOMINAL) <= TOLERANCE, run
    assert abs(run["replicates"] - NOMINAL) <= TOLERANCE, run
    if k >= 100:  # at K = 10 the skew of log-mean-exp leaves the delta method at ~0.90
        assert abs(run["delta"] - NOMINAL) <= TOLERANCE, run


@pytest.mark.parametrize("k", K_GRID)
@pytest.mark.parametrize("q_var", HEAVY)
def test_heavy_tails_replicate_intervals_cover_or_khat_flags_them(q_var, k):
    run = _run(q_var, k)
    assert abs(run["replicates"] - NOMINAL) <= TOLERANCE or run["flagged"] >= 0.9, run
    assert abs(run["elbo"] - NOMINAL) <= TOLERANCE, run  # log w has every moment: the ELBO's error is honest


@pytest.mark.parametrize("k", K_GRID)
@pytest.mark.parametrize("q_var", [LIGHT, *HEAVY])
def test_replicate_error_matches_the_spread_over_seeds(q_var, k):
    # The squared replicate error is unbiased for the variance of the value; over 2,000 rows the mean
    # of the squares and the sample variance each carry a few percent of relative error even with these
    # tails, so the ratio of their square roots is within 10% of 1 (3 or more standard deviations).
    run = _run(q_var, k)
    assert abs(run["replicate_ratio"] - 1) < 0.1, run


@pytest.mark.parametrize("k", K_GRID)
def test_delta_method_understates_heavy_tails(k):
    # Why replicates exist: at q variance 0.24 (weights of infinite variance) the delta-method error is
    # 0.55-0.72 of the true spread (measured; its sampling error is a few percent), its coverage 0.68-0.79.
    run = _run(0.24, k)
    assert run["delta_ratio"] < 0.8 and run["delta"] < 0.85, run
