"""Bounds and diagnostics: pure functions over the model protocol (vaes.base), never a model's family."""
from .ais import BDMCResult, ais, bdmc, check_ais_settings
from .bounds import OBJECTIVES, elbo, iwae, training_objective
from .chunking import choose_chunk, memory_budget_bytes
from .diagnostics import ACTIVE_UNIT_THRESHOLD, active_units
from .diffusion import diffusion_elbo
from .estimate import Estimate
from .gradients import IMPORTANCE_WEIGHTED, check_objective
from .kl import kl_terms
from .marginal import LOG_MARGINAL_METHODS, log_marginal
from .psis import pareto_khat
from .snr import GradientSNR, gradient_snr

__all__ = [
    "ACTIVE_UNIT_THRESHOLD",
    "IMPORTANCE_WEIGHTED",
    "LOG_MARGINAL_METHODS",
    "OBJECTIVES",
    "BDMCResult",
    "Estimate",
    "GradientSNR",
    "active_units",
    "ais",
    "bdmc",
    "check_ais_settings",
    "check_objective",
    "choose_chunk",
    "diffusion_elbo",
    "elbo",
    "gradient_snr",
    "iwae",
    "kl_terms",
    "log_marginal",
    "memory_budget_bytes",
    "pareto_khat",
    "training_objective",
]
