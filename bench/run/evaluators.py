"""The estimator table a suite names: what each estimator measures, its parameters, and one batch's evaluation.

Each entry turns one batch of examples into per-example ``Measurement``s; the
runner concatenates batches, reduces to means and writes rows. The bound maths
lives in ``estimators``; this module only maps a suite's vocabulary onto it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

import estimators
from estimators.ais import check_ais_settings
from estimators.gradients import IMPORTANCE_WEIGHTED
from estimators.kl import KL_METHODS
from estimators.marginal import DEFAULT_AIS_CHAINS, DEFAULT_AIS_STEPS
from estimators.psis import MIN_DRAWS, RELIABLE_KHAT
from reports.schema import method_text
from vaes.base import GRADIENT_ESTIMATORS, LatentVariableModel

# Independent replicates of every IWAE estimate (iwae, and log_marginal where it is IWAE): the value is their
# mean and mc_stderr comes from their spread, which is honest whatever the tails of the weights; the
# delta-method error of one estimate is not (on a heavy-tailed Gaussian toy it is 0.55-0.87 of the true
# spread; two replicates give 0.93-1.05 and cell-level 95% coverage 0.93-0.955). Two is the fewest that give
# a spread and cost twice the draws; a cell of B examples has B degrees of freedom for its error. A suite
# may raise it (`replicates = R` in an [[estimators]] table), never below 2.
DEFAULT_REPLICATES = 2


@dataclass(frozen=True)
class Measurement:
    """One metric over a batch: per-example values [B] (or one dataset-level value [1])."""

    metric: str
    values: Tensor  # [B] (or [1] for a dataset-level count)
    mc_stderr: Tensor | None  # [B] Monte Carlo standard error of each example's value, None where none
    unit: str
    method: str | None = None  # how log p(x) was computed: see reports.schema.ResultRow.method
    reduction: str = "mean"  # how the examples' values become the row's value (bench.run.evaluate.REDUCTIONS)
    per_example: bool = False  # the row keeps each example's value (bounds: for paired comparisons in reports)
    replicates: int | None = None  # independent replicates averaged into each value (None: one estimate)


class NotApplicable(Exception):
    """The estimator has nothing to measure on this model (recorded as a skipped row, not a failure).

    A model without a capability an estimator requires (``vaes.base.MissingCapability``) is recorded the
    same way, by bench.run.evaluate, so the entries below call the estimators without translating it."""


@dataclass(frozen=True)
class Param:
    """A suite parameter of an estimator: its type name (for validation messages), default and choices."""

    # "k-grid" (int or list of ints >= 1), "k" (one int >= 1), "replicates" (int >= 2), "str", "float", or
    # "setting": any value, checked by the estimator's own ``check``
    type: str
    default: object
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class EstimatorKind:
    description: str  # one line, shown by `python -m bench list estimators`
    evaluate: Callable[[LatentVariableModel, Tensor, int | None, dict], list[Measurement]]
    primary_metric: str  # the metric a failed cell's row is filed under
    k_param: str | None = None  # the parameter giving K (draws per example); None: no K
    params: dict[str, Param] = field(default_factory=dict)
    per_example: bool = True  # False: needs every example at once (dataset-level statistics)
    # Checks the parameters together when the suite is loaded (ValueError naming the setting), for estimators
    # whose settings the estimators package validates itself.
    check: Callable[[dict], None] | None = None
    # Whether a cell with these parameters gets timing rows: not where re-running it for them would cost too
    # much (AIS); its rows' wall_s is the cell's time even so.
    timed: Callable[[dict], bool] = lambda params: True


def _elbo(model: LatentVariableModel, x: Tensor, k: int | None, params: dict) -> list[Measurement]:
    est = estimators.elbo(model, x, samples=k)
    terms = [Measurement(name, value, None, "nats") for name, value in est.terms.items()]
    return [Measurement("elbo", est.value, est.stderr, "nats", per_example=True), *terms]


def importance_weight_rows(est: estimators.Estimate, draws: int) -> list[Measurement]:
    """The weight diagnostics of an IWAE estimate from ``draws`` = R x K weights per example.

    ess: mean over examples of one estimate's effective sample size (of K). delta_stderr: the delta-method
    Monte Carlo error of the cell mean (sqrt(sum se_i^2) / B), shown beside the replicate one for comparison;
    it understates heavy tails. khat, khat_max, khat_share: mean and max over examples of the Pareto k-hat of
    all R x K weights, and the share of examples above 0.7 (there the value and its error are unreliable);
    examples whose k-hat is infinite (too few positive weights) count in the share and are left out of the
    mean and max. k-hat needs MIN_DRAWS (100) weights per example: below that these three rows are absent.
    """
    rows = [Measurement("ess", est.terms["ess"], None, "samples")]
    if "delta_stderr" in est.terms:
        rows.append(Measurement("delta_stderr", est.terms["delta_stderr"], None, "nats", reduction="mean_stderr"))
    if draws >= MIN_DRAWS:
        khat = est.terms["khat"]
        rows += [Measurement("khat", khat, None, "shape", reduction="finite_mean"),
                 Measurement("khat_max", khat, None, "shape", reduction="finite_max"),
                 Measurement("khat_share", (khat > RELIABLE_KHAT).double(), None, "share")]
    return rows


def _iwae(model: LatentVariableModel, x: Tensor, k: int | None, params: dict) -> list[Measurement]:
    replicates = params["replicates"]
    est = estimators.iwae(model, x, k=k, replicates=replicates)
    return [Measurement("iwae", est.value, est.stderr, "nats", per_example=True, replicates=replicates),
            *importance_weight_rows(est, k * replicates)]


def _kl_terms(model: LatentVariableModel, x: Tensor, k: int | None, params: dict) -> list[Measurement]:
    per_layer = estimators.kl_terms(model, x, samples=k, method=params["method"])
    rows = [Measurement(f"kl/{name}", est.value, est.stderr, "nats") for name, est in per_layer.items()]
    total = sum(est.value for est in per_layer.values())
    stderrs = [est.stderr for est in per_layer.values()]
    # Layers are estimated from the same draws, so adding their errors in quadrature is approximate;
    # it is exact for closed-form KL (zeros) and for one layer.
    total_stderr = None if any(s is None for s in stderrs) else torch.sqrt(sum(s.pow(2) for s in stderrs))
    return [Measurement("kl", total, total_stderr, "nats"), *rows]


# --- log p(x), and annealed importance sampling -------------------------------------------------------------

# The settings of estimators.ais that a suite may set, with the defaults of estimators.log_marginal's method "ais".
AIS_PARAMS = {
    "steps": Param("setting", DEFAULT_AIS_STEPS),
    "chains": Param("setting", DEFAULT_AIS_CHAINS),
    "leapfrog": Param("setting", 10),
    "schedule": Param("setting", "sigmoid"),  # estimators.ais.SCHEDULES
    "init": Param("setting", "prior"),  # estimators.ais.INITS
}


def _ais_settings(params: dict) -> dict:
    return {name: params[name] for name in AIS_PARAMS}


def _check_ais(params: dict) -> None:
    check_ais_settings(**_ais_settings(params))


def _log_marginal(model: LatentVariableModel, x: Tensor, k: int | None, params: dict) -> list[Measurement]:
    replicates = params["replicates"]
    est = estimators.log_marginal(model, x, method=params["method"], k=k, replicates=replicates)
    if est.method != "iwae":
        default_ais = {name: param.default for name, param in AIS_PARAMS.items()}
        method = method_text("ais", default_ais) if est.method == "ais" else est.method
        return [Measurement("log_marginal", est.value, est.stderr, "nats", method=method, per_example=True)]
    return [Measurement("log_marginal", est.value, est.stderr, "nats", method=est.method, per_example=True,
                        replicates=replicates), *importance_weight_rows(est, k * replicates)]


def _ais(model: LatentVariableModel, x: Tensor, k: int | None, params: dict) -> list[Measurement]:
    settings = _ais_settings(params)
    est = estimators.ais(model, x, **settings)
    method = method_text("ais", settings)
    rows = [Measurement("log_marginal", est.value, est.stderr, "nats", method=method, per_example=True)]
    units = {"acceptance": "probability", "ess": "samples", "log_weight_var": "nats^2"}
    return rows + [Measurement(name, est.terms[name], None, unit, method=method)
                   for name, unit in units.items() if name in est.terms]


def _bdmc(model: LatentVariableModel, x: Tensor, k: int | None, params: dict) -> list[Measurement]:
    """The sandwich on as many examples simulated from the model as x holds (x's values are not used)."""
    settings = _ais_settings(params)
    result = estimators.bdmc(model, x.shape[0], **settings)
    lower, upper = result.lower, result.upper
    method = method_text("bdmc", settings)
    both = lower.stderr is not None and upper.stderr is not None
    gap_stderr = torch.hypot(lower.stderr, upper.stderr) if both else None
    return [Measurement("bdmc_lower", lower.value, lower.stderr, "nats", method=method),
            Measurement("bdmc_upper", upper.value, upper.stderr, "nats", method=method),
            Measurement("bdmc_gap", result.gap, gap_stderr, "nats", method=method)]


def _diffusion_elbo(model: LatentVariableModel, x: Tensor, k: int | None, params: dict) -> list[Measurement]:
    # L_T in discrete time, L_inf in continuous time (the only estimate of the continuous-time bound).
    est = estimators.diffusion_elbo(model, x, samples=k)
    terms = est.terms
    return [Measurement("diffusion_elbo", est.value, est.stderr, "nats", per_example=True),
            Measurement("diffusion_elbo/reconstruction", terms["reconstruction"], terms.get("reconstruction_stderr"),
                        "nats"),
            Measurement("diffusion_elbo/prior", terms["prior"], None, "nats"),
            Measurement("diffusion_elbo/diffusion", terms["diffusion"], terms.get("diffusion_stderr"), "nats")]


def _active_units(model: LatentVariableModel, x: Tensor, k: int | None, params: dict) -> list[Measurement]:
    counts = estimators.active_units(model, x, threshold=params["threshold"])
    if counts is None:
        raise NotApplicable(f"{type(model).__name__} has no posterior means")
    as_tensor = lambda n: torch.tensor([float(n)], dtype=torch.float64)
    layers = [Measurement(f"active_units/{name}", as_tensor(n), None, "count") for name, n in counts.items()]
    return [Measurement("active_units", as_tensor(sum(counts.values())), None, "count"), *layers]


def _gradient_snr(model: LatentVariableModel, x: Tensor, k: int | None, params: dict) -> list[Measurement]:
    result = estimators.gradient_snr(model, x, objective=params["objective"], estimator=params["estimator"], k=k,
                                     m=params["m"], reps=params["reps"], beta=params["beta"])
    # The gradient estimator (and the objective it differentiates) is the rows' method: "iwae/dreg".
    method = f"{params['objective']}/{params['estimator']}"
    as_tensor = lambda value: torch.tensor([value], dtype=torch.float64)
    return [Measurement(f"{summary}_{name}", as_tensor(getattr(network, attribute)), None, "ratio", method=method)
            for name, network in (("inference", result.inference), ("generative", result.generative))
            for summary, attribute in (("snr", "snr"), ("snr_rms", "snr_rms"), ("dsnr", "dsnr"),
                                       ("dsnr_ratio", "dsnr_ratio"))]


ESTIMATORS: dict[str, EstimatorKind] = {
    "elbo": EstimatorKind(
        "ELBO with its reconstruction and per-layer KL terms (closed-form KL where the model has it)",
        _elbo, "elbo", "samples", {"samples": Param("k-grid", 1)}),
    "iwae": EstimatorKind(
        "IWAE-K bound (mean of `replicates` independent estimates, their spread its error) with ESS, Pareto k-hat "
        "(R x K >= 100) and the delta-method error, for each K of the grid",
        _iwae, "iwae", "k", {"k": Param("k-grid", [1, 5, 50]), "replicates": Param("replicates", DEFAULT_REPLICATES)}),
    "kl_terms": EstimatorKind(
        "per-layer KL(q || p): closed form where available, else Monte Carlo with `samples` draws",
        _kl_terms, "kl", "samples", {"samples": Param("k-grid", 100), "method": Param("str", "auto", KL_METHODS)}),
    "log_marginal": EstimatorKind(
        "log p(x): exact where the model has it, else the IWAE-k estimate (method auto; replicated as iwae)",
        _log_marginal, "log_marginal", "k",
        {"k": Param("k-grid", 5000), "method": Param("str", "auto", ("auto", *estimators.LOG_MARGINAL_METHODS)),
         "replicates": Param("replicates", DEFAULT_REPLICATES)},
        timed=lambda params: params["method"] != "ais"),
    "ais": EstimatorKind(
        "log p(x) by annealed importance sampling (a stochastic lower bound), with HMC acceptance, ESS and the "
        "variance of the log weights; skipped for models without log_joint",
        _ais, "log_marginal", None, AIS_PARAMS, check=_check_ais, timed=lambda params: False),
    "bdmc": EstimatorKind(
        "BDMC on as many examples simulated from the model as the cell evaluates: forward-AIS lower and "
        "reverse-AIS upper bounds of log p(x) and their gap; skipped for models without sample_joint",
        _bdmc, "bdmc_gap", None, AIS_PARAMS, check=_check_ais, timed=lambda params: False),
    "diffusion_elbo": EstimatorKind(
        "a diffusion model's ELBO from its loss (L_T in discrete time, L_inf in continuous time), `samples` "
        "stratified times per example; skipped for other models",
        _diffusion_elbo, "diffusion_elbo", "samples", {"samples": Param("k-grid", 64)}),
    "active_units": EstimatorKind(
        "number of latent units with Var_x(E_q[z | x]) above the threshold, per layer",
        _active_units, "active_units", None, {"threshold": Param("float", estimators.ACTIVE_UNIT_THRESHOLD)},
        per_example=False),
    "gradient_snr": EstimatorKind(
        "signal-to-noise ratio of a gradient estimator (reparam, stl, dreg) of an importance-weighted objective, "
        "per network, over `reps` gradient draws on the evaluation batch, for each K of the grid",
        _gradient_snr, "snr_inference", "k",
        {"k": Param("k-grid", [1, 4, 16, 64, 256]), "estimator": Param("str", "reparam", GRADIENT_ESTIMATORS),
         "objective": Param("str", "iwae", IMPORTANCE_WEIGHTED), "m": Param("k", 1), "reps": Param("k", 1000),
         "beta": Param("float", 0.5)},
        per_example=False),
}


def estimator_descriptions() -> dict[str, str]:
    return {name: kind.description for name, kind in ESTIMATORS.items()}
