"""The result type every estimator returns, and the Monte Carlo summaries behind it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Estimate:
    """Per-example estimates in nats.

    ``stderr`` is the Monte Carlo standard error of each example's value (None
    where one draw cannot give it); ``terms`` holds named [B] parts (e.g.
    reconstruction, per-layer KL, effective sample size); ``method`` says how a
    log p(x) value was obtained ("exact", "iwae", ...), None for bounds.
    ``stderr_dof`` is the degrees of freedom of each example's squared error where
    it is a sample variance (S - 1 for S iid draws, R - 1 for R replicates): a
    per-example interval takes Student's t quantile with that many; None where the
    error is a large-sample (normal) approximation, such as the delta method.
    """

    value: Tensor  # [B]
    stderr: Tensor | None  # [B]
    terms: dict[str, Tensor] = field(default_factory=dict)  # name -> [B]
    method: str | None = None
    stderr_dof: int | None = None

    def mean(self) -> float:
        return float(self.value.mean())

    def mean_stderr(self) -> float | None:
        """Monte Carlo standard error of the batch mean: sqrt(sum stderr_i^2) / B (draws are independent).

        Where each squared error is unbiased (iid draws, replicates), so is this one's square, with
        B * stderr_dof degrees of freedom; a delta-method error carries its understatement over.
        """
        if self.stderr is None:
            return None
        return float(self.stderr.pow(2).sum().sqrt() / self.stderr.numel())


class RunningMoments:
    """Streaming mean and variance over the draw dimension of [k, B] chunks (float64 sums)."""

    def __init__(self) -> None:
        self.count = 0
        self.total: Tensor | None = None
        self.total_sq: Tensor | None = None

    def update(self, draws: Tensor) -> None:
        draws = draws.double()
        chunk_sum, chunk_sq = draws.sum(0), draws.pow(2).sum(0)
        self.total = chunk_sum if self.total is None else self.total + chunk_sum
        self.total_sq = chunk_sq if self.total_sq is None else self.total_sq + chunk_sq
        self.count += draws.shape[0]

    def mean(self) -> Tensor:
        return self.total / self.count

    def stderr(self) -> Tensor | None:
        """Standard error of the mean from the unbiased sample variance; None for a single draw."""
        if self.count < 2:
            return None
        mean = self.mean()
        var = (self.total_sq - self.count * mean.pow(2)).clamp_min(0) / (self.count - 1)
        # A draw at -inf (a zero weight) makes the mean -inf and its error unbounded, not NaN.
        return torch.where(mean == -torch.inf, torch.inf, torch.sqrt(var / self.count))


class RunningLogMeanExp:
    """Streaming log mean_k exp(a_k) over [k, B] chunks with a running max, so memory is flat in K.

    The stream of draws is cut into ``groups`` consecutive groups of ``group_size`` draws
    (independent replicates: draws 0..K-1 form group 0, K..2K-1 group 1, ...), each reduced
    on its own whatever the chunk boundaries; every result is [groups, B]. With one group
    (the default) ``group_size`` may be left open: all draws form that group.

    Also accumulates sum exp(2 a) to give the effective sample size of the
    normalized weights and a delta-method standard error of the log mean.

    A weight of zero (a = -inf) is handled as a weight, not as a number to subtract: where
    every draw of a group is -inf its log mean is -inf (ESS 0, delta stderr inf), and the
    result does not depend on where the chunks fall (no -inf - (-inf)).
    """

    def __init__(self, groups: int = 1, group_size: int | None = None) -> None:
        if groups > 1 and group_size is None:
            raise ValueError("several groups need a group_size")
        self.groups, self.group_size = groups, group_size
        self.count = 0  # draws seen, over all groups
        self.max: Tensor | None = None  # [G, B] running max of a, -inf where a group has no positive weight yet
        self.sum_exp: Tensor | None = None  # [G, B] sum_k exp(a_k - shift)
        self.sum_exp2: Tensor | None = None  # [G, B] sum_k exp(2 (a_k - shift))

    def update(self, log_w: Tensor) -> None:
        size, batch = log_w.shape
        if self.max is None:
            self.max = torch.full((self.groups, batch), -torch.inf, dtype=torch.float64, device=log_w.device)
            self.sum_exp = torch.zeros_like(self.max)
            self.sum_exp2 = torch.zeros_like(self.max)
        # The chunk touches groups lo..hi-1; only their rows of the state change.
        lo, hi = self._group_of(self.count), self._group_of(self.count + size - 1) + 1
        if hi > self.groups:
            raise ValueError(f"{self.count + size} draws overflow {self.groups} groups of {self.group_size}")
        if hi - lo == 1:  # the usual case: the chunk lies inside one group
            group = None
            chunk_max = log_w.max(0, keepdim=True).values.double()  # [1, B]
        else:  # group of each draw, counted from lo
            group = torch.arange(self.count, self.count + size, device=log_w.device) // self.group_size - lo
            chunk_max = torch.full((hi - lo, batch), -torch.inf, dtype=torch.float64, device=log_w.device)
            chunk_max = chunk_max.scatter_reduce(0, group[:, None].expand(size, batch), log_w.double(), "amax")
        old_max = self.max[lo:hi]
        new_max = torch.maximum(old_max, chunk_max)
        old_shift, new_shift = _finite(old_max), _finite(new_max)
        # Both shifts are finite; where the old max was -inf its sums are 0 and the clamp keeps the factor <= 1.
        rescale = torch.exp((old_shift - new_shift).clamp_max(0))
        sum_exp, sum_exp2 = self.sum_exp[lo:hi], self.sum_exp2[lo:hi]  # views, updated in place
        sum_exp.mul_(rescale)
        sum_exp2.mul_(rescale.pow(2))
        # One float64 [k, B] temporary, reused in place (float32 weights are promoted by the subtraction).
        shifted = torch.sub(log_w, new_shift if group is None else new_shift[group]).exp_()
        if group is None:
            sum_exp.add_(shifted.sum(0))
            sum_exp2.add_(shifted.square_().sum(0))
        else:
            sum_exp.index_add_(0, group, shifted)
            sum_exp2.index_add_(0, group, shifted.square_())
        self.max[lo:hi] = new_max
        self.count += size

    def _group_of(self, draw: int) -> int:
        """Group index of the draw at this position of the stream."""
        return 0 if self.group_size is None else draw // self.group_size

    def draws_per_group(self) -> int:
        """K of each group; raises where the groups are not all complete."""
        if self.group_size is None:
            return self.count
        if self.count != self.groups * self.group_size:
            raise ValueError(f"{self.count} draws seen, expected {self.groups} groups of {self.group_size}")
        return self.group_size

    def log_mean(self) -> Tensor:
        """log (1/K) sum_k exp(a_k) per group, [G, B]; -inf where every a_k is -inf."""
        k = self.draws_per_group()
        return _finite(self.max) + torch.log(self.sum_exp) - math.log(k)

    def effective_sample_size(self) -> Tensor:
        """(sum w)^2 / sum w^2 per group, [G, B]: between 1 and K, and 0 where every weight is 0."""
        self.draws_per_group()
        positive = self.sum_exp > 0
        return torch.where(positive, self.sum_exp.pow(2) / torch.where(positive, self.sum_exp2, 1), 0)

    def delta_stderr(self) -> Tensor | None:
        """Delta-method standard error of log(mean w) per group, [G, B]: sqrt(Var(w) / (K mean(w)^2)).

        With normalized weights w / mean(w), the unbiased sample variance is
        K/(K-1) (K/ESS - 1), so the standard error is sqrt((K/ESS - 1)/(K - 1)).
        It is a first-order estimate, at most 1 nat whatever the weights (ESS >= 1), and
        understates the error when the weights are heavy-tailed (ESS near 1); independent
        replicates (``replicate_mean``) do not. inf where every weight is 0; None for K = 1.
        """
        k = self.draws_per_group()
        if k < 2:
            return None
        return torch.sqrt((k / self.effective_sample_size() - 1).clamp_min(0) / (k - 1))


def _finite(log_max: Tensor) -> Tensor:
    """A running max usable as a shift: 0 where it is -inf (nothing to scale there yet)."""
    return torch.where(log_max == -torch.inf, 0.0, log_max)


def replicate_mean(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over R independent replicates [R, B] -> [B], with the standard error of that mean from their spread.

    The squared error is unbiased for the Monte Carlo variance of the mean whatever the
    tails (it needs only a finite variance of one replicate), with R - 1 degrees of freedom
    per example; summed over B examples it has B (R - 1). inf where a replicate is -inf.
    Needs R >= 2.
    """
    replicates = values.shape[0]
    if replicates < 2:
        raise ValueError(f"a spread needs at least 2 replicates, got {replicates}")
    mean = values.mean(0)
    finite = torch.isfinite(mean)
    spread = torch.where(finite[None], values, 0).var(0, unbiased=True)
    stderr = torch.where(finite, torch.sqrt(spread / replicates), torch.inf)
    return mean, stderr
