"""A model entry's training objective, checked when the suite is prepared: bad input is a suite error naming the key.

    [[models]]
    name = "vae"
    config = { objective = { name = "iwae", k = 64, estimator = "dreg" } }
"""
from __future__ import annotations

import dataclasses

from estimators import OBJECTIVES, check_objective
from vaes.base import MissingCapability, Objective, as_objective

from .keys import KeyChecker

OBJECTIVE_KEYS = tuple(f.name for f in dataclasses.fields(Objective))


def check_objective_table(config: dict, key: str, check: KeyChecker) -> None:
    """The entry's ``objective`` table, if any: known keys, a known objective, and settings it accepts
    (M, K >= 1, beta in [0, 1] for ciwae, a known estimator, nothing the objective would ignore)."""
    if "objective" not in config:
        return
    table = check.table(config["objective"], key, OBJECTIVE_KEYS)
    check.choice(table.get("name", Objective.name), f"{key}.name", "objective", OBJECTIVES)
    try:
        check_objective(as_objective(table))
    except (TypeError, ValueError) as exc:
        raise check.fail(key, f"is not a valid objective: {exc}") from None


def check_model_objective(model, key: str, check: KeyChecker) -> None:
    """The built model can give what its objective's gradient estimator needs (STL and DReG need q's draws
    and density apart: POSTERIOR)."""
    try:
        check_objective(model.objective, model)
    except (MissingCapability, ValueError) as exc:
        raise check.fail(key, f"cannot be trained on this model: {exc}") from None
