"""A suite's model overrides and training settings, checked against the real config types.

A model override must name a field of the model's config dataclass (or a keyword of its
factory) and have the type of that field's default; a training setting must name a field
of ``TrainConfig`` and have the type its annotation declares.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing

from bench.train.config import TrainConfig
from vaes import create_model
from vaes.registry import get_model_entry

from .keys import KeyChecker
from .suite import DATASET_SET_KEYS, ModelSpec, Suite


def _value_checker(kind: type, check: KeyChecker):
    """The KeyChecker method accepting TOML values of a Python type; None: not checked here."""
    checkers = {bool: check.boolean, int: check.integer, float: check.number, str: check.string,
                tuple: check.array, list: check.array}
    return checkers.get(kind)


def model_defaults(name: str, data_dim: int, likelihood: str) -> dict | None:
    """Every setting of model ``name`` with its default (config fields, then factory keywords);
    None where the defaults do not build on this data (an oracle's default mixture)."""
    try:
        baseline = create_model(name, data_dim=data_dim, likelihood=likelihood)
    except (TypeError, ValueError):
        return None
    defaults = {}
    if dataclasses.is_dataclass(baseline.config):
        defaults.update({f.name: getattr(baseline.config, f.name) for f in dataclasses.fields(baseline.config)})
    for param in inspect.signature(get_model_entry(name).factory).parameters.values():
        if param.kind is param.KEYWORD_ONLY and param.default is not param.empty:
            defaults[param.name] = param.default
    return defaults


def check_overrides(name: str, overrides: dict, key: str, dataset, check: KeyChecker) -> None:
    """Every override (in the suite table ``key``) must name a setting of the model and have its type."""
    defaults = model_defaults(name, dataset.data_dim, dataset.likelihood)
    if defaults is None:
        # The overrides must then make the model buildable, which prepare() checks with the full config next.
        return
    for field_name, value in overrides.items():
        where = f"{key}.{field_name}"
        if field_name not in defaults:
            choices = ", ".join(k for k in defaults if k not in DATASET_SET_KEYS)
            raise check.fail(where, f"is not a setting of model {name!r}; choices: {choices}")
        checker = _value_checker(type(defaults[field_name]), check)
        if checker is not None:
            checker(value, where)


def _declared_type(hint: object) -> type:
    """The type a TrainConfig annotation accepts from a file: ``X | None`` -> X, ``tuple[...]`` -> tuple."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return typing.get_origin(hint) or hint


TRAIN_SETTING_TYPES = {name: _declared_type(hint) for name, hint in typing.get_type_hints(TrainConfig).items()
                       if name != "seed"}  # the seed comes from the suite's `seeds`


def train_config(suite: Suite, spec: ModelSpec, index: int, seed: int, check: KeyChecker) -> TrainConfig:
    """The training configuration of one fit: the suite's [train] table, the entry's overrides, the seed."""
    settings = {**suite.train, **spec.train}
    for key, value in settings.items():
        where = f"models[{index}].train.{key}" if key in spec.train else f"train.{key}"
        if key not in TRAIN_SETTING_TYPES:
            raise check.fail(where, f"is not a training setting; choices: {', '.join(TRAIN_SETTING_TYPES)}")
        _value_checker(TRAIN_SETTING_TYPES[key], check)(value, where)
    try:
        return TrainConfig(**settings, seed=seed)
    except (TypeError, ValueError) as exc:
        where = f"models[{index}].train" if spec.train else "train"
        raise check.fail(where, f"is not a valid training configuration: {exc}") from None
