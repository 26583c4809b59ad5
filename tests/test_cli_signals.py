"""Ctrl-C and SIGTERM on a real ``gradscope profile`` process, at several points of each phase.

The CLI's handler only sets a flag; the study stops at its next safe point (after a step), so a signal can never
cut the writing of a part in two. Whatever the moment: exit 130 (or death by SIGTERM), no row in two parts, and
every row streamed to disk is in the report's records.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import gradscope
from gradscope.cli import EXIT_INTERRUPTED

FIXTURE = Path(__file__).parent / "fixtures" / "user_models.py"
KEY = ["step", "block", "call", "metric"]
OPTIONS = {"train": ["--steps", "1000000", "--init-batches", "1"],
           "init": ["--steps", "1", "--init-batches", "1000000"]}


def _start(out: Path, phase: str, parts: int, delay: float) -> subprocess.Popen:
    """A profile that only a signal can end, once ``parts`` parts of ``phase`` are on disk and ``delay`` later."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "gradscope", "profile", "--model", f"{FIXTURE}:tiny",
                             "--input-shape", "3,8,8", "--train-size", "64", "--batch-size", "8", "--quiet",
                             "--every", "1", "--out", str(out), *OPTIONS[phase]],
                            env=env, stderr=subprocess.PIPE, text=True)
    folder = out / "records" / "tiny-s0" / phase
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(folder.glob("part-*.parquet"))) < parts:
        time.sleep(0.02)
    time.sleep(delay)
    assert proc.poll() is None, proc.communicate()[1]
    return proc


def _check_records(out: Path, phase: str) -> None:
    parts = sorted((out / "records" / "tiny-s0" / phase).glob("part-*.parquet"))
    on_disk = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    assert not on_disk.duplicated(KEY).any(), f"rows in two parts: {[p.name for p in parts]}"
    report = pd.read_parquet(out / "records.parquet")
    report = report[report["run"] == "tiny-s0"] if "run" in report.columns else report
    streamed = set(on_disk[KEY].itertuples(index=False, name=None))
    assert streamed <= set(report[KEY].itertuples(index=False, name=None)), "a streamed row missing from the report"
    assert not report.duplicated(KEY).any()
    loaded = gradscope.load(out)
    assert len(loaded) >= len(on_disk)


@pytest.mark.parametrize("phase, parts, delay", [("init", 1, 0.0), ("init", 3, 0.1), ("train", 1, 0.03),
                                                  ("train", 2, 0.15)])
def test_ctrl_c_anywhere_keeps_each_row_once_and_exits_130(tmp_path, phase, parts, delay):
    proc = _start(tmp_path, phase, parts, delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err and "duplicate rows" not in err, err
    _check_records(tmp_path, phase)


def test_sigterm_in_the_initialisation_keeps_each_row_once_and_dies_of_it(tmp_path):
    proc = _start(tmp_path, "init", 2, 0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGTERM, err
    assert "Traceback" not in err and "duplicate rows" not in err, err
    _check_records(tmp_path, "init")


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    """The first signal waits for the safe point; a second one (a step that hangs) does not wait."""
    proc = _start(tmp_path, "train", 1, 0.0)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err
    # a second signal may land anywhere (even in the report's writing): the parts still hold each row once
    parts = sorted((tmp_path / "records" / "tiny-s0" / "train").glob("part-*.parquet"))
    assert parts, "no training part on disk: the first signal came after one"
    assert not pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True).duplicated(KEY).any()
