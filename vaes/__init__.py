"""The model zoo: densities only. Importing this package registers every built-in family."""
from .base import LatentVariableModel, LogWeights, Objective, config_hash
from .registry import (
    UnknownModelError,
    create_model,
    list_models,
    model_descriptions,
    register_model,
    unregister_model,
)

# Family modules are imported explicitly: importing one registers its variants.
from . import gaussian_toy, hierarchical, linear_gaussian, mixture_latent, mlp_vae, vdm, vdm_oracle  # noqa: F401  isort: skip

__all__ = [
    "LatentVariableModel",
    "LogWeights",
    "Objective",
    "UnknownModelError",
    "config_hash",
    "create_model",
    "list_models",
    "model_descriptions",
    "register_model",
    "unregister_model",
]
