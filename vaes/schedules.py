"""Noise schedules of a variance-preserving Gaussian diffusion: pure float64 functions in a dict registry.

A schedule maps time t in [0, 1] to gamma(t) = -log SNR(t), increasing from
gamma_min at t = 0 to gamma_max at t = 1, so that
    alpha_t^2 = sigmoid(-gamma(t)),  sigma_t^2 = sigmoid(gamma(t)).
Each schedule is given by its two end points; ``NoiseSchedule`` holds them
(learnable or fixed) and evaluates the registered functions in float64, because
1 - exp(gamma_s - gamma_t) over a step of 1/1024 loses most of a float32's digits.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import choose

# (t, gamma_min, gamma_max) -> value; all float64 tensors that broadcast.
ScheduleFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Schedule:
    gamma: ScheduleFn  # gamma(t)
    derivative: ScheduleFn  # d gamma / d t, needed by the continuous-time loss


def _linear_gamma(t: Tensor, gamma_min: Tensor, gamma_max: Tensor) -> Tensor:
    return gamma_min + (gamma_max - gamma_min) * t


def _linear_derivative(t: Tensor, gamma_min: Tensor, gamma_max: Tensor) -> Tensor:
    return (gamma_max - gamma_min) * torch.ones_like(t)


def _cosine_angles(gamma_min: Tensor, gamma_max: Tensor) -> tuple[Tensor, Tensor]:
    # gamma = 2 log tan(u): u runs linearly between the angles of the two end points.
    return torch.atan(torch.exp(gamma_min / 2)), torch.atan(torch.exp(gamma_max / 2))


def _cosine_gamma(t: Tensor, gamma_min: Tensor, gamma_max: Tensor) -> Tensor:
    u0, u1 = _cosine_angles(gamma_min, gamma_max)
    return 2 * torch.log(torch.tan(u0 + (u1 - u0) * t))


def _cosine_derivative(t: Tensor, gamma_min: Tensor, gamma_max: Tensor) -> Tensor:
    u0, u1 = _cosine_angles(gamma_min, gamma_max)
    # d/du 2 log tan(u) = 2 / (sin u cos u) = 4 / sin(2u)
    return 4 * (u1 - u0) / torch.sin(2 * (u0 + (u1 - u0) * t))


# Name -> schedule. "linear": the VDM paper's fixed/learned-end-point schedule.
# "cosine": the log-SNR of the cosine schedule (Nichol & Dhariwal 2021) stretched
# to the same end points; the continuous-time ELBO depends on the end points only
# (VDM paper), so it gives the same bound with an optimal denoiser.
SCHEDULES: dict[str, Schedule] = {
    "linear": Schedule(_linear_gamma, _linear_derivative),
    "cosine": Schedule(_cosine_gamma, _cosine_derivative),
}


def get_schedule(name: str) -> Schedule:
    return choose("noise schedule", name, SCHEDULES)


def alpha_sigma_squared(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha^2, sigma^2) = (sigmoid(-gamma), sigmoid(gamma)): variance preserving, alpha^2 + sigma^2 = 1."""
    return torch.sigmoid(-gamma), torch.sigmoid(gamma)


class NoiseSchedule(nn.Module):
    """gamma(t) of a named schedule between end points that are parameters (learnable) or buffers (fixed)."""

    def __init__(self, name: str, gamma_min: float, gamma_max: float, *, learnable: bool):
        super().__init__()
        if not gamma_min < gamma_max:
            raise ValueError(f"need gamma_min < gamma_max, got {gamma_min} and {gamma_max}")
        self.schedule = get_schedule(name)
        ends = torch.tensor([gamma_min, gamma_max], dtype=torch.float64)
        if learnable:
            self.ends = nn.Parameter(ends)
        else:
            self.register_buffer("ends", ends)

    def _ends(self) -> tuple[Tensor, Tensor]:
        # A learned pair could cross; sorting keeps gamma increasing (and the gradient defined).
        low, high = torch.sort(self.ends.double()).values
        return low, high

    def gamma(self, t: Tensor) -> Tensor:
        return self.schedule.gamma(t.double(), *self._ends())

    def derivative(self, t: Tensor) -> Tensor:
        return self.schedule.derivative(t.double(), *self._ends())


__all__ = ["SCHEDULES", "NoiseSchedule", "Schedule", "alpha_sigma_squared", "get_schedule"]
