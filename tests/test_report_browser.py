"""The report page in a real browser: headless Chromium (the distribution's package) at 1400 px.

The page runs its own checks when its URL ends in #selftest (reports.page.SCRIPT) and writes them as JSON into
<pre id=selftest>; Chromium's --dump-dom prints the DOM after the load event, and this test reads them back.
Skips without a browser; under CI (CI=true) a missing browser fails instead.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

import reports
from reports.page import selftest_findings
from tests.test_report_page import wide_rows
from tests.test_reports import write_run

WIDTH = 1400
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> str:
    found = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("no chromium under CI: .ci/run installs it (apt-get install chromium)")
        pytest.skip("no chromium installed (apt-get install chromium) to open the report in")
    return found


def _dump_dom(browser: str, url: str, tmp_path) -> str:
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--window-size={WIDTH},900", "--virtual-time-budget=5000",
                           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_report_in_headless_chromium(tmp_path):
    browser = _browser()
    run = write_run(tmp_path / "run", wide_rows())
    reports.build_report([run], formats=["html"], out_dir=tmp_path / "out")
    found = selftest_findings(_dump_dom(browser, (tmp_path / "out" / "report.html").as_uri() + "#selftest", tmp_path))
    assert found, "the page's selftest wrote nothing"
    # nothing overflows horizontally at 1400 px: not the page, and no table inside its scrolling box
    assert found["innerWidth"] == WIDTH and found["scrollWidth"] <= found["innerWidth"], found
    boxes = found["boxes"]
    assert len(boxes) >= 5 and any("digits" in box["id"] and "bounds" in box["id"] for box in boxes), boxes
    assert [box for box in boxes if box["scrollWidth"] > box["clientWidth"]] == [], boxes
    # every plot decoded
    assert len(found["images"]) >= 3 and all(image["naturalWidth"] > 0 for image in found["images"]), found["images"]
    # a click on a numeric column header sorted its rows ascending
    values = found["sorted"]["values"]
    assert len(set(values)) > 1 and values == sorted(values), found["sorted"]
    # the summary names each dataset's tightest bound: digits iwae's IWAE_50 (mean of -28.4, -28.6), mixture-2d the
    # continuous-time vdm's ELBO (-10.1, above the T=8 model's -10.25)
    assert "digitsTightest bound: iwae IWAE_50 = -28.50" in found["summary"]
    assert "mixture-2dTightest bound: vdm (steps=8, time=continuous) ELBO = -10.10" in found["summary"]
