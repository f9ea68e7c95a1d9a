"""Learning-rate schedules: (step, total steps, config) -> multiplier of the config's lr.

"iwae-stages" splits the run into stages i = 0..stages-1 of relative length 3^i at
learning rate ``lr * 10^(-i/7)`` (Burda et al. 2015: 8 stages, 3^i epochs each).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import TrainConfig


def _constant(step: int, total: int, config: TrainConfig) -> float:
    return 1.0


def _cosine(step: int, total: int, config: TrainConfig) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def iwae_stage(step: int, total: int, stages: int) -> int:
    """The stage i that ``step`` falls in when ``total`` steps are split in proportion 3^0 : 3^1 : ... .

    Stage i starts after the fraction (3^i - 1) / (3^stages - 1) of the run; compared in integers, so
    stage boundaries that fall on whole steps (e.g. whole epochs) are exact.
    """
    return max(i for i in range(stages) if step * (3**stages - 1) >= total * (3**i - 1))


def _iwae_stages(step: int, total: int, config: TrainConfig) -> float:
    return 10.0 ** (-iwae_stage(step, total, config.stages) / 7)


SCHEDULES: dict[str, Callable[[int, int, TrainConfig], float]] = {
    "constant": _constant,
    "cosine": _cosine,  # from lr to 0 over the run
    "iwae-stages": _iwae_stages,
}


def stage_ends(step: int, total: int, config: TrainConfig) -> bool:
    """Whether ``step`` (1-based count of steps done) closes a stage of the "iwae-stages" schedule."""
    return (config.schedule == "iwae-stages" and step < total
            and iwae_stage(step, total, config.stages) != iwae_stage(step - 1, total, config.stages))
