"""The result type every estimator returns, and the Monte Carlo summaries behind it."""
from __future__ import annotations

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
    """

    value: Tensor  # [B]
    stderr: Tensor | None  # [B]
    terms: dict[str, Tensor] = field(default_factory=dict)  # name -> [B]
    method: str | None = None

    def mean(self) -> float:
        return float(self.value.mean())

    def mean_stderr(self) -> float | None:
        """Monte Carlo standard error of the batch mean: sqrt(sum stderr_i^2) / B (draws are independent)."""
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
        return torch.sqrt(var / self.count)


class RunningLogMeanExp:
    """Streaming log mean_k exp(a_k) over [k, B] chunks with a running max, so memory is flat in K.

    Also accumulates sum exp(2 a) to give the effective sample size of the
    normalized weights and a delta-method standard error of the log mean.
    """

    def __init__(self) -> None:
        self.count = 0
        self.max: Tensor | None = None  # [B]
        self.sum_exp: Tensor | None = None  # [B] sum_k exp(a_k - max)
        self.sum_exp2: Tensor | None = None  # [B] sum_k exp(2 (a_k - max))

    def update(self, log_w: Tensor) -> None:
        chunk_max = log_w.max(0).values.double()
        if self.max is None:
            new_max = chunk_max
            self.sum_exp = torch.zeros_like(chunk_max)
            self.sum_exp2 = torch.zeros_like(chunk_max)
        else:
            new_max = torch.maximum(self.max, chunk_max)
            rescale = torch.exp(self.max - new_max)
            self.sum_exp = self.sum_exp * rescale
            self.sum_exp2 = self.sum_exp2 * rescale.pow(2)
        # One float64 [k, B] temporary, reused in place (float32 weights are promoted by the subtraction).
        shifted = torch.sub(log_w, new_max).exp_()
        self.sum_exp = self.sum_exp + shifted.sum(0)
        self.sum_exp2 = self.sum_exp2 + shifted.square_().sum(0)
        self.max = new_max
        self.count += log_w.shape[0]

    def log_mean(self) -> Tensor:
        return self.max + torch.log(self.sum_exp) - torch.log(torch.tensor(float(self.count), dtype=torch.float64))

    def effective_sample_size(self) -> Tensor:
        """(sum w)^2 / sum w^2, between 1 and K."""
        return self.sum_exp.pow(2) / self.sum_exp2

    def delta_stderr(self) -> Tensor | None:
        """Delta-method standard error of log(mean w): sqrt(Var(w) / (K mean(w)^2)).

        With normalized weights w / mean(w), the unbiased sample variance is
        K/(K-1) (K/ESS - 1), so the standard error is sqrt((K/ESS - 1)/(K - 1)).
        It is a first-order estimate and understates the error when the weights
        are heavy-tailed (ESS near 1). None for K = 1.
        """
        k = self.count
        if k < 2:
            return None
        return torch.sqrt((k / self.effective_sample_size() - 1).clamp_min(0) / (k - 1))
