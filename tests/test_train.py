"""The training loop: progress on every variant, determinism, schedules, checkpoints, failure modes."""
from __future__ import annotations

import math

import pytest
import torch

from bench.data import Dataset, load_dataset
from bench.run.device import resolve_device
from bench.train import (
    SCHEDULES,
    CheckpointError,
    TrainConfig,
    TrainingDivergedError,
    checkpoint_key,
    initial_model,
    iwae_stage,
    train_model,
)
from bench.train.checkpoints import checkpoint_path
from estimators import training_objective
from vaes import create_model

SMALL_MLP = {"hidden": (32,), "latent_dim": 4}  # small enough for a few hundred CPU steps in a second
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def linear_gaussian_data() -> Dataset:
    return load_dataset("linear-gaussian", seed=0)


def _mean_loss(model, x: torch.Tensor, draws: int = 10) -> tuple[torch.Tensor, float]:
    """Per-example loss (-objective) averaged over ``draws`` fixed-seed draws, [N], and its MC stderr of the mean."""
    torch.manual_seed(123)
    with torch.no_grad():
        losses = torch.stack([-training_objective(model, x) for _ in range(draws)])  # [draws, N]
    mc_stderr = losses.std(0).pow(2).sum().sqrt().item() / (x.shape[0] * math.sqrt(draws))
    return losses.mean(0), mc_stderr


def _parameters_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- training makes progress ------------------------------------------------------------------------

# Required decrease of the mean training loss (nats/example) over the whole training split after 200
# steps. Measured decreases: vae 4.1, iwae 4.1, beta-vae 1.25 (beta = 4 collapses most latents, so
# less is left to gain after the output-bias initialisation), linear-gaussian 135. The MC stderr of each
# mean is ~0.01 nats (10 draws x N examples) and is asserted to be far below the margin.
PROGRESS = [
    ("vae", SMALL_MLP, "digits", 3e-3, 3.0),
    ("beta-vae", SMALL_MLP, "digits", 3e-3, 0.8),
    ("iwae", SMALL_MLP, "digits", 3e-3, 3.0),
    ("linear-gaussian", {}, "linear_gaussian_data", 1e-2, 100.0),
]


@pytest.mark.parametrize("name, model_config, data_fixture, lr, margin", PROGRESS, ids=[p[0] for p in PROGRESS])
def test_training_decreases_the_loss(name, model_config, data_fixture, lr, margin, request):
    dataset = request.getfixturevalue(data_fixture)
    config = TrainConfig(steps=200, lr=lr, eval_every=100)
    start = initial_model(name, model_config, dataset, config)
    result = train_model(name, model_config, dataset, config, device=CPU, cache_dir=None, progress=False)
    before, se_before = _mean_loss(start, dataset.train)
    after, se_after = _mean_loss(result.model, dataset.train)
    assert max(se_before, se_after) < margin / 20
    assert before.mean().item() - after.mean().item() > margin
    # The history tracks the same progress: validation ELBO at step 0, 100 and 200.
    assert [h["step"] for h in result.history] == [0, 100, 200]
    assert result.history[-1]["valid_elbo"] > result.history[0]["valid_elbo"] + margin / 2
    assert not result.model.training and result.steps == 200 and result.from_cache is False


def test_same_seed_gives_identical_parameters_and_another_seed_does_not(digits):
    config = TrainConfig(steps=30, batch_size=50, eval_every=10)
    runs = [train_model("iwae", SMALL_MLP, digits, c, device=CPU, progress=False).model
            for c in (config, config, TrainConfig(steps=30, batch_size=50, eval_every=10, seed=1))]
    assert _parameters_equal(runs[0], runs[1])
    assert not _parameters_equal(runs[0], runs[2])


def test_training_leaves_the_callers_random_state_alone(digits):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    train_model("vae", SMALL_MLP, digits, TrainConfig(steps=3, eval_every=3), device=CPU, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_output_bias_starts_at_the_logit_of_the_mean_training_pixel(digits):
    mean = digits.train.mean(0).clamp(1e-3, 1 - 1e-3)
    model = initial_model("vae", SMALL_MLP, digits, TrainConfig())
    torch.testing.assert_close(model.decoder[-1].bias, torch.log(mean / (1 - mean)))
    plain = initial_model("vae", SMALL_MLP, digits, TrainConfig(output_bias_init=False))
    assert not torch.allclose(plain.decoder[-1].bias, model.decoder[-1].bias, atol=0.5)


# --- the maximum-likelihood oracle -----------------------------------------------------------------

def _ml_gap(dataset: Dataset, config: TrainConfig) -> float:
    """Closed-form ML mean log p(x) on the training split minus that of the gradient-trained model."""
    x = dataset.train.double()
    ml = create_model("linear-gaussian").double().fit_maximum_likelihood(x)
    trained = train_model("linear-gaussian", {}, dataset, config, device=CPU, progress=False).model.double()
    with torch.no_grad():
        return ml.exact_log_marginal(x).mean().item() - trained.exact_log_marginal(x).mean().item()


# Full-batch ELBO training of the amortized model. The gap is deterministic (seeded) and must be >= 0
# (the ML fit is the maximum, up to float32 training round-off, hence -1e-6). The slow direction is the
# rotation of W towards orthogonal columns that the diagonal encoder needs. With one torch thread the
# measured gaps after 6000 steps are 0.0106 with beta2 = 0.999 (Adam's long second-moment memory keeps
# the late steps small) and 0.00025 with beta2 = 0.99; 0.00010 after 10000 steps.
@pytest.mark.slow
def test_linear_gaussian_training_reaches_the_maximum_likelihood(linear_gaussian_data):
    config = TrainConfig(steps=6000, batch_size=2000, lr=0.1, betas=(0.9, 0.99), schedule="cosine",
                         eval_every=6000)
    gap = _ml_gap(linear_gaussian_data, config)
    assert -1e-6 < gap < 0.002


def test_linear_gaussian_training_approaches_the_maximum_likelihood_fast(linear_gaussian_data):
    config = TrainConfig(steps=1500, batch_size=2000, lr=0.1, betas=(0.9, 0.99), schedule="cosine", eval_every=1500)
    gap = _ml_gap(linear_gaussian_data, config)
    assert -1e-6 < gap < 0.05


# --- length and schedules ---------------------------------------------------------------------------

def test_epochs_replace_steps():
    assert TrainConfig(steps=7).total_steps(1297) == 7
    assert TrainConfig(steps=7, epochs=2, batch_size=100).total_steps(1297) == 26  # 2 * 1297 / 100, rounded up


def test_iwae_stages_reproduce_the_paper_schedule():
    """8 stages of 3^i epochs at lr 1e-3 * 10^(-i/7) when the run is 3280 epochs (Burda et al. 2015)."""
    steps_per_epoch = 3
    config = TrainConfig(epochs=3280, batch_size=100, schedule="iwae-stages", stages=8)
    total = config.total_steps(steps_per_epoch * 100)
    assert total == 3280 * steps_per_epoch
    stages = [iwae_stage(step, total, 8) for step in range(total)]
    assert [stages.count(i) for i in range(8)] == [3**i * steps_per_epoch for i in range(8)]
    assert stages == sorted(stages)
    factors = [SCHEDULES["iwae-stages"](step, total, config) for step in (0, total - 1)]
    assert factors == pytest.approx([1.0, 10 ** (-1.0)])


def test_shortened_iwae_stages_and_cosine():
    short = TrainConfig(epochs=40, schedule="iwae-stages", stages=4)
    stages = [iwae_stage(step, 40, 4) for step in range(40)]
    assert [stages.count(i) for i in range(4)] == [1, 3, 9, 27]
    assert SCHEDULES["iwae-stages"](39, 40, short) == pytest.approx(10 ** (-3 / 7))
    cosine = TrainConfig(schedule="cosine")
    assert [SCHEDULES["cosine"](s, 100, cosine) for s in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])


def test_the_optimizer_follows_the_schedule(linear_gaussian_data):
    # 2 stages over 4 epochs of 2000 / 500 = 4 steps: stage 0 is steps 0-3, stage 1 steps 4-15.
    config = TrainConfig(epochs=4, batch_size=500, lr=1e-2, schedule="iwae-stages", stages=2, eval_every=2)
    result = train_model("linear-gaussian", {}, linear_gaussian_data, config, device=CPU, progress=False)
    lrs = {h["step"]: h["lr"] for h in result.history}  # the rate the next step will use
    assert lrs[2] == pytest.approx(1e-2) and lrs[4] == pytest.approx(1e-2 * 10 ** (-1 / 7))
    assert result.steps == 16 and result.history[-1]["epoch"] == pytest.approx(4.0)


# --- checkpoints ------------------------------------------------------------------------------------

CACHED = TrainConfig(steps=20, batch_size=100, eval_every=10)


def test_cached_checkpoint_is_reused_and_a_changed_config_is_not_loaded(digits, tmp_path):
    first = train_model("vae", SMALL_MLP, digits, CACHED, device=CPU, cache_dir=tmp_path, progress=False)
    assert first.from_cache is False and first.checkpoint.is_file() and first.checkpoint.parent == tmp_path
    again = train_model("vae", SMALL_MLP, digits, CACHED, device=CPU, cache_dir=tmp_path, progress=False)
    assert again.from_cache is True and again.checkpoint == first.checkpoint
    assert _parameters_equal(first.model, again.model) and again.history == first.history
    assert again.train_seconds == first.train_seconds and not again.model.training

    changed = [("vae", SMALL_MLP, TrainConfig(steps=21, batch_size=100, eval_every=10)),
               ("vae", SMALL_MLP, TrainConfig(steps=20, batch_size=100, eval_every=10, lr=2e-3)),
               ("vae", {**SMALL_MLP, "latent_dim": 5}, CACHED),
               ("iwae", SMALL_MLP, CACHED)]
    for name, model_config, config in changed:
        other = train_model(name, model_config, digits, config, device=CPU, cache_dir=tmp_path, progress=False)
        assert other.from_cache is False and other.checkpoint != first.checkpoint
    # Another split of the same dataset (another data seed) is other training data: no reuse either.
    resplit = train_model("vae", SMALL_MLP, load_dataset("digits", seed=1), CACHED, device=CPU,
                          cache_dir=tmp_path, progress=False)
    assert resplit.from_cache is False
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".pt"] * 6  # no temporary files left behind


def _cell_path(digits, tmp_path):
    model = initial_model("vae", SMALL_MLP, digits, CACHED)
    return checkpoint_path(tmp_path, "vae", digits, checkpoint_key("vae", model, digits, CACHED))


class _RunsCode:
    """Unpickling this calls its payload: what a malicious checkpoint would do under weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_foreign_pickle_in_the_cache_runs_no_code_and_gives_a_clear_error(digits, tmp_path):
    path = _cell_path(digits, tmp_path)
    marker = tmp_path / "code-was-run"
    torch.save({"state_dict": _RunsCode(marker)}, path)  # a well-formed torch file whose pickle calls open()
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*delete the file to retrain") as refused:
        train_model("vae", SMALL_MLP, digits, CACHED, device=CPU, cache_dir=tmp_path, progress=False)
    assert "weights_only" not in str(refused.value)  # torch's advice to load unsafely is not passed on
    assert "refused" in str(refused.value)
    assert not marker.exists()
    assert path.exists()  # documented: never silently replaced
    # The file is a real threat: an unrestricted load would have run its code.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_truncated_or_mismatched_checkpoints_give_a_clear_error(digits, tmp_path):
    good = train_model("vae", SMALL_MLP, digits, CACHED, device=CPU, cache_dir=tmp_path, progress=False)
    content = good.checkpoint.read_bytes()
    good.checkpoint.write_bytes(content[: len(content) // 2])
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        train_model("vae", SMALL_MLP, digits, CACHED, device=CPU, cache_dir=tmp_path, progress=False)
    # A readable checkpoint of another cell, renamed to this cell's key, is refused too.
    other = train_model("vae", SMALL_MLP, digits, TrainConfig(steps=5, eval_every=5), device=CPU,
                        cache_dir=tmp_path, progress=False)
    good.checkpoint.write_bytes(other.checkpoint.read_bytes())
    with pytest.raises(CheckpointError, match="not a checkpoint of this training cell"):
        train_model("vae", SMALL_MLP, digits, CACHED, device=CPU, cache_dir=tmp_path, progress=False)


# --- resuming an interrupted run ---------------------------------------------------------------------

# Digits: 1297 training examples, 13 steps per epoch at batch 100; 4 stages of 1:3:9:27 over 8 epochs end
# mid-epoch (steps 3, 11, 34 of 104), so the resume state must also carry the epoch's batch order.
STAGED = TrainConfig(epochs=8, batch_size=100, schedule="iwae-stages", stages=4, eval_every=7)


class _Interrupted(Exception):
    """Stands for a kill right after the n-th resume state was written."""


def _interrupt_after(monkeypatch, saves: int) -> list[int]:
    """Make training stop right after its ``saves``-th resume state; returns the steps saved at."""
    from bench.train import checkpoints as train_module

    saved_at: list[int] = []
    original = train_module.ResumeFile.save

    def save_then_stop(self, model, optimizer, scheduler, order_gen, device, progress):
        original(self, model, optimizer, scheduler, order_gen, device, progress)
        saved_at.append(progress.step)
        if len(saved_at) == saves:
            raise _Interrupted

    monkeypatch.setattr(train_module.ResumeFile, "save", save_then_stop)
    return saved_at


@pytest.mark.parametrize("saves", [1, 3, 5])  # a stage end mid-epoch, an epoch end, a later stage end
def test_an_interrupted_run_resumes_to_the_same_weights_bit_for_bit(digits, tmp_path, monkeypatch, saves):
    whole = train_model("vae", SMALL_MLP, digits, STAGED, device=CPU, progress=False)
    saved_at = _interrupt_after(monkeypatch, saves)
    with pytest.raises(_Interrupted):
        train_model("vae", SMALL_MLP, digits, STAGED, device=CPU, cache_dir=tmp_path, progress=False,
                    resume_interval_s=0.0)
    monkeypatch.undo()
    resume_files = list(tmp_path.glob("*.resume.pt"))
    assert len(resume_files) == 1 and list(tmp_path.iterdir()) == resume_files  # no final checkpoint yet
    resumed = train_model("vae", SMALL_MLP, digits, STAGED, device=CPU, cache_dir=tmp_path, progress=False)
    assert resumed.from_cache is False and resumed.steps == whole.steps == 8 * 13
    assert _parameters_equal(resumed.model, whole.model)
    strip = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]
    assert strip(resumed.history) == strip(whole.history)
    assert not resume_files[0].exists()  # gone once the final checkpoint is written
    # Every stage end (steps 3, 11, 34) and every epoch end (multiples of 13) wrote a state, in order.
    assert saved_at == sorted({3, 11, 13, 26, 34, 39, 52, 65, 78, 91})[:saves]


def test_stage_ends_are_saved_even_within_the_interval(digits, tmp_path, monkeypatch):
    saved_at = _interrupt_after(monkeypatch, saves=99)
    train_model("vae", SMALL_MLP, digits, STAGED, device=CPU, cache_dir=tmp_path, progress=False,
                resume_interval_s=3600.0)
    assert saved_at == [3, 11, 34]


def test_a_resume_state_of_another_cell_is_refused(digits, tmp_path):
    from bench.train import resume_path

    model = initial_model("vae", SMALL_MLP, digits, STAGED)
    path = checkpoint_path(tmp_path, "vae", digits, checkpoint_key("vae", model, digits, STAGED))
    torch.save({"key": "another-cell", "state_dict": model.state_dict()}, resume_path(path))
    with pytest.raises(CheckpointError, match=r"resume\.pt: it is not a checkpoint of this training cell"):
        train_model("vae", SMALL_MLP, digits, STAGED, device=CPU, cache_dir=tmp_path, progress=False)


# --- failure modes and bad input -------------------------------------------------------------------

def test_nan_loss_raises_a_clear_error():
    train = torch.ones(20, 4)
    train[3, 1] = float("nan")
    dataset = Dataset("with-nan", train, torch.ones(5, 4), torch.ones(5, 4), kind="real", image_shape=None)
    with pytest.raises(TrainingDivergedError, match=r"training loss is nan at step 0 .*lower lr"):
        train_model("linear-gaussian", {"latent_dim": 2}, dataset, TrainConfig(steps=3, batch_size=20),
                    device=CPU, progress=False)


def test_bad_train_config_names_the_problem_and_choices():
    with pytest.raises(ValueError, match="unknown schedule 'linear'; choices: constant, cosine, iwae-stages"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="batch_size must be > 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="epochs must be > 0"):
        TrainConfig(epochs=0)
    assert TrainConfig(betas=[0.9, 0.99]).betas == (0.9, 0.99)  # TOML arrays become tuples


def test_device_resolution():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'; choices: auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
