"""reports/plots.py on a hand-written steps-suite run: where each config sits on the T / L axis, and the
numbers the bound-vs-steps, gap and KL-profile plots draw (read back from the matplotlib artists).

No Monte Carlo: every expected number is computed from the rows written here; tolerances are float rounding.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from reports.cells import summarize
from reports.load import load_results
from reports.page import html_page
from reports.plots import (
    DIFFUSION,
    HIERARCHY,
    ONE_LAYER,
    NotDrawn,
    bound_vs_steps,
    gap,
    kl_layers,
    placed,
    plotting,
    throughput,
)
from reports.schema import ROW_COLUMNS
from tests.test_reports import _row as _reports_row
from tests.test_reports import write_run as _write_run

LOG_P = -1.7  # the oracle's exact log p(x) on the mixture
VDM = {1: -1000.0, 2: -50.0, 4: -4.0}  # trained continuous-time VDM: whole-trajectory ELBO at T
VDM_IWAE = {1: -200.0, 2: -10.0, 4: -2.5}
L_INF = -2.2
HVAE = {1: -3.6, 2: -3.5}
VAE = -3.6
DIGITS_LOGP = {"hvae-L2": -20.0, "vae": -20.5}  # IWAE-5000 estimates: no exact log p(x) on digits


DATA = {"mixture-2d": (2, "gaussian"), "digits": (64, "bernoulli")}  # data_dim and likelihood of each dataset


def _structure(dataset: str, family: str, latent_layers: int, *, continuous_time: bool = False) -> dict:
    """What each model declares (vaes.base.ModelStructure); a continuous-time VDM over T steps has T + 1 layers."""
    data_dim, likelihood = DATA[dataset]
    return {"family": family, "latent_layers": latent_layers, "data_dim": data_dim, "likelihood": likelihood,
            "diffusion_steps": None, "continuous_time": continuous_time}


def _row(dataset: str, model: str, label: str, config: dict, estimator: str, k, metric: str, value: float, *,
         structure: dict, stderr: float = 0.01, method: str | None = None) -> dict:
    values = dict.fromkeys(ROW_COLUMNS)
    values.update(run_id="plots", cell_id=f"{dataset}/{label}/{estimator}/{k}", dataset=dataset, split="test",
                  model=model, label=label, config_hash=f"{model}-{json.dumps(config, sort_keys=True)}",
                  model_config=config, structure=structure, seed=0, estimator=estimator, k=k, metric=metric,
                  method=method, value=value, stderr=stderr, unit="nats", n_examples=100, device="cpu", wall_s=0.1,
                  status="ok", schema_version=2)
    return values


def _rows() -> list[dict]:
    rows = []
    for t, value in VDM.items():
        config = {"time": "continuous", "hidden": [64], "log_weights_steps": t}
        label = f"vdm (log_weights_steps={t})"
        vdm = {"structure": _structure("mixture-2d", "vdm", t + 1, continuous_time=True)}
        rows += [_row("mixture-2d", "vdm", label, config, "elbo", 8, "elbo", value, **vdm),
                 _row("mixture-2d", "vdm", label, config, "iwae", 50, "iwae", VDM_IWAE[t], **vdm),
                 _row("mixture-2d", "vdm", label, config, "diffusion_elbo", 64, "diffusion_elbo", L_INF, **vdm)]
        # step KL of layer z_i (i < T), the step t = (i + 1)/T -> i/T, is (i + 1) / T^2; z_T is the prior term
        rows += [_row("mixture-2d", "vdm", label, config, "kl_terms", 16, f"kl/z{i}", (i + 1) / t**2, **vdm)
                 for i in range(t)]
        rows.append(_row("mixture-2d", "vdm", label, config, "kl_terms", 16, f"kl/z{t}", 0.5, **vdm))
    oracle = {"mixture": "ring-2d", "time": "continuous", "log_weights_steps": 4}
    declared = {"structure": _structure("mixture-2d", "mixture-oracle", 5, continuous_time=True)}
    rows += [_row("mixture-2d", "vdm-oracle", "vdm-oracle (log_weights_steps=4)", oracle, "elbo", 8, "elbo", -2.0,
                  **declared),
             _row("mixture-2d", "vdm-oracle", "vdm-oracle (log_weights_steps=4)", oracle, "log_marginal", None,
                  "log_marginal", LOG_P, stderr=0.0, method="exact", **declared)]
    for dataset in ("mixture-2d", "digits"):
        offset = 0.0 if dataset == "mixture-2d" else -16.0
        vae = {"structure": _structure(dataset, "mlp-vae", 1)}
        for layers, value in HVAE.items():
            config = {"n_layers": layers, "latent_dims": [8] * layers}
            label = f"hvae-L{layers}"
            hvae = {"structure": _structure(dataset, "hvae", layers)}
            rows.append(_row(dataset, "hvae", label, config, "elbo", 8, "elbo", value + offset, **hvae))
            rows += [_row(dataset, "hvae", label, config, "kl_terms", 16, f"kl/z{l}", 1.0 / l, **hvae)
                     for l in range(1, layers + 1)]
        rows += [_row(dataset, "vae", "vae", {"latent_dim": 8}, "elbo", 8, "elbo", VAE + offset, **vae),
                 _row(dataset, "vae", "vae", {"latent_dim": 8}, "kl_terms", 16, "kl/z", 2.0, **vae)]
    rows += [_row("digits", "hvae", "hvae-L2", {"n_layers": 2, "latent_dims": [8, 8]}, "log_marginal", 5000,
                  "log_marginal", DIGITS_LOGP["hvae-L2"], method="iwae", structure=_structure("digits", "hvae", 2)),
             _row("digits", "vae", "vae", {"latent_dim": 8}, "log_marginal", 5000, "log_marginal",
                  DIGITS_LOGP["vae"], method="iwae", structure=_structure("digits", "mlp-vae", 1))]
    return rows


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plots")
    (run_dir / "results.jsonl").write_text("\n".join(json.dumps(r) for r in _rows()) + "\n")
    return summarize(load_results([Path(run_dir)]))


@pytest.fixture(scope="module")
def libs():
    plt, sns = plotting()
    yield plt, sns
    plt.close("all")


def _axes_by_title(fig) -> dict[str, object]:
    return {ax.get_title().splitlines()[0]: ax for ax in fig.axes if ax.get_title()}


def test_every_config_gets_its_family_place_and_series(summary):
    configs = placed(summary).drop_duplicates(["dataset", "config_hash"]).set_index(["dataset", "label"])
    assert [configs.loc[("mixture-2d", f"vdm (log_weights_steps={t})"), "x"] for t in VDM] == list(VDM)
    assert configs.loc[("mixture-2d", "vdm (log_weights_steps=4)"), "family"] == DIFFUSION
    assert configs.loc[("mixture-2d", "hvae-L2"), ["family", "x", "series"]].tolist() == [HIERARCHY, 2.0, "hvae"]
    # one layer of a family that has deeper configs is a hierarchy of one layer; a vae has one layer
    assert configs.loc[("mixture-2d", "hvae-L1"), ["family", "x"]].tolist() == [HIERARCHY, 1.0]
    assert configs.loc[("digits", "vae"), ["family", "x", "series"]].tolist() == [ONE_LAYER, 1.0, "vae"]
    assert set(configs.loc["mixture-2d", "series"]) == {"vdm", "vdm-oracle", "hvae", "vae"}


def test_bound_vs_steps_draws_each_series_along_T_and_L_with_log_p(summary, libs):
    fig = bound_vs_steps(summary, *libs)
    axes = _axes_by_title(fig)
    # mixture-2d spans ~3 decades: symlog, and a linear zoom on its top below it; digits spans one: linear
    zoom_title = "mixture-2d, zoomed on the top 0.7 decades"
    assert sorted(axes) == ["digits", "mixture-2d", zoom_title]
    assert (axes["digits"].get_yscale(), axes[zoom_title].get_yscale()) == ("linear", "linear")
    assert axes[zoom_title].get_ylim()[0] < VDM[4] < LOG_P < axes[zoom_title].get_ylim()[1]
    ax = axes["mixture-2d"]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "symlog")
    lines = [(tuple(line.get_xdata()), tuple(line.get_ydata())) for line in ax.lines]
    assert (tuple(map(float, VDM)), tuple(VDM.values())) in lines  # the trained VDM's ELBO against T
    assert (tuple(map(float, VDM)), tuple(VDM_IWAE.values())) in lines  # its IWAE_50 against T
    assert ((1.0, 2.0), tuple(HVAE.values())) in lines  # the hierarchy's ELBO against L
    horizontal = {line.get_ydata()[0] for line in ax.lines if len(set(line.get_ydata())) == 1
                  and tuple(line.get_xdata()) == (0, 1)}
    assert {LOG_P, L_INF} <= horizontal  # log p(x) (exact) and the continuous-time L_inf
    assert "log p(x) = -1.7 (exact)" in ax.get_title()
    assert "best estimate: hvae-L2, IWAE-5000" in axes["digits"].get_title()
    low, high = ax.get_ylim()
    assert low < min(VDM.values()) and LOG_P < high < 0  # margins stay on the data's side of zero


def _bar_widths(ax) -> dict[str, list[float]]:
    names = [tick.get_text() for tick in ax.get_yticklabels()]
    widths: dict[str, list[float]] = {}
    for container in ax.containers:
        for patch in (p for p in container if hasattr(p, "get_width")):
            if not np.isnan(patch.get_width()):
                widths.setdefault(names[round(patch.get_y() + patch.get_height() / 2)], []).append(patch.get_width())
    return widths


def test_gap_is_each_configs_own_reference_minus_its_bounds(summary, libs):
    # Never another model's log p(x): a config without an estimate of its own (vae, hvae on the mixture, whose
    # only bound is the ELBO) has no bar; the VDM at each T is measured against its own IWAE-50, the oracle
    # against its exact log p(x). ELBO_inf bounds the continuous-time model, not the T-step one: no bar.
    fig = gap(summary, *libs)
    axes = _axes_by_title(fig)
    ax = axes["mixture-2d"]
    names = [tick.get_text() for tick in ax.get_yticklabels()]
    assert names == ["vdm T=1 [IWAE-50]", "vdm T=2 [IWAE-50]", "vdm T=4 [IWAE-50]", "vdm-oracle T=4 [exact]"]
    widths = _bar_widths(ax)
    assert widths["vdm T=2 [IWAE-50]"] == pytest.approx([VDM_IWAE[2] - VDM[2]])
    assert widths["vdm-oracle T=4 [exact]"] == pytest.approx([LOG_P - (-2.0)])
    digits = _bar_widths(axes["digits"])  # each model's own IWAE-5000 estimate
    assert set(digits) == {"vae [IWAE-5000]", "hvae L=2 [IWAE-5000]"}
    assert digits["hvae L=2 [IWAE-5000]"] == pytest.approx([DIGITS_LOGP["hvae-L2"] - (HVAE[2] - 16.0)])
    assert digits["vae [IWAE-5000]"] == pytest.approx([DIGITS_LOGP["vae"] - (VAE - 16.0)])


def test_kl_profile_is_T_times_the_step_kl_at_the_step_middles(summary, libs):
    fig = kl_layers(summary, *libs)
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(axes) == {"mixture-2d: vdm, KL per step", "mixture-2d: hvae, KL per layer",
                         "digits: hvae, KL per layer"}  # one-layer vae and the one-layer oracle rows: no panel
    profile = axes["mixture-2d: vdm, KL per step"]
    assert profile.get_yscale() == "log"
    lines = {len(line.get_xdata()): line for line in profile.lines}
    for t in (2, 4):  # T = 1 has one step: a lone point
        x, y = lines[t].get_xdata(), lines[t].get_ydata()
        assert list(x) == pytest.approx([(i + 0.5) / t for i in range(t)])
        assert list(y) == pytest.approx([t * (i + 1) / t**2 for i in range(t)])  # the top layer z_T left out
    depth = axes["mixture-2d: hvae, KL per layer"]
    # a bar per layer (layers are categories): the L = 2 config's bars sit within their layer's slot
    bars = [c for c in depth.containers if type(c).__name__ == "BarContainer" and len(c.patches) == 2]
    centers = [patch.get_x() + patch.get_width() / 2 for patch in bars[0].patches]
    assert [round(c) for c in centers] == [1, 2] and all(abs(c - round(c)) < 0.4 for c in centers)
    assert [patch.get_height() for patch in bars[0].patches] == [1.0, 0.5]


def _timed(model: str, config: dict, seed: int, k: int, value: float, wall_s: float | None,
           timing_s: list[float] | None) -> dict:
    """A throughput row as bench writes it: value samples/s at the median (wall_s) of the timed calls (timing_s)."""
    row = _reports_row("digits", model, config, seed, "iwae", k, "throughput", value, None, unit="samples/s")
    return {**row, "wall_s": wall_s, "timing_s": timing_s, "schema_version": 3}


def test_throughput_draws_the_median_and_iqr_of_the_timed_calls_on_shared_axes(tmp_path, libs):
    # vae at K=5, two seeds, 20 samples a call (1000 samples/s at a 0.02 s median): the calls ran at 20 / t =
    # 2000, 1000, 500 (seed 0) and 800, 1000, 1600 samples/s (seed 1). Pooled and sorted: 500 800 1000 1000 1600
    # 2000; quartiles by linear interpolation at positions 1.25, 2.5, 3.75: 850, 1000, 1450.
    rows = [_timed("vae", {}, 0, 5, 1000.0, 0.02, [0.01, 0.02, 0.04]),
            _timed("vae", {}, 1, 5, 1000.0, 0.02, [0.025, 0.02, 0.0125]),
            # iwae: a row written before rows carried timing_s (no spread to draw), and one with its calls
            _timed("iwae", {"k": 5}, 0, 5, 4000.0, None, None),
            _timed("iwae", {"k": 5}, 0, 50, 30000.0, 0.1, [0.1, 0.1, 0.1])]
    summary = summarize(load_results([_write_run(tmp_path / "run", rows)]))
    vae = summary[(summary["label"] == "vae") & (summary["kind"] == "throughput")].iloc[0]
    assert [vae["q1"], vae["q2"], vae["q3"]] == pytest.approx([850.0, 1000.0, 1450.0])
    fig = throughput(summary, *libs)
    axes = _axes_by_title(fig)
    # the widest spread of a panel in its title: (1450 - 850) / 1000 = 60% for the vae; the iwae's calls at K=50
    # took equal times: 0%
    assert fig.axes[1].get_title() == "digits: vae\nIQR up to 60% of the median"
    assert fig.axes[0].get_title() == "digits: iwae\nIQR up to 0% of the median"
    container = axes["digits: vae"].containers[0]
    data_line, _, (bars,) = container.lines
    assert list(data_line.get_ydata()) == pytest.approx([1000.0])  # the median of the six calls
    assert [list(segment[:, 1]) for segment in bars.get_segments()] == [pytest.approx([850.0, 1450.0])]
    iwae_line, _, (iwae_bars,) = axes["digits: iwae"].containers[0].lines
    assert list(iwae_line.get_ydata()) == pytest.approx([4000.0, 30000.0])  # no calls recorded at K=5: its value
    assert [list(s[:, 1]) for s in iwae_bars.get_segments()] == [pytest.approx([4000.0] * 2),
                                                                 pytest.approx([30000.0] * 2)]
    # one scale for every panel, so heights compare across models
    assert axes["digits: vae"].get_ylim() == axes["digits: iwae"].get_ylim()
    assert axes["digits: vae"].get_yscale() == "log"


def test_bound_vs_steps_says_why_it_is_not_drawn_when_no_model_varies_T_or_L(tmp_path, libs):
    # As in the default suite: every model at one place on the axis (vae L=1, hvae L=2, vdm T=4): isolated points
    # answer nothing about steps, so no figure; the reason names each place.
    kept = [r for r in _rows() if r["label"] in ("vae", "hvae-L2", "vdm (log_weights_steps=4)")]
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_text("\n".join(json.dumps(r) for r in kept) + "\n")
    skipped = bound_vs_steps(summarize(load_results([run])), *libs)
    assert isinstance(skipped, NotDrawn)
    assert "(each sits at one place: hvae L=2, vdm T=4)" in skipped.reason and "bound_vs_k and gap" in skipped.reason
    page = html_page([], {}, None, {}, None, summary=None, flags={}, provenance=[], seed_note="",
                     not_drawn={"bound_vs_steps": skipped.reason})
    assert "<b>bound_vs_steps</b> is not drawn: no model of these runs" in page
    assert "<a href=\"#p-bound-vs-steps\">bound_vs_steps</a>" in page  # the contents link to the reason


def test_bound_vs_steps_legend_names_the_one_layer_square(summary, libs):
    fig = bound_vs_steps(summary, *libs)  # the steps suite: vae at L = 1 beside the hvae's and vdm's lines
    labels = [text.get_text() for legend in fig.legends for text in legend.get_texts()]
    assert "one-layer model (at L = 1)" in labels
