"""log p(x) by annealed importance sampling (AIS), and its bidirectional sandwich (BDMC) on simulated data.

AIS (Neal 2001) moves C chains per example along the geometric path
    f_t(z) = p0(z)^(1 - beta_t) p(x, z)^beta_t,   0 = beta_0 < beta_1 < ... < beta_T = 1,
from a normalized start p0 (the prior, or the model's q(z | x)) to the unnormalized posterior p(x, z),
whose normalizer is p(x). Each chain's log weight is
    log w = sum_{t=1..T} (beta_t - beta_{t-1}) (log p(x, z_{t-1}) - log p0(z_{t-1})),
with z_t drawn by an HMC transition that leaves f_t invariant (estimators.hmc). E[w] = p(x), so
log mean_c w_c is a stochastic lower bound of log p(x) (Jensen), tight as T grows.

BDMC (Grosse, Ghahramani & Adams 2015): on (x, z) drawn from the model, z is an exact sample of
p(z | x); AIS run backwards from it (beta from 1 to 0) gives w with E[w] = 1 / p(x), so
-log mean_c w_c is a stochastic upper bound. The gap between the two bounds says how far AIS is
from converged at those settings: BDMC is how to choose the number of steps.

Step sizes: one per transition, chain and example, adapted toward TARGET_ACCEPTANCE by a tuning
round of C chains that runs in lockstep with the counted chains. Counted chain c uses, at each
transition, the step size tuning chain c has reached so far; that sequence depends only on the
tuning chains, never on the counted chains' own states, so each counted transition is a fixed
f_t-invariant kernel and the AIS weights stay unbiased. The tuning chains' weights are discarded.

Inside the estimator a latent state is one flat tensor [C, B, n] (the model's layers concatenated);
the model sees its own dict layout. Examples are processed in chunks chosen from the memory budget,
all chunks in lockstep at each transition, so every random draw covers the whole batch and the
values do not depend on the chunking (up to the rounding of differently sized matmuls).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vaes.base import LOG_JOINT, POSTERIOR, SAMPLE_JOINT, Latents, LatentVariableModel

from .chunking import memory_budget_bytes
from .estimate import Estimate
from .hmc import HMCState, hmc_transition

TARGET_ACCEPTANCE = 0.65  # Wu et al. 2017, after Neal's advice for HMC
# log step += ADAPT_RATE * (acceptance probability - target) after each tuning transition: a step
# far too large (acceptance 0) halves in about 5 transitions, one far too small (acceptance 1) grows
# 10x in about 33, and the jitter from one trajectory's acceptance stays near +-5% once tuned.
ADAPT_RATE = 0.2
DEFAULT_STEP_SIZE = 0.1  # where tuning starts (or the fixed step without tuning); p0 has unit scale
SIGMOID_RADIUS = 4.0  # Wu et al.'s sigmoid schedule over [-4, 4]
# The chunk of chains x examples evaluated at once holds at least this many rows: smaller ones leave
# the matmuls of a forward and backward pass far from the machine's rate. The memory a row costs is
# the protocol's default per-draw footprint (8 data-sized temporaries), kept for the backward pass.
MIN_CHUNK_ROWS = 1024
ROW_TEMPORARIES = 8


def sigmoid_schedule(steps: int) -> Tensor:
    """beta_0..beta_T: a sigmoid over [-4, 4] rescaled to [0, 1] (Wu et al. 2017), [T + 1] float64.

    Dense near both ends, where the log weight increments are largest."""
    s = torch.sigmoid(torch.linspace(-SIGMOID_RADIUS, SIGMOID_RADIUS, steps + 1, dtype=torch.float64))
    return (s - s[0]) / (s[-1] - s[0])


def linear_schedule(steps: int) -> Tensor:
    """beta_t = t / T, [T + 1] float64."""
    return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)


SCHEDULES: dict[str, Callable[[int], Tensor]] = {"sigmoid": sigmoid_schedule, "linear": linear_schedule}
INITS = ("prior", "posterior")  # the start p0: the model's prior, or its q(z | x) (capability POSTERIOR)


@dataclass(frozen=True)
class BDMCResult:
    """Both sides of the BDMC sandwich on n examples simulated from the model."""

    lower: Estimate  # forward AIS from p0: a stochastic lower bound of log p(x), [n]; method "ais"
    upper: Estimate  # reverse AIS from the exact posterior sample: a stochastic upper bound, [n]; method "reverse-ais"
    x: Tensor  # [n, D] the simulated data

    @property
    def gap(self) -> Tensor:
        """upper - lower per example, [n]: non-negative in expectation, zero when AIS has converged."""
        return self.upper.value - self.lower.value

    def mean_gap(self) -> float:
        return float(self.gap.mean())


def ais(model: LatentVariableModel, x: Tensor, *, steps: int, chains: int, leapfrog: int = 10,
        schedule: str = "sigmoid", init: str = "prior", step_size: float = DEFAULT_STEP_SIZE, tune: bool = True,
        chunk: int | None = None, generator: torch.Generator | None = None) -> Estimate:
    """log p(x) per example by AIS over ``steps`` + 1 distributions (beta_0 = 0 .. beta_T = 1, T = ``steps``,
    an HMC transition of ``leapfrog`` steps at each of the T - 1 between) with ``chains`` chains per
    example; an Estimate over [B].

    value: log of the mean over chains of the AIS weights (a stochastic lower bound of log p(x)).
    stderr: see ``_summarize``. terms: ``acceptance`` (mean HMC acceptance probability of the counted
    chains, absent for steps = 1, which has no transitions), ``ess`` (effective sample size of the
    weights over chains), ``log_weight_var`` (variance of the log weights over chains; chains >= 2).
    ``steps = 1`` is importance sampling with p0: with init "posterior" it is IWAE with K = chains.
    ``tune``: adapt the step sizes in a tuning round (twice the work); otherwise ``step_size`` throughout.
    ``chunk``: examples evaluated at once (from the memory budget if None); values do not depend on it.
    """
    check_ais_settings(steps, chains, leapfrog, schedule, init, step_size)
    model.require(LOG_JOINT, "ais")
    if init == "posterior":
        model.require(POSTERIOR, "ais with init 'posterior'")
    with torch.inference_mode(False):
        x = x.clone() if x.is_inference() else x
        path = GeometricPath(model, x, init, chains, tune and steps > 1, chunk)
        z = path.draw_start(generator)
        run = _anneal(path, z, SCHEDULES[schedule](steps), path.step_sizes(step_size), leapfrog, generator)
    return _summarize(run.log_weights[:chains], run.acceptance[:chains] if steps > 1 else None, "ais")


def bdmc(model: LatentVariableModel, n: int, *, steps: int, chains: int, leapfrog: int = 10,
         schedule: str = "sigmoid", init: str = "prior", step_size: float = DEFAULT_STEP_SIZE, tune: bool = True,
         chunk: int | None = None, generator: torch.Generator | None = None) -> BDMCResult:
    """Simulate n pairs (x, z) from the model; forward AIS on x gives a lower bound of each log p(x),
    reverse AIS started at z (``chains`` copies) an upper bound. Settings as in ``ais``.

    The reverse chains reuse the forward tuning round's step size of each intermediate distribution.
    They share their start z, so their spread understates the upper bound's error when few steps
    leave them correlated; the gap is the diagnostic, not that error bar.
    """
    check_ais_settings(steps, chains, leapfrog, schedule, init, step_size)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"bdmc needs n >= 1 simulated examples, got {n!r}")
    model.require(LOG_JOINT, "bdmc")
    model.require(SAMPLE_JOINT, "bdmc")
    if init == "posterior":
        model.require(POSTERIOR, "bdmc with init 'posterior'")
    betas = SCHEDULES[schedule](steps)
    with torch.inference_mode(False):
        with torch.no_grad():
            x, exact = model.sample_joint(n, generator=generator)
        path = GeometricPath(model, x, init, chains, tune and steps > 1, chunk)
        step_sizes = path.step_sizes(step_size, record=True)
        forward = _anneal(path, path.draw_start(generator), betas, step_sizes, leapfrog, generator)
        reverse_path = GeometricPath(model, x, init, chains, False, chunk)
        start = reverse_path.flatten({name: z.expand(chains, *z.shape) for name, z in exact.items()})
        reverse = _anneal(reverse_path, start, betas.flip(0), step_sizes.replay(reverse=True), leapfrog, generator)
    transitions = steps > 1
    lower = _summarize(forward.log_weights[:chains], forward.acceptance[:chains] if transitions else None, "ais")
    upper = _summarize(reverse.log_weights, reverse.acceptance if transitions else None, "reverse-ais", negate=True)
    return BDMCResult(lower, upper, x)


def check_ais_settings(steps: object, chains: object, leapfrog: object = 10, schedule: object = "sigmoid",
                       init: object = "prior", step_size: object = DEFAULT_STEP_SIZE) -> None:
    """One ValueError naming the first bad setting of ``ais``/``bdmc``: for checking a suite up front."""
    for name, value in (("steps", steps), ("chains", chains), ("leapfrog", leapfrog)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"AIS {name} must be an integer >= 1, got {value!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown AIS schedule {schedule!r}; choices: {', '.join(SCHEDULES)}")
    if init not in INITS:
        raise ValueError(f"unknown AIS init {init!r}; choices: {', '.join(INITS)}")
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not 0 < step_size < math.inf:
        raise ValueError(f"AIS step_size must be a positive number, got {step_size!r}")


# --- the path: p0 and p(x, z) for one batch, evaluated chunk by chunk --------------------------------

class GeometricPath:
    """The path's two log densities, log p0(z) and log p(x, z), with their gradients in z for the
    batch x, on flat states [R, B, n]; calling it is one HMC gradient evaluation.

    R = the counted chains, then as many tuning chains when tuning. Parts are [log p0, log p(x, z)],
    so f_beta has coefficients (1 - beta, beta).
    """

    def __init__(self, model: LatentVariableModel, x: Tensor, init: str, chains: int, tuning: bool,
                 chunk: int | None):
        self.model, self.x, self.init = model, x, init
        self.chains, self.rows = chains, 2 * chains if tuning else chains
        batch = x.shape[0]
        if chunk is None:
            per_row = ROW_TEMPORARIES * x.shape[1] * x.element_size()
            chunk = max(MIN_CHUNK_ROWS, memory_budget_bytes(x.device) // per_row) // self.rows
        elif isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"AIS chunk must be an integer >= 1 examples, got {chunk!r}")
        # Chunks of (nearly) equal size: no small remainder chunk far below the efficient row count.
        count = math.ceil(batch / max(1, chunk))
        bounds = [round(i * batch / count) for i in range(count + 1)]
        self.slices = [slice(start, stop) for start, stop in itertools.pairwise(bounds)]
        with torch.no_grad():
            self.start_log_probs = [self._start_log_prob(x[part]) for part in self.slices]
        self.layers, self.widths = model.layers, None

    def _start_log_prob(self, x: Tensor) -> Callable[[Latents], Tensor]:
        if self.init == "prior":
            return self.model.log_prior
        return self.model.posterior(x).log_prob

    def draw_start(self, generator: torch.Generator | None) -> Tensor:
        """R draws from p0 for every example, flat [R, B, n]."""
        with torch.no_grad():
            if self.init == "prior":
                z = self.model.sample_prior(self.rows, self.x.shape[0], generator=generator)
            else:
                z = self.model.posterior(self.x).rsample(self.rows, generator=generator)
        return self.flatten(z)

    def flatten(self, z: Latents) -> Tensor:
        self.widths = [z[name].shape[-1] for name in self.layers]
        return torch.cat([z[name] for name in self.layers], dim=-1).detach()

    def unflatten(self, z: Tensor) -> Latents:
        return dict(zip(self.layers, z.split(self.widths, dim=-1)))

    def __call__(self, z: Tensor) -> HMCState:
        parts = z.new_empty((2, *z.shape[:2]))
        grads = z.new_empty((2, *z.shape))
        for part, start_log_prob in zip(self.slices, self.start_log_probs):
            with torch.enable_grad():
                leaf = z[:, part].detach().requires_grad_(True)
                latents = self.unflatten(leaf)
                log_p0 = start_log_prob(latents)
                log_joint = self.model.log_joint(self.x[part], latents)
                # Each chain and example is independent, so the sum's gradient is the per-element one.
                (grads[1, :, part],) = torch.autograd.grad(log_joint.sum(), leaf, retain_graph=True)
                (grads[0, :, part],) = torch.autograd.grad(log_p0.sum(), leaf)
            parts[0, :, part], parts[1, :, part] = log_p0.detach(), log_joint.detach()
        return HMCState(z, parts, grads)

    def step_sizes(self, step_size: float, record: bool = False) -> _StepSizes:
        return _StepSizes(self.x.new_full((self.chains, self.x.shape[0]), math.log(step_size)),
                          tuning=self.rows > self.chains, record=record)


class _StepSizes:
    """Step size per transition, chain and example, [R, B] at transition t.

    With ``tuning``, the rows after the first C are tuning chains: their acceptance moves log step
    toward TARGET_ACCEPTANCE, and counted chain c uses tuning chain c's current step. Without, the
    step is fixed. ``record`` keeps the step of each transition for a replay (BDMC's reverse chains).
    """

    def __init__(self, log_step: Tensor, *, tuning: bool, record: bool = False, table: Tensor | None = None,
                 reverse: bool = False):
        self.log_step, self.tuning, self.table, self.reverse = log_step, tuning, table, reverse
        self.recorded: list[Tensor] | None = [] if record else None

    def at(self, t: int, steps: int) -> Tensor:
        """The step of the transition after increment t of ``steps`` (it targets f_t, or f_{T-t} in reverse)."""
        if self.table is not None:  # replay: row j - 1 is the step used for f_j, j = 1..T-1
            return self.table[(steps - t if self.reverse else t) - 1]
        step = torch.exp(self.log_step)
        if self.recorded is not None:
            self.recorded.append(step)
        return torch.cat([step, step]) if self.tuning else step

    def observe(self, accept_prob: Tensor) -> None:
        if self.tuning and self.table is None:
            chains = self.log_step.shape[0]
            self.log_step = self.log_step + ADAPT_RATE * (accept_prob[chains:] - TARGET_ACCEPTANCE)

    def replay(self, reverse: bool) -> _StepSizes:
        """The recorded steps as a fixed table, run backwards with ``reverse``."""
        table = torch.stack(self.recorded) if self.recorded else None
        return _StepSizes(self.log_step, tuning=False, table=table, reverse=reverse)


# --- the annealing loop and its summary ------------------------------------------------------------

@dataclass(frozen=True)
class _Run:
    log_weights: Tensor  # [R, B] float64
    acceptance: Tensor  # [R, B] mean acceptance probability over the transitions


def _anneal(path: GeometricPath, z: Tensor, betas: Tensor, step_sizes: _StepSizes, leapfrog: int,
            generator: torch.Generator | None) -> _Run:
    """Carry the states z [R, B, n] along betas (increasing: forward AIS; decreasing: reverse)."""
    state = path(z)
    _check_finite(path.model, state)
    steps = betas.numel() - 1
    log_w = torch.zeros(state.parts.shape[1:], dtype=torch.float64, device=z.device)
    accept_sum = torch.zeros_like(log_w)
    for t in range(1, steps + 1):
        log_w += float(betas[t] - betas[t - 1]) * (state.parts[1] - state.parts[0]).double()
        if t == steps:
            break  # a transition after the last increment would not change the weight
        beta = float(betas[t])
        coef = torch.tensor([1.0 - beta, beta], dtype=z.dtype, device=z.device)
        state, accept_prob = hmc_transition(state, coef, step_sizes.at(t, steps), leapfrog, path, generator)
        step_sizes.observe(accept_prob)
        accept_sum += accept_prob.double()
    return _Run(log_w, accept_sum / max(1, steps - 1))


def _check_finite(model: LatentVariableModel, state: HMCState) -> None:
    for index, what in ((1, "log_joint"), (0, "the start density log p0")):
        bad = ~torch.isfinite(state.parts[index])
        if bad.any():
            raise ValueError(f"{type(model).__name__} {what} is not finite at {int(bad.sum())} of "
                             f"{bad.numel()} starting draws; AIS needs finite log densities")


def _summarize(log_w: Tensor, acceptance: Tensor | None, method: str, negate: bool = False) -> Estimate:
    """log mean_c w_c over the chains [C, B] (negated for reverse AIS), with its error and diagnostics.

    stderr: the larger of two estimates of the spread of log mean w over independent chains.
    - Delta method, sqrt(Var(w) / (C mean(w)^2)) from the sample: right when the weights are
      light-tailed, but it cannot see a tail the C chains missed, and it understates then.
    - Gaussian Poincare bound: for Gaussian log weights (AIS's regime as T grows, Neal 2001) with
      variance s^2, Var(logsumexp) <= s^2 E[sum_c p_c^2] = s^2 E[1 / ESS] (p = softmax of log w).
      With the observed ESS this is s^2 / ESS: s^2 / C when the weights are even, and up to s^2
      (the spread of one log weight) when one chain dominates, so heavy tails widen the error
      instead of hiding.
    Neither includes the downward bias of the log of a mean (about Var(w) / (2 C mean(w)^2)).
    """
    chains = log_w.shape[0]
    log_mean = torch.logsumexp(log_w, 0) - math.log(chains)
    ess = 1.0 / torch.softmax(log_w, 0).pow(2).sum(0)
    terms = {"ess": ess}
    stderr = None
    if chains >= 2:
        log_var = log_w.var(0)
        delta_var = (chains / ess - 1).clamp_min(0) / (chains - 1)
        stderr = torch.sqrt(torch.maximum(delta_var, log_var / ess))
        terms["log_weight_var"] = log_var
    if acceptance is not None:
        terms["acceptance"] = acceptance.mean(0)
    value = -log_mean if negate else log_mean
    assert value.shape == log_w.shape[1:], value.shape
    return Estimate(value, stderr, terms, method=method)
