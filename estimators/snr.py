"""Signal-to-noise ratio of a gradient estimator, per network (Rainforth et al. 2018).

``reps`` independent draws of the gradient of the batch-mean objective; per parameter
SNR = |mean| / sd over the draws, summarised for the inference and the generative network
apart: the mean over the network's parameters of their SNR, and the DSNR, the SNR of the
gradient projected on its expected direction u = E[g] / |E[g]| (|mean(g . u)| / sd(g . u)),
beside Rainforth et al.'s ratio of norms E[|g . u| / |g - (g . u) u|].

The repetitions are a vmapped dimension, not a loop: ``torch.func.vmap`` over ``torch.func.grad``
of a ``functional_call``, with ``randomness="different"`` and the posterior's draws taken from the
global generator (``vaes.base.vectorized_draws``), so every repetition draws its own noise. They
run in chunks of repetitions sized from a memory budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vaes.base import LOG_JOINT, POSTERIOR, LatentVariableModel, Objective, check_k, vectorized_draws

from .chunking import memory_budget_bytes
from .gradients import check_objective, draws_per_example, surrogate

# Bytes one chunk of repetitions may take on CPU: a repetition holds its draws' activations for
# backward, a few times ``draw_nbytes`` per draw (the streaming estimators' 2 MB would leave one rep).
CPU_BUDGET_BYTES = 2**28
ACTIVATIONS_PER_DRAW = 4  # forward activations kept for backward, and the backward's own, per draw


@dataclass(frozen=True)
class NetworkSNR:
    """One network's gradient statistics over the repetitions."""

    snr: float  # mean over parameters of |mean| / sd (parameters whose gradient never varies left out); nan if none
    # Root mean square over parameters of the SNR with the noise floor taken out: the mean of R draws has
    # E[mean^2] = mu^2 + sd^2 / R, so mean^2 - sd^2 / R is unbiased for mu^2. Where the SNR is near
    # 1 / sqrt(R), ``snr`` measures the floor (about 0.8 / sqrt(R)) and this one does not.
    snr_rms: float
    dsnr: float  # |mean(g . u)| / sd(g . u), u the expected gradient's direction; nan without parameters
    # Rainforth et al.'s own DSNR, E[|g . u| / |g - (g . u) u|]: the gradient's length along its expected
    # direction over its length across it, averaged over the draws; nan without parameters.
    dsnr_ratio: float
    parameters: int  # numbers in the network


@dataclass(frozen=True)
class GradientSNR:
    inference: NetworkSNR
    generative: NetworkSNR
    reps: int
    mean: dict[str, Tensor]  # parameter name -> mean gradient over the repetitions (the parameter's shape)
    stderr: dict[str, Tensor]  # parameter name -> standard error of that mean (sd / sqrt(reps))


class _BatchObjective(nn.Module):
    """The batch-mean surrogate as a module's forward, for torch.func.functional_call."""

    def __init__(self, model: LatentVariableModel, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, x: Tensor) -> Tensor:
        return surrogate(self.model, x, self.objective).mean()


def gradient_snr(model: LatentVariableModel, x: Tensor, *, objective: str = "iwae", estimator: str = "reparam",
                 k: int, m: int = 1, reps: int, beta: float | None = None, chunk: int | None = None) -> GradientSNR:
    """SNR and DSNR of ``estimator``'s gradient of the batch-mean ``objective`` (M, K as it reads them), per network.

    ``chunk`` repetitions are vmapped at once (None: chosen from the memory budget). Needs a model
    with POSTERIOR (q's draws and its inference network) and LOG_JOINT.
    """
    check_k(k)
    check_k(m, "m")
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 2:
        raise ValueError(f"reps must be an integer >= 2 (a spread needs two draws), got {reps!r}")
    if chunk is not None:
        check_k(chunk, "chunk")
    spec = Objective(objective, k=k, m=m, estimator=estimator, **({} if beta is None else {"beta": beta}))
    check_objective(spec, None)
    model.require(POSTERIOR, "gradient_snr")
    model.require(LOG_JOINT, "gradient_snr")
    wrapper = _BatchObjective(model, spec)
    params = {f"model.{name}": p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {f"model.{name}": b for name, b in model.named_buffers()}
    gradient = torch.func.grad(lambda p: torch.func.functional_call(wrapper, (p, buffers), (x,)))
    draws = vectorized_gradients(gradient, params, reps, chunk or _rep_chunk(model, x, spec))  # name -> [R, *shape]
    draws = {name.removeprefix("model."): g for name, g in draws.items()}
    inference = set(model.inference_parameters())
    return GradientSNR(
        inference=_network_snr([g for name, g in draws.items() if name in inference]),
        generative=_network_snr([g for name, g in draws.items() if name not in inference]),
        reps=reps, mean={name: g.mean(0) for name, g in draws.items()},
        stderr={name: g.std(0) / math.sqrt(reps) for name, g in draws.items()})


def vectorized_gradients(gradient, params: dict[str, Tensor], reps: int, chunk: int) -> dict[str, Tensor]:
    """``reps`` independent draws of ``gradient(params)`` (a torch.func.grad), chunk repetitions per vmap call;
    name -> [reps, *shape] in float64."""
    parts: dict[str, list[Tensor]] = {name: [] for name in params}
    with vectorized_draws():
        for start in range(0, reps, chunk):
            count = min(chunk, reps - start)
            drawn = torch.func.vmap(lambda _: gradient(params), randomness="different")(torch.empty(count))
            for name, g in drawn.items():
                parts[name].append(g.double())
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def _rep_chunk(model: LatentVariableModel, x: Tensor, objective: Objective) -> int:
    budget = memory_budget_bytes(x.device) if x.device.type == "cuda" else CPU_BUDGET_BYTES
    per_rep = ACTIVATIONS_PER_DRAW * draws_per_example(objective) * max(1, model.draw_nbytes(x))
    return max(1, budget // per_rep)


def _network_snr(gradients: list[Tensor]) -> NetworkSNR:
    """Summary of one network's gradient draws (each [R, *shape])."""
    if not gradients:
        return NetworkSNR(math.nan, math.nan, math.nan, math.nan, 0)
    flat = torch.cat([g.flatten(1) for g in gradients], 1)  # [R, P]
    reps = flat.shape[0]
    mean, sd = flat.mean(0), flat.std(0)
    varies = sd > 0
    if bool(varies.any()):
        snr = float((mean[varies].abs() / sd[varies]).mean())
        square = float((mean[varies].pow(2) / sd[varies].pow(2) - 1 / reps).mean())
        snr_rms = math.sqrt(max(square, 0.0))
    else:
        snr = snr_rms = math.nan
    norm = mean.norm()
    if norm == 0:
        return NetworkSNR(snr, snr_rms, math.nan, math.nan, flat.shape[1])
    projected = flat @ (mean / norm)  # [R]
    across = (flat.pow(2).sum(1) - projected.pow(2)).clamp(min=0).sqrt()  # |g - (g . u) u|, [R]
    return NetworkSNR(snr, snr_rms, float(projected.mean().abs() / projected.std()),
                      float((projected.abs() / across).mean()), flat.shape[1])
