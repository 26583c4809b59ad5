"""Progress that works when piped: a line per run and per interval on stderr, and a final line that is not the last
run's name."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from gradscope.pipeline.progress import Bar, Lines, reporter

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests" / "fixtures" / "tasks.py"


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_lines_say_each_run_and_every_interval():
    out, clock = io.StringIO(), FakeClock()
    lines = Lines(out, interval=30, clock=clock)
    lines.start(total=100, runs=2)
    lines.run("a-s0")
    clock.now += 10
    lines.step("train", 20)  # 10 s since the last line: quiet
    clock.now += 30
    lines.step("train", 30)  # 40 s: a line with the time left (50 passes in 40 s, 50 to go)
    lines.run("a-s1")
    lines.step("train", 50)
    lines.close()
    text = out.getvalue().splitlines()
    assert text[0] == "gradscope: profiling 2 run(s), 100 forward/backward passes"
    assert text[1] == "gradscope: run 1/2 a-s0 started; 0/100 passes (0%), 0s elapsed"
    assert text[2] == "gradscope: 50/100 passes (50%), 40s elapsed, ~40s left"
    assert text[3].startswith("gradscope: run 2/2 a-s1 started; 50/100")
    assert text[4] == "gradscope: done: 100/100 passes (100%), 40s elapsed" and len(text) == 5


def test_no_time_left_is_guessed_from_the_first_passes():
    """Start-up and the longest runs (started first) make the first rates wrong by hours: no estimate before 5%."""
    out, clock = io.StringIO(), FakeClock()
    lines = Lines(out, interval=30, clock=clock)
    lines.start(total=3600, runs=24)
    clock.now += 40
    lines.step("init", 2)  # 2 passes in 40 s: a naive estimate would say ~20h left
    clock.now += 1000
    lines.step("train", 400)  # 402 of 3600 (11%) in 1040 s: now an estimate
    text = out.getvalue().splitlines()
    assert text[1] == "gradscope: 2/3600 passes (0%), 40s elapsed"
    assert text[2].startswith("gradscope: 402/3600 passes (11%), 17m20s elapsed, ~2h17m left")


def test_the_bar_ends_as_done_not_as_the_last_run():
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    bar = Bar(console)
    bar.start(total=4, runs=2)
    for name in ("first-s0", "last-s0"):
        bar.run(name)
        bar.step("init", 2)
    bar.close()
    assert bar.bar.tasks[0].description == "done: 2 runs"


def test_auto_picks_lines_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(reporter(True), Lines) and reporter(None) is None and reporter(False) is None


def test_a_profile_piped_to_a_file_prints_progress_lines(tmp_path):
    """As in CI or under nohup: stderr is a file, and it still says what runs and when it is done."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "log.txt"
    with open(log, "w") as handle:
        code = subprocess.call([sys.executable, "-m", "gradscope", "profile", "--model", f"{TASKS}:lm",
                                "--seeds", "0,1", "--steps", "2", "--init-batches", "1", "--batch-size", "4",
                                "--format", "records", "--out", str(tmp_path / "out")],
                               stdout=handle, stderr=handle, env=env, timeout=600)
    text = log.read_text()
    assert code == 0, text
    assert "gradscope: run 1/2 lm-s0 started" in text and "gradscope: run 2/2 lm-s1 started" in text
    assert "gradscope: done: 6/6 passes (100%)" in text
    assert text.index("gradscope: done:") < text.index("gradscope: writing the report folder")  # not silent after
    assert "\x1b[" not in text  # no terminal control codes in a file
