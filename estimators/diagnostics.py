"""Diagnostics that are not bounds: active units (Burda et al. 2015)."""
from __future__ import annotations

import torch
from torch import Tensor

from vaes.base import LatentVariableModel

# IWAE paper: a unit u is active when Var_x(E_q[z_u | x]) > 0.01.
ACTIVE_UNIT_THRESHOLD = 0.01


def active_units(model: LatentVariableModel, x: Tensor, *,
                 threshold: float = ACTIVE_UNIT_THRESHOLD) -> dict[str, int] | None:
    """Number of active units per stochastic layer over the examples in x; None if the model has no posterior means."""
    with torch.inference_mode():
        means = model.posterior_means(x)
    if means is None:
        return None
    counts = {}
    for name, mean in means.items():
        assert mean.dim() == 2 and mean.shape[0] == x.shape[0], mean.shape
        counts[name] = int((mean.double().var(0, unbiased=True) > threshold).sum())
    return counts
