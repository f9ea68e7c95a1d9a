"""The training settings of one fit (a suite's [train] table plus the seed)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from bench.plan.choices import choose

from .schedules import SCHEDULES


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps; replaced by epochs when that is set
    epochs: float | None = None  # passes over the training split; None: the length is `steps`
    batch_size: int = 100  # IWAE paper uses 20; 100 keeps CPU runs short with the same optimum
    lr: float = 1e-3  # IWAE paper's initial rate
    schedule: str = "constant"  # "constant" | "cosine" | "iwae-stages" (see SCHEDULES)
    stages: int = 8  # iwae-stages only: number of stages (8 in the IWAE paper; fewer for a shortened run)
    betas: tuple[float, float] = (0.9, 0.999)  # IWAE paper's Adam betas
    eps: float = 1e-4  # IWAE paper's Adam epsilon (larger than torch's 1e-8: damps steps on rarely used units)
    seed: int = 0  # model initialisation, batch order and posterior draws
    eval_every: int = 200  # record the validation ELBO (and mean training loss) every this many steps
    eval_examples: int = 1000  # size of the fixed validation subset (first rows of the valid split)
    output_bias_init: bool = True  # Bernoulli decoders: output bias = logit of the mean training pixel (IWAE paper)

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))  # TOML gives lists
        positive = {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr, "stages": self.stages,
                    "eval_every": self.eval_every, "eval_examples": self.eval_examples}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"train config {name} must be > 0, got {value!r}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"train config epochs must be > 0 (or unset to train for `steps`), got {self.epochs!r}")
        choose("schedule", self.schedule, SCHEDULES)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train config betas must be two numbers in [0, 1), got {self.betas!r}")

    def total_steps(self, n_train: int) -> int:
        if self.epochs is None:
            return self.steps
        return max(1, math.ceil(self.epochs * n_train / self.batch_size))
