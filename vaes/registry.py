"""Model registry: ``register_model``, ``create_model``, ``list_models``.

Names are unique: registering one twice raises, and asking for an unknown one
raises with the list of known names. Third-party packages add models through
the entry-point group ``elbo_bench.models``; each entry point names a module
(or callable) whose import registers its models.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

from .base import LatentVariableModel, UnknownChoice, choose

ENTRY_POINT_GROUP = "elbo_bench.models"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., LatentVariableModel]
    description: str  # one line, shown by `python -m bench list models`


_REGISTRY: dict[str, ModelEntry] = {}
_plugins_loaded = False


class UnknownModelError(UnknownChoice, KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def register_model(name: str, *, description: str | None = None):
    """Decorator registering a factory (or class) that builds a model from keyword config."""

    def decorate(factory: Callable[..., LatentVariableModel]):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered (by {_REGISTRY[name].factory.__module__})")
        first_doc_line = next(iter((factory.__doc__ or "").strip().splitlines()), "")
        _REGISTRY[name] = ModelEntry(name, factory, description or first_doc_line)
        return factory

    return decorate


def unregister_model(name: str) -> None:
    """Remove a registration (for tests and interactive redefinition)."""
    _REGISTRY.pop(name, None)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()  # importing registers; a broken plugin should fail loudly
        log.debug("loaded model plugin %s", entry_point.value)


def get_model_entry(name: str) -> ModelEntry:
    _load_plugins()
    try:
        return choose("model", name, _REGISTRY)
    except UnknownChoice as error:
        raise UnknownModelError(str(error)) from None


def create_model(name: str, **config) -> LatentVariableModel:
    """Build the registered model ``name`` with keyword overrides of its config."""
    return get_model_entry(name).factory(**config)


def list_models() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


def model_descriptions() -> dict[str, str]:
    _load_plugins()
    return {name: _REGISTRY[name].description for name in sorted(_REGISTRY)}
