"""Per-layer KL terms: closed form where the model has it, Monte Carlo otherwise."""
from __future__ import annotations

import torch
from torch import Tensor

from vaes.base import LatentVariableModel, check_k, choose

from .chunking import check_chunk, draw_chunks
from .estimate import Estimate, RunningMoments

KL_METHODS = ("auto", "analytic", "mc")


def kl_terms(model: LatentVariableModel, x: Tensor, *, samples: int = 1, method: str = "auto",
             chunk: int | None = None) -> dict[str, Estimate]:
    """KL_l = E_q[log q(z_l | .) - log p(z_l | .)] per stochastic layer, each an Estimate over [B].

    ``method``: "analytic" (closed form, standard error 0; fails if the model has
    none), "mc" (``samples`` draws, standard error from their spread), or "auto"
    (closed form where available for every layer, else Monte Carlo).
    """
    choose("KL method", method, dict.fromkeys(KL_METHODS))
    check_k(samples, "samples")
    check_chunk(chunk)
    with torch.inference_mode():
        if method != "mc":
            closed = model.analytic_kl(x)
            if closed is not None and set(closed) == set(model.layers):
                return {name: Estimate(closed[name].double(), torch.zeros_like(closed[name], dtype=torch.float64),
                                       method="analytic") for name in model.layers}
            if method == "analytic":
                raise ValueError(f"{type(model).__name__} has no closed-form KL for every layer {model.layers}")
        moments = {name: RunningMoments() for name in model.layers}
        for log_weights in draw_chunks(model, x, samples, chunk):
            for name in model.layers:
                moments[name].update(log_weights.layer_kl(name))
        return {name: Estimate(m.mean(), m.stderr(), method="mc") for name, m in moments.items()}
