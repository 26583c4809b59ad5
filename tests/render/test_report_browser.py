"""report.html in a real headless browser: it loads offline with no console message and shows every figure.

Chromium prints every console message (errors, CSP violations, uncaught exceptions) to stderr as ``:CONSOLE``
lines with ``--enable-logging=stderr``; the page's own inline script counts the images that decoded and writes
the count into the DOM, which ``--dump-dom`` returns. Without chromium the test skips, except under CI (env CI
set), where it fails: CI installs chromium and must run this check.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradscope.render import report as R
from gradscope import schema as S

CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium() -> str:
    for c in CANDIDATES:
        found = shutil.which(c)
        if found:
            return found
    message = f"no headless browser found (tried {', '.join(CANDIDATES)}); install it with apt-get install chromium"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def open_in_browser(page: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """(DOM after load, console lines) of a page opened from disk with the network unreachable."""
    proc = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--proxy-server=127.0.0.1:9", "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    return proc.stdout, console


def check_counts(dom: str) -> tuple[int, int]:
    m = re.search(r'id="gradscope-check"[^>]*data-images="(\d+)"[^>]*data-loaded="(\d+)"', dom)
    assert m, "the page's check script did not run: " + dom[-500:]
    return int(m.group(1)), int(m.group(2))


def study_frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    parts = []
    for run, nb, ff in (("plain20", 9, 0.6), ("resnet20-bn", 9, 1.1), ("resnet56-bn", 27, 1.05)):
        k = np.tile(np.arange(nb), 4)
        for m in (S.ACT_VAR, S.GRAD_NORM):
            parts.append(pd.DataFrame({S.STEP: np.repeat(np.arange(4), nb), S.BLOCK: [f"layer.{j}" for j in k],
                                       S.DEPTH: k, S.KIND: "BasicBlock", S.METRIC: m,
                                       S.VALUE: ff ** k * np.exp(rng.normal(0, 0.1, k.size)), S.CALL: 0,
                                       S.RUN: run}))
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    return R.write_report(study_frame(), tmp_path_factory.mktemp("browser") / "report")


def test_report_html_loads_offline_without_console_errors_and_shows_every_figure(report_dir, tmp_path):
    dom, console = open_in_browser(report_dir / R.HTML, tmp_path)
    assert console == []
    n_png = len(list(report_dir.glob("*.png")))
    assert n_png == 6  # heatmap, runs, profile for act_var and grad_norm; param_grad_norm missing
    assert check_counts(dom) == (n_png, n_png)
    assert "All 6 figures loaded." in dom
    assert "param_grad_norm is not in the frame" in dom
    # the page opens with the claims section, and its interactive charts were drawn by the inlined plotly.js
    assert 'id="claims"' in dom and dom.index('id="claims"') < dom.index('id="figures"')
    charts = re.search(r'data-charts="(\d+)"', dom)
    assert charts and int(charts.group(1)) == 2  # per-block factor over training, forward and backward


def test_the_browser_check_catches_a_broken_figure(report_dir, tmp_path):
    """Control: corrupt one embedded figure and the same check reports it (so the test above can fail)."""
    page = (report_dir / R.HTML).read_text()
    broken = re.sub(r'(<img [^>]*src="data:image/png;base64,)[^"]{0,40}', r'\1AAAA', page, count=1)
    (tmp_path / "broken.html").write_text(broken + "<script>console.error('planted')</script>")
    dom, console = open_in_browser(tmp_path / "broken.html", tmp_path)
    images, loaded = check_counts(dom)
    assert (images, loaded) == (6, 5)
    assert any("planted" in ln for ln in console)


def test_missing_browser_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium"):
        chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        chromium()
