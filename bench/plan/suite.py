"""Suites: declared run matrices in TOML (schema documented at the top of bench/suites/default.toml).

``load_suite`` parses and validates the shape and types of a suite, naming the
offending key in every error ("suite smoke.toml: models[2].config.latent_dim
must be an integer, got 'a'"). Checks that need the registries' objects (a
model's config fields, whether a model fits a dataset's kind of data) are made
by ``bench.plan.fits.prepare`` before any run directory exists.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.run.evaluators import ESTIMATORS

from .keys import KeyChecker, SuiteError
from .numbers import THREADS_MAX

SUITES_DIR = Path(__file__).parent.parent / "suites"

# Keys each table accepts, with the default used when absent.
EVAL_DEFAULTS = {
    "split": "test",  # splits are never trained on; "valid" for model selection
    "n_examples": None,  # the first n examples of the split; None: all of it
    "batch_size": 100,  # examples per estimator call (memory grows with batch x chunk of K)
    "data_seed": 0,  # seed of the synthetic data sets, fixed across model seeds
}
TIMING_DEFAULTS = {
    "enabled": True,
    "n_examples": 64,  # the batch timed (the first examples of the evaluation set)
    "warmup": 1,
    "repeats": 3,
}
TOP_LEVEL_KEYS = ("name", "description", "threads", "datasets", "models", "estimators", "seeds", "train", "eval",
                  "timing")
MODEL_KEYS = ("name", "label", "config", "eval_configs", "train", "datasets", "estimators")
# Set from the dataset for every cell, so a suite cannot contradict its data.
DATASET_SET_KEYS = ("data_dim", "likelihood")


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation of a trained model entry under evaluation-only overrides (see ModelSpec.eval_configs)."""

    label: str  # the rows' label: the entry's label and the overrides, e.g. "vdm (log_weights_steps=4)"
    overrides: dict  # evaluation-only fields changed from the entry's config ({}: as trained)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registered model name
    label: str  # unique within the suite (defaults to name)
    config: dict  # overrides of the model's config (TOML values as given): what is trained
    train: dict  # overrides of the suite's [train] table
    datasets: tuple[str, ...]  # the suite datasets this model runs on
    # Evaluations of the one trained model; () means one, under `config` itself. Each holds only fields the
    # model declares evaluation-only (checked by bench.plan.fits.prepare against the built model).
    eval_configs: tuple[EvalConfig, ...] = ()
    estimators: tuple[str, ...] | None = None  # names of the suite's estimators run on it; None: all

    def evaluations(self) -> tuple[EvalConfig, ...]:
        """What the entry is evaluated as: its eval configs, or the trained config itself under the entry's label."""
        return self.eval_configs or (EvalConfig(self.label, {}),)

    def eval_config(self, overrides: dict) -> dict:
        """The config of one evaluation (the rows' model_config): the trained config with the overrides."""
        return {**self.config, **overrides}


@dataclass(frozen=True)
class EstimatorSpec:
    name: str  # key of bench.run.evaluators.ESTIMATORS
    ks: tuple[int | None, ...]  # the K grid (None for estimators without K)
    params: dict  # every parameter of the estimator, defaults filled in
    n_examples: int | None  # per-estimator override of eval.n_examples (e.g. fewer for IWAE-5000)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    source: str  # where it was read from
    datasets: tuple[str, ...]
    models: tuple[ModelSpec, ...]
    estimators: tuple[EstimatorSpec, ...]
    seeds: tuple[int, ...]
    threads: int | None  # torch threads of each fit (training and evaluation); None: one (bench.run.threads)
    train: dict  # TrainConfig fields (seed excluded: it comes from `seeds`)
    eval: dict  # EVAL_DEFAULTS keys
    timing: dict  # TIMING_DEFAULTS keys
    contents: dict = field(repr=False)  # the TOML as parsed, for the manifest and --resume


def available_suites() -> dict[str, str]:
    """Name -> description of the suites shipped in bench/suites/."""
    found = {}
    for path in sorted(SUITES_DIR.glob("*.toml")):
        try:
            found[path.stem] = str(_read_toml(path).get("description", "")).strip().splitlines()[0]
        except (SuiteError, IndexError):
            found[path.stem] = "(unreadable)"
    return found


def resolve_suite_path(name_or_path: str) -> Path:
    """A shipped suite by name, or a user's TOML file by path."""
    as_path = Path(name_or_path)
    if as_path.suffix == ".toml" or as_path.is_file():
        if not as_path.is_file():
            raise SuiteError(f"suite file {name_or_path} does not exist")
        return as_path
    shipped = SUITES_DIR / f"{name_or_path}.toml"
    if not shipped.is_file():
        raise SuiteError(f"unknown suite {name_or_path!r}; choices: {', '.join(available_suites())} "
                         f"(or give the path of a .toml file)")
    return shipped


def load_suite(name_or_path: str) -> Suite:
    path = resolve_suite_path(name_or_path)
    return parse_suite(_read_toml(path), source=str(path), default_name=path.stem, label=path.name)


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"suite {path.name}: malformed TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SuiteError(f"suite {path.name}: not UTF-8 text (byte {exc.start}: {exc.reason}); "
                         "TOML files are UTF-8") from None
    except OSError as exc:
        raise SuiteError(f"suite {path}: cannot read: {exc.strerror}") from None


def parse_suite(contents: dict, *, source: str, default_name: str, label: str | None = None) -> Suite:
    """Validate a parsed TOML document into a ``Suite`` (raises SuiteError naming the key)."""
    check = KeyChecker(label or default_name)
    check.table(contents, "", TOP_LEVEL_KEYS)
    for required in ("datasets", "models", "estimators"):
        if required not in contents:
            raise check.fail(required, "is missing")
    name = check.string(contents.get("name", default_name), "name")
    description = str(contents.get("description", ""))
    datasets = check.names(contents["datasets"], "datasets")
    seeds = tuple(check.seed(s, f"seeds[{i}]") for i, s in enumerate(
        contents.get("seeds", [0]) if isinstance(contents.get("seeds", [0]), list) else [contents["seeds"]]))
    if not seeds:
        raise check.fail("seeds", "must list at least one seed")
    train = dict(check.table(contents.get("train", {}), "train", None))
    if "seed" in train:
        raise check.fail("train.seed", "is set per cell from `seeds`; remove it")

    eval_settings = check.settings(contents.get("eval", {}), "eval", EVAL_DEFAULTS, {
        "split": check.string, "n_examples": check.positive, "batch_size": check.positive,
        "data_seed": check.non_negative})
    timing = check.settings(contents.get("timing", {}), "timing", TIMING_DEFAULTS, {
        "enabled": check.boolean, "n_examples": check.positive, "repeats": check.positive,
        "warmup": check.non_negative})

    estimator_specs = _parse_estimators(contents["estimators"], check)
    models = _parse_models(contents["models"], datasets, {e.name for e in estimator_specs}, check)
    threads = check.integer(contents["threads"], "threads", minimum=1, maximum=THREADS_MAX) \
        if "threads" in contents else None
    return Suite(name, description, source, datasets, models, estimator_specs, seeds, threads, train, eval_settings,
                 timing, contents)


def _eval_label(label: str, overrides: dict) -> str:
    if not overrides:
        return label
    return f"{label} ({', '.join(f'{key}={value}' for key, value in overrides.items())})"


def _parse_eval_configs(value: object, key: str, label: str, check: KeyChecker) -> tuple[EvalConfig, ...]:
    """A non-empty array of override tables; which fields may change is checked against the model in prepare()."""
    if not isinstance(value, list) or not value:
        raise check.fail(key, "must be a non-empty array of tables of evaluation-only settings, "
                              "e.g. [{ log_weights_steps = 1 }, { log_weights_steps = 2 }]")
    configs = []
    for j, overrides in enumerate(value):
        where = f"{key}[{j}]"
        check.table(overrides, where, None)
        for fixed in DATASET_SET_KEYS:
            if fixed in overrides:
                raise check.fail(f"{where}.{fixed}", "is set from each dataset; remove it")
        if dict(overrides) in [c.overrides for c in configs]:
            raise check.fail(where, f"repeats an earlier evaluation {dict(overrides)!r}")
        configs.append(EvalConfig(_eval_label(label, overrides), dict(overrides)))
    return tuple(configs)


def _parse_models(value: object, datasets: tuple[str, ...], estimator_names: set[str],
                  check: KeyChecker) -> tuple[ModelSpec, ...]:
    specs = []
    for key, entry in check.array_of_tables(value, "models"):
        check.table(entry, key, MODEL_KEYS)
        name = check.string(entry["name"], f"{key}.name")
        config = check.table(entry.get("config", {}), f"{key}.config", None)
        for fixed in DATASET_SET_KEYS:
            if fixed in config:
                raise check.fail(f"{key}.config.{fixed}", "is set from each dataset; remove it")
        train = check.table(entry.get("train", {}), f"{key}.train", None)
        if "seed" in train:
            raise check.fail(f"{key}.train.seed", "is set per cell from `seeds`; remove it")
        own = check.names(entry["datasets"], f"{key}.datasets") if "datasets" in entry else datasets
        for j, d in enumerate(own):
            if d not in datasets:
                raise check.fail(f"{key}.datasets[{j}]", f"names {d!r}, which is not in the suite's datasets "
                                                         f"({', '.join(datasets)})")
        label = check.string(entry.get("label", name), f"{key}.label")
        evals = (_parse_eval_configs(entry["eval_configs"], f"{key}.eval_configs", label, check)
                 if "eval_configs" in entry else ())
        chosen = None
        if "estimators" in entry:
            chosen = check.names(entry["estimators"], f"{key}.estimators")
            for j, estimator in enumerate(chosen):
                if estimator not in estimator_names:
                    raise check.fail(f"{key}.estimators[{j}]", f"names {estimator!r}, which is not among the suite's "
                                                               f"estimators ({', '.join(sorted(estimator_names))})")
        specs.append(ModelSpec(name, label, dict(config), dict(train), own, evals, chosen))
    labels = [s.label for s in specs]
    for i, spec in enumerate(specs):
        if labels.count(spec.label) > 1:
            raise check.fail(f"models[{i}].label", f"{spec.label!r} is used by more than one model; "
                                                   "give each entry a distinct label")
    row_labels = [(i, e.label) for i, spec in enumerate(specs) for e in spec.evaluations()]
    for i, row_label in row_labels:
        if [r for _, r in row_labels].count(row_label) > 1:
            raise check.fail(f"models[{i}]", f"labels rows {row_label!r}, as another entry does; "
                                             "give the entries distinct labels")
    return tuple(specs)


def _parse_estimators(value: object, check: KeyChecker) -> tuple[EstimatorSpec, ...]:
    specs = []
    for key, entry in check.array_of_tables(value, "estimators"):
        name = check.string(entry["name"], f"{key}.name")
        kind = check.choice(name, f"{key}.name", "estimator", ESTIMATORS, verb="is an")
        check.table(entry, key, ("name", "n_examples", *kind.params))
        params = {}
        for pname, spec in kind.params.items():
            raw = entry.get(pname, spec.default)
            params[pname] = check.param(raw, f"{key}.{pname}", spec)
        if kind.check is not None:
            try:
                kind.check(params)
            except ValueError as exc:
                raise check.fail(key, f"({name}): {exc}") from None
        ks = params.pop(kind.k_param) if kind.k_param else (None,)
        n_examples = check.positive(entry["n_examples"], f"{key}.n_examples") if "n_examples" in entry else None
        specs.append(EstimatorSpec(name, tuple(ks), params, n_examples))
    return tuple(specs)


def select(suite: Suite, *, models: list[str] | None = None, datasets: list[str] | None = None,
           estimators: list[str] | None = None, seed: int | None = None, threads: int | None = None) -> Suite:
    """The suite narrowed by command-line filters (names must be in the suite; SuiteError otherwise)."""
    if models:
        in_suite = {s.label for s in suite.models} | {s.name for s in suite.models}
        _require_members(models, in_suite, "model", suite.name)
        suite = replace(suite, models=tuple(s for s in suite.models if s.label in models or s.name in models))
    if datasets:
        _require_members(datasets, set(suite.datasets), "dataset", suite.name)
        kept = tuple(d for d in suite.datasets if d in datasets)
        narrowed = tuple(replace(s, datasets=tuple(d for d in s.datasets if d in kept)) for s in suite.models)
        suite = replace(suite, datasets=kept, models=tuple(s for s in narrowed if s.datasets))
    if estimators:
        _require_members(estimators, {s.name for s in suite.estimators}, "estimator", suite.name)
        suite = replace(suite, estimators=tuple(s for s in suite.estimators if s.name in estimators))
    if seed is not None:
        suite = replace(suite, seeds=(seed,))
    if threads is not None:
        suite = replace(suite, threads=threads)
    if not suite.models:
        raise SuiteError(f"suite {suite.name}: the filters leave no model x dataset pair to run")
    return suite


def _require_members(names: list[str], available: set[str], what: str, suite_name: str) -> None:
    for name in names:
        if name not in available:
            raise SuiteError(f"{what} {name!r} is not in suite {suite_name}; "
                             f"its {what}s: {', '.join(sorted(available))}")
