"""The command line in-process: bad input exits 2 with one line and no run directory; failed cells exit 1."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bench.data
from bench.cli import main
from reports.schema import MANIFEST_FILE, read_rows
from vaes import register_model, unregister_model
from vaes.mlp_vae import MLPVAE, MLPVAEConfig

TINY = textwrap.dedent("""
    datasets = ["digits"]
    [train]
    steps = 5
    eval_every = 5
    eval_examples = 20
    [eval]
    n_examples = 20
    batch_size = 10
    [timing]
    enabled = false
    [[models]]
    name = "vae"
    config = { latent_dim = 2, hidden = [8] }
    [[estimators]]
    name = "iwae"
    k = [1, 3]
""")


def _write_suite(tmp_path: Path, text: str, name: str = "tiny.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _run(tmp_path: Path, *args: str) -> int:
    return main(["run", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--no-report",
                 "--quiet", *args])


def _assert_usage_error(code: int, capsys, tmp_path: Path, *fragments: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err  # one line
    for fragment in fragments:
        assert fragment in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, fragments", [
    (["--all", "--suite", "nope"], ["unknown suite 'nope'", "smoke"]),
    (["--all", "--suite", "smoke", "--models", "nope"], ["model 'nope' is not in suite smoke", "vae"]),
    (["--all", "--suite", "smoke", "--datasets", "nope"], ["unknown dataset 'nope'", "digits"]),
    (["--all", "--suite", "smoke", "--estimators", "nope"], ["unknown estimator 'nope'", "elbo, iwae"]),
    (["--all", "--suite", "smoke", "--datasets", "mixture-2d"], ["dataset 'mixture-2d' is not in suite smoke"]),
    (["--suite", "smoke"], ["pass --all"]),
])
def test_bad_command_lines(tmp_path, capsys, args, fragments):
    _assert_usage_error(_run(tmp_path, *args), capsys, tmp_path, *fragments)


@pytest.mark.parametrize("replace, fragments", [
    (('name = "vae"', 'name = "nope"'), ["models[0].name names an unknown model 'nope'", "linear-gaussian"]),
    (('["digits"]', '["nope"]'), ["datasets[0] names an unknown dataset 'nope'", "digits"]),
    (('name = "iwae"', 'name = "nope"'), ["estimators[0].name is an unknown estimator 'nope'"]),
    (("k = [1, 3]", "k = [1, 0]"), ["estimators[0].k[1] must be an integer >= 1, got 0"]),
    (("k = [1, 3]", 'k = "a"'), ["estimators[0].k must be an integer, got 'a'"]),
    (("latent_dim = 2", 'latent_dim = "a"'),
     ["suite tiny.toml: models[0].config.latent_dim must be an integer, got 'a'"]),
    (("steps = 5", "steps = 5.5"), ["train.steps must be an integer, got 5.5"]),
    (("[[models]]", "[[models]"), ["suite tiny.toml: malformed TOML"]),
    (('name = "vae"', 'name = "linear-gaussian"'), ["cannot run on dataset 'digits' (binary data)"]),
])
def test_bad_suites(tmp_path, capsys, replace, fragments):
    suite = _write_suite(tmp_path, TINY.replace(*replace))
    _assert_usage_error(_run(tmp_path, "--all", "--suite", suite), capsys, tmp_path, *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_but_absent(tmp_path, capsys):
    suite = _write_suite(tmp_path, TINY)
    code = _run(tmp_path, "--all", "--suite", suite, "--device", "cuda")
    _assert_usage_error(code, capsys, tmp_path, "CUDA is not available")


def test_missing_data_file_says_where_to_put_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(bench.data.DATA_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    def offline(url, destination):
        raise OSError("network is unreachable")

    monkeypatch.setattr(bench.data, "fetch", offline)
    suite = _write_suite(tmp_path, TINY.replace('["digits"]', '["binarized-mnist"]'))
    (tmp_path / "empty").mkdir()
    code = _run(tmp_path, "--all", "--suite", suite, "--data-dir", str(tmp_path / "empty"))
    _assert_usage_error(code, capsys, tmp_path, "binarized MNIST not found", "ELBO_BENCH_DATA", "--data-dir")


def test_output_directory_holding_another_run(tmp_path, capsys):
    suite = _write_suite(tmp_path, TINY)
    other = tmp_path / "other"
    other.mkdir()
    (other / MANIFEST_FILE).write_text(json.dumps({"run_id": "earlier"}))
    code = main(["run", "--all", "--suite", suite, "--out", str(other), "--no-report", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "already holds run earlier" in err
    assert sorted(p.name for p in other.iterdir()) == [MANIFEST_FILE]  # untouched


def test_resume_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    code = main(["run", "--resume", str(tmp_path / "junk"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a run directory" in err and len(err.splitlines()) == 1


class _NaNAtEvaluation(MLPVAE):
    """Trains like a VAE, but every evaluation (run under inference mode) sees NaN log-likelihoods."""

    def log_weight_chunks(self, x, sizes):
        for weights in super().log_weight_chunks(x, sizes):
            if torch.is_inference_mode_enabled():
                weights = type(weights)(weights.log_likelihood * float("nan"), weights.log_prior, weights.log_posterior)
            yield weights


@pytest.fixture
def nan_model():
    register_model("test-nan-vae")(lambda **config: _NaNAtEvaluation(MLPVAEConfig(**config)))
    yield "test-nan-vae"
    unregister_model("test-nan-vae")


def test_a_nan_cell_fails_while_the_others_finish(tmp_path, capsys, nan_model):
    text = TINY.replace("[[estimators]]", f'[[models]]\nname = "{nan_model}"\n'
                                          'config = { latent_dim = 2, hidden = [8] }'
                                          "\n\n[[estimators]]", 1)
    suite = _write_suite(tmp_path, text)
    # Serial: a model registered at run time exists only in this process, not in worker processes.
    code = _run(tmp_path, "--all", "--suite", suite, "--executor", "serial")
    err = capsys.readouterr().err
    assert code == 1
    assert "2 failed" in err and f"digits / {nan_model} / seed 0 / iwae k=1" in err
    rows = read_rows(tmp_path / "out")[0]
    by_status = {(r["model"], r["estimator"], r["k"]): r for r in rows}
    for k in (1, 3):
        failed = by_status[(nan_model, "iwae", k)]
        assert failed["status"] == "failed" and failed["value"] is None
        assert "iwae is not finite for 20 of 20 examples" in failed["error"]
        healthy = by_status[("vae", "iwae", k)]
        assert healthy["status"] == "ok" and healthy["n_examples"] == 20 and healthy["error"] is None
    assert by_status[(nan_model, "train", None)]["status"] == "ok"  # training itself was fine
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert manifest["summary"] == {"cells": 6, "ok": 4, "skipped": 0, "failed": 2} and manifest["finished"]


def test_list_prints_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("vae", "linear-gaussian", "digits", "binarized-mnist", "iwae", "log_marginal", "smoke", "default"):
        assert f"  {name} " in out
    assert main(["list", "estimators"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["elbo", "iwae", "kl_terms", "log_marginal", "ais", "bdmc",
                                                     "diffusion_elbo", "active_units", "gradient_snr"]


def test_help_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "bench", "--help"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0 and all(cmd in done.stdout for cmd in ("list", "run", "report", "check"))


def test_the_report_is_built_at_the_end_and_its_failure_loses_nothing(tmp_path, caplog, monkeypatch):
    import reports

    asked = []

    def broken_report(run_dirs, **kwargs):
        asked.append(list(run_dirs))
        raise RuntimeError("no plotting backend")

    monkeypatch.setattr(reports, "build_report", broken_report)
    suite = _write_suite(tmp_path, TINY)
    code = main(["run", "--all", "--suite", suite, "--out", str(tmp_path / "out"), "--cache-dir",
                 str(tmp_path / "cache"), "--quiet"])
    assert code == 0 and asked == [[tmp_path / "out"]]
    assert "building the report failed" in caplog.text
    assert len([r for r in read_rows(tmp_path / "out")[0] if r["metric"] == "iwae"]) == 2
    # The report subcommand is wired to reports.cli.
    monkeypatch.undo()
    assert main(["report", str(tmp_path / "out"), "--format", "md"]) == 0
    assert (tmp_path / "out" / "report" / "report.md").is_file()
