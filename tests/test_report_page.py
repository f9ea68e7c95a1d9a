"""The report page's trust flags, its atomic writing, and its LaTeX; the browser checks are in test_report_browser."""
from __future__ import annotations

import math
import os
import shutil
import subprocess

import pytest

import reports
from reports import build as build_module
from reports.cells import summarize
from reports.flags import axis_labels, flags_by_label, trust_flags
from reports.load import load_results
from tests.test_reports import _row, diffusion_rows, digits_rows, write_run

DIGITS_DIMS = 64


def flagged_rows() -> list[dict]:
    """digits_rows plus: a vdm below the uniform model with ESS about 1 and a k-hat share, and a vae training curve
    still rising at its end (a train row valid_elbo/<step> per recorded step)."""
    rows = digits_rows()
    config = {"steps": 8, "time": "discrete"}
    rows.append(_row("digits", "vdm", config, 0, "elbo", 1, "elbo", -940.0, 2.0))
    rows.append(_row("digits", "vdm", config, 0, "iwae", 50, "iwae", -900.0, 2.0))
    rows.append(_row("digits", "vdm", config, 0, "iwae", 50, "ess", 1.02, None, unit="samples"))
    rows.append(_row("digits", "vdm", config, 0, "iwae", 50, "khat_share", 0.25, None, unit="share"))
    # a tenth of the vae's examples above k-hat 0.7: under UNRELIABLE_SHARE (0.2), so no weights flag
    rows.append(_row("digits", "vae", {}, 0, "iwae", 50, "khat_share", 0.1, None, unit="share"))
    for step, value in ((0, -60.0), (100, -35.0), (200, -31.0)):  # 4 nats in 100 steps: 8 more in 200
        row = _row("digits", "vae", {}, 0, "train", None, f"valid_elbo/{step}", value, None)
        rows.append({**row, "split": "train", "cell_id": "digits/vae/0/train"})
    for step, value in ((0, -60.0), (100, -29.0), (200, -28.9)):  # 0.1 nats more in 200 steps: converged
        row = _row("digits", "iwae", {"k": 5}, 0, "train", None, f"valid_elbo/{step}", value, None)
        rows.append({**row, "split": "train", "cell_id": "digits/iwae/0/train"})
    return rows + diffusion_rows()


def wide_rows() -> list[dict]:
    """flagged_rows plus what makes the digits table as wide as the default suite's (about 20 columns): IWAE at
    K = 1, 500 and 5000, a 2-layer hvae with a KL and active-unit column per layer, and the digits vdm's active units
    skipped (not applicable: no posterior means)."""
    rows = flagged_rows()
    # the vae's IWAE_5000 (-28.55) stays below the iwae's IWAE_50 (-28.50): the tightest bound is unchanged
    for model, config, bounds in (("vae", {}, ((1, -30.25), (500, -28.56), (5000, -28.55))),
                                  ("iwae", {"k": 5}, ((1, -30.0),))):
        rows += [_row("digits", model, config, seed, "iwae", k, "iwae", value, 0.27)
                 for seed in (0, 1) for k, value in bounds]
    hvae = {"n_layers": 2}
    rows += [_row("digits", "hvae", hvae, 0, "elbo", 1, "elbo", -31.25, 0.25),
             _row("digits", "hvae", hvae, 0, "iwae", 5000, "iwae", -29.85, 0.24),
             _row("digits", "hvae", hvae, 0, "kl_terms", 1, "kl/z1", 2.275, 0.043),
             _row("digits", "hvae", hvae, 0, "kl_terms", 1, "kl/z2", 0.0233, 0.0014),
             _row("digits", "hvae", hvae, 0, "active_units", None, "active_units/z1", 14, None, unit="count"),
             _row("digits", "hvae", hvae, 0, "active_units", None, "active_units/z2", 0, None, unit="count")]
    rows.append(_row("digits", "vdm", {"steps": 8, "time": "discrete"}, 0, "active_units", None, "active_units", None,
                     None, status="skipped", error="DiffusionModel has no posterior means"))
    return rows


def test_flags_are_computed_from_the_rows(tmp_path):
    results = load_results([write_run(tmp_path / "run", flagged_rows())])
    summary = summarize(results)
    flags = flags_by_label(trust_flags(results, summary), summary)
    vdm = dict(flags[("digits", "vdm")])
    # -940 < -64 log 2 = -44.36: below a model giving every binary image the same probability
    assert f"{-DIGITS_DIMS * math.log(2):.1f}" in vdm["below uniform"] and "IWAE_50 -900.0" in vdm["below uniform"]
    assert "25% of examples" in vdm["weights"]  # k-hat share found before the ESS; one weights flag per model
    rose = "validation ELBO rose 4.00 nats over the last 100 of 200 steps"
    assert dict(flags[("digits", "vae")]) == {"not converged": rose}  # no weights flag at a 10% k-hat share
    assert ("digits", "iwae") not in flags  # its curve is flat at the end
    raw = trust_flags(results, summary)
    failed = raw[raw["flag"] == "failed"]
    # the T=1 vdm's ELBO failed: flagged, though no table row holds it (the failed cells section does); its skipped
    # active units (not applicable: no posterior means) are no reason for distrust and are not counted
    assert list(failed["config_hash"]) == ["h-vdm-steps1-timediscrete"]
    assert failed["detail"].iloc[0] == "1 cell(s) failed: elbo"
    assert set(raw["flag"]) == {"weights", "below uniform", "not converged", "failed"}  # no flag for a skip
    # rows below the uniform model (or with ESS about 1) never set the axes; a not-converged one does
    assert axis_labels(summary, flags, "digits") == {"iwae", "vae"}


def test_page_shows_flags_summary_definitions_and_settings(tmp_path):
    run = write_run(tmp_path / "run", flagged_rows())
    reports.build_report([run], formats=["html", "md"], out_dir=tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    summary = page[page.index("id=\"summary\""):page.index("<nav>")]
    # the tightest digits bound is iwae's IWAE_50: mean of -28.4 and -28.6
    assert "Tightest bound: <b>iwae</b> IWAE_50 = -28.50" in summary
    assert "below uniform" in summary and "not converged" in summary
    for term in ("gap", "log p(x) from", "AU", "samples/s", "stderr vs mc_stderr", "k-hat", "ESS", "BDMC"):
        assert f"<dt>{term}" in page or f", {term}</dt>" in page or f"{term}</dt>" in page, term
    assert "training steps" in page and "K grid" in page
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| vdm (weights, below uniform) |" in md


@pytest.mark.slow  # 4 s: two whole reports with plots
def test_a_crash_while_writing_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", digits_rows())
    out = tmp_path / "out"
    reports.build_report([run], formats=["html"], out_dir=out)
    before = (out / "report.html").read_bytes()

    def half_then_crash(path, text):  # the writer dies after writing half of the new page
        def write(f):
            f.write(b"<!DOCTYPE html> half a page")
            raise OSError("disk gone")
        build_module.write_atomic(path, write)

    monkeypatch.setattr(build_module, "_write", half_then_crash)
    with pytest.raises(OSError, match="disk gone"):
        reports.build_report([write_run(tmp_path / "run2", flagged_rows())], formats=["html"], out_dir=out)
    assert (out / "report.html").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]  # no temporary file left behind


def _pdflatex() -> str:
    found = shutil.which("pdflatex")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("no pdflatex under CI: .ci/run installs it (apt-get install texlive-latex-recommended)")
        pytest.skip("no TeX installation (pdflatex; apt-get install texlive-latex-recommended) to compile with")
    return found


def test_latex_tables_compile(tmp_path):
    """The report's LaTeX tables (bold in math mode, a not-applicable dash, a wide table in parts) compile in a
    document with booktabs, with no LaTeX error."""
    pdflatex = _pdflatex()
    reports.build_report([write_run(tmp_path / "run", wide_rows())], formats=["tex"], out_dir=tmp_path)
    body = (tmp_path / "report.tex").read_text()
    # the cases under test are in it: bold, the vdm's three active-unit cells not applicable (after its three empty
    # KL cells), the digits table in parts
    assert "$\\mathbf{" in body and "vdm &  &  &  & -- & -- & -- &" in body and "digits (test), diagnostics" in body
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n"
                                      f"{body}\n\\end{{document}}\n")
    done = subprocess.run([pdflatex, "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-2000:]
    assert (tmp_path / "doc.pdf").read_bytes()[:5] == b"%PDF-"
    assert "! " not in done.stdout, done.stdout[-2000:]  # a LaTeX error line, even one it ran past


def test_latex_bold_is_inside_math_mode(tmp_path):
    reports.build_report([write_run(tmp_path / "run", digits_rows())], formats=["tex"], out_dir=tmp_path)
    tex = (tmp_path / "report.tex").read_text()
    assert "$\\mathbf{" in tex and "\\textbf{$" not in tex and "\\toprule" in tex


def test_one_label_naming_different_models_in_two_runs(tmp_path):
    """Two runs whose suites gave the label "model-a" to a vae and to an iwae: two rows, each named by its model,
    and the plots draw (they crashed drawing one label's two ELBOs at one K)."""
    vae = [{**r, "label": "model-a"} for r in digits_rows() if r["model"] == "vae"]
    iwae = [{**r, "label": "model-a", "run_id": "run-2"} for r in digits_rows() if r["model"] == "iwae"]
    runs = [write_run(tmp_path / "a", vae), write_run(tmp_path / "b", iwae)]
    written = reports.build_report(runs, formats=["md", "png"], out_dir=tmp_path / "out")
    assert {"bound_vs_k.png", "gap.png"} <= {p.name for p in written}
    md = (tmp_path / "out" / "report.md").read_text()
    # the vae's seeds give ELBO -30.0 and -31.0: mean -30.50 (test_reports' digits_rows)
    assert "| model-a (vae) | 2 | -30.50 ± 0.59 |" in md and "| model-a (iwae) | 2 |" in md
