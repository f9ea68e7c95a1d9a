"""Pareto k-hat: how heavy the upper tail of the importance weights is (the PSIS diagnostic).

Vehtari, Simpson, Gelman, Yao, Gabry ("Pareto smoothed importance sampling"): fit a
generalized Pareto distribution to the M = ceil(min(K/5, 3 sqrt(K))) largest weights of an
example, in excess of the next largest. Its shape k says how many moments the weights have
(about 1/k): k < 0.5 the variance is finite and the estimate converges at the usual rate;
0.5-0.7 it converges slowly but usably; above 0.7 the estimate and any standard error from
the same draws are unreliable. The fit is Zhang & Stephens' (2009) empirical-Bayes
estimator, with the weakly informative prior PSIS adds (worth 10 draws at k = 0.5).

Where k-hat is not a number:
- NaN where the example has fewer than MIN_DRAWS draws. The standard deviation of a
  shape fitted to M exceedances is about (1 + k)/sqrt(M) (the large-sample variance of the
  generalized Pareto fit); at K = 100 (M = 20) that is 0.38 at k = 0.7, already too wide to
  tell a 0.5 tail from a 0.9 one, and below it the fit says nothing. From K = 1,000
  (M = 95) it is about 0.17; k-hat is a number from K = 100 on but means most from ~1,000.
- -inf where the M + 1 largest weights are equal (a point mass: no tail at all).
- +inf where fewer than M + 1 weights are positive (log weight > -inf): a handful of
  draws carry the whole estimate, the heaviest tail there is.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# Below this many draws per example k-hat is NaN (see the module docstring).
MIN_DRAWS = 100
# PSIS's weakly informative prior on the shape: PRIOR_DRAWS pseudo-draws at PRIOR_SHAPE.
PRIOR_DRAWS = 10
PRIOR_SHAPE = 0.5
# k-hat above this: the estimate and its standard error are unreliable (PSIS).
RELIABLE_KHAT = 0.7


def tail_size(draws: int) -> int:
    """M, the number of largest weights the shape is fitted to: ceil(min(K/5, 3 sqrt(K)))."""
    return math.ceil(min(0.2 * draws, 3 * math.sqrt(draws)))


def pareto_khat(log_weights: Tensor) -> Tensor:
    """Pareto k-hat of each example's weights: [K, B] log weights -> [B] (NaN for K < MIN_DRAWS)."""
    running = RunningParetoKhat(log_weights.shape[0])
    running.update(log_weights)
    return running.khat()


class RunningParetoKhat:
    """k-hat over a stream of [k, B] chunks of one example set's ``draws`` weights.

    Keeps the M + 1 largest log weights per example and fewer than M + 1 + chunk pending
    rows, so memory does not grow with K, and selects among them only when M + 1 rows are
    pending (K / (M + 1) selections per stream, not one per chunk). The result is the same
    whatever the chunks.
    """

    def __init__(self, draws: int) -> None:
        self.draws = draws
        self.keep = tail_size(draws) + 1 if draws >= MIN_DRAWS else 0  # the tail and its threshold
        self.seen = 0
        self.batch: int | None = None
        self.device: torch.device | None = None
        self.largest: Tensor | None = None  # [<= keep, B], descending
        self.pending: list[Tensor] = []  # chunks not yet merged into ``largest``
        self.pending_rows = 0

    def update(self, log_w: Tensor) -> None:
        self.seen += log_w.shape[0]
        self.batch, self.device = log_w.shape[1], log_w.device
        if not self.keep:
            return
        self.pending.append(log_w.double())
        self.pending_rows += log_w.shape[0]
        if self.pending_rows >= self.keep:
            self._merge()

    def _merge(self) -> None:
        pool = torch.cat(self.pending if self.largest is None else [self.largest, *self.pending])
        self.largest = pool.topk(min(self.keep, pool.shape[0]), dim=0).values
        self.pending, self.pending_rows = [], 0

    def khat(self) -> Tensor:
        """[B]; raises where the stream did not hold the promised number of draws."""
        if self.seen != self.draws:
            raise ValueError(f"k-hat was promised {self.draws} draws per example, saw {self.seen}")
        if not self.keep:
            return torch.full((self.batch,), torch.nan, dtype=torch.float64, device=self.device)
        if self.pending:
            self._merge()
        return _khat_from_largest(self.largest)


def _khat_from_largest(largest: Tensor) -> Tensor:
    """Shape of the generalized Pareto fitted to the exceedances of the M largest log weights over
    the (M+1)-th, [M + 1, B] descending -> [B]."""
    top, threshold = largest[0], largest[-1]
    # Weights scaled by the example's largest (in (0, 1]); the fit is scale-free.
    scaled = torch.exp(largest[:-1] - torch.where(top == -torch.inf, 0.0, top))
    exceedances = (scaled - torch.exp(threshold - top)).flip(0)  # [M, B], ascending
    too_few_positive = threshold == -torch.inf
    point_mass = (exceedances[-1] == 0) & ~too_few_positive
    usable = ~(too_few_positive | point_mass)
    # Examples without a tail get a stand-in exceedance set (fitted, then overwritten).
    stand_in = torch.linspace(1, 2, exceedances.shape[0], dtype=exceedances.dtype, device=exceedances.device)
    exceedances = torch.where(usable[None], exceedances, stand_in[:, None])
    shape = generalized_pareto_shape(exceedances)
    shape = torch.where(too_few_positive, torch.inf, shape)
    return torch.where(point_mass, -torch.inf, shape)


def generalized_pareto_shape(exceedances: Tensor) -> Tensor:
    """Shape k of a generalized Pareto fitted to nonnegative exceedances [n, B] (ascending per column) -> [B].

    Zhang & Stephens (2009): with theta = k / sigma in their sign convention, the profile
    log likelihood is l(theta) = n (log(-theta / k(theta)) - k(theta) - 1), where
    k(theta) = mean_i log(1 - theta x_i) is the shape that maximizes the likelihood at theta
    (written here with the PSIS sign: k > 0 is a heavy tail). theta is averaged over
    m = 20 + floor(sqrt(n)) grid points, theta_j = 1/x_(n) + (1 - sqrt(m / (j - 1/2))) / (3 x_*),
    x_* the first quartile x_(floor(n/4 + 1/2)), each weighted by its likelihood; then
    k = k(theta_hat), and PSIS's prior pulls it towards 0.5 by PRIOR_DRAWS pseudo-draws.
    """
    n = exceedances.shape[0]
    grid_points = 20 + math.floor(math.sqrt(n))
    largest = exceedances[-1]  # [B], > 0
    quartile = exceedances[math.floor(n / 4 + 0.5) - 1]
    # Ties at the threshold put the quartile at 0; the grid then spreads by the largest exceedance.
    quartile = torch.where(quartile > 0, quartile, largest)
    j = torch.arange(1, grid_points + 1, dtype=exceedances.dtype, device=exceedances.device)
    spread = 1 - torch.sqrt(grid_points / (j - 0.5))  # [m], all < 0
    thetas = 1 / largest + spread[:, None] / (3 * quartile)  # [m, B], each < 1 / x_(n)
    # One [n, B] temporary per grid point, so memory is that of the exceedances.
    profile = torch.stack([n * _profile_log_likelihood(theta, exceedances) for theta in thetas])
    # theta = 0 exactly (0/0 above) has probability 0 for continuous data; give it no weight rather than NaN.
    posterior = torch.softmax(profile.nan_to_num(nan=-torch.inf), dim=0)  # [m, B]
    theta_hat = (posterior * thetas).sum(0)
    shape = torch.log1p(-theta_hat * exceedances).mean(0)
    return (n * shape + PRIOR_DRAWS * PRIOR_SHAPE) / (n + PRIOR_DRAWS)


def _profile_log_likelihood(theta: Tensor, exceedances: Tensor) -> Tensor:
    """(1/n) l(theta) = log(-theta / k) - k - 1 with k = mean log(1 - theta x), [B]."""
    shape = torch.log1p(-theta * exceedances).mean(0)
    return torch.log(-theta / shape) - shape - 1
