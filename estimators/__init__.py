"""Bounds and diagnostics: pure functions over the model protocol (vaes.base), never a model's family."""
from .ais import BDMCResult, ais, bdmc, check_ais_settings
from .bounds import OBJECTIVES, elbo, iwae, training_objective
from .chunking import choose_chunk, memory_budget_bytes
from .diagnostics import ACTIVE_UNIT_THRESHOLD, active_units
from .estimate import Estimate
from .kl import kl_terms
from .marginal import LOG_MARGINAL_METHODS, log_marginal

__all__ = [
    "ACTIVE_UNIT_THRESHOLD",
    "BDMCResult",
    "Estimate",
    "active_units",
    "ais",
    "bdmc",
    "check_ais_settings",
    "LOG_MARGINAL_METHODS",
    "OBJECTIVES",
    "choose_chunk",
    "elbo",
    "iwae",
    "kl_terms",
    "log_marginal",
    "memory_budget_bytes",
    "training_objective",
]
