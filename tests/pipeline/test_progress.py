"""Progress that works when piped: a line per run and per interval on stderr, and a final line that is not the last
run's name."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from gradscope.pipeline.progress import Bar, Lines, Work, reporter

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


def test_the_time_left_weighs_each_runs_passes_by_their_cost():
    """The default study runs its 56-layer nets first, whose passes cost about three times a 20-layer one's: counted
    in passes, the first estimates were about 1.8 times too long. Weighed by the plan's costs, a deep run done in
    56 s leaves the shallow run's 20 s, where passes alone say 56 s."""
    out, clock = io.StringIO(), FakeClock()
    lines = Lines(out, interval=5, clock=clock)
    lines.start(total=200, runs=2, plan={"deep-s0": (100, 56.0), "shallow-s0": (100, 20.0)})
    lines.run("deep-s0")
    clock.now += 56  # 0.56 s per deep pass
    lines.step("train", 100, "deep-s0")
    clock.now += 10  # 50 shallow passes at 0.2 s each
    lines.step("train", 50, "shallow-s0")
    text = out.getvalue().splitlines()
    assert text[2] == "gradscope: 100/200 passes (50%), 56s elapsed, ~20s left"
    assert text[3] == "gradscope: 150/200 passes (75%), 1m06s elapsed, ~10s left"


def test_unplanned_passes_count_at_the_mean_cost_and_no_estimate_comes_early():
    work = Work(100, {"a": (50, 10.0), "b": (50, 30.0)})
    assert work.add(2, "elsewhere") == 2 * 20.0 and work.left(5.0) is None  # 40 of 2000 work: under 5%
    assert work.add(48, "b") == 48 * 30.0
    assert work.left(30.0) == 30.0 * (2000 - 1480) / 1480
    work.add(50, "a")
    assert work.left(60.0) is None  # every pass done: nothing is guessed
    # passes beyond the plan (a total larger than the planned runs) are in the total work at the mean cost, so
    # the planned runs done leave their share still to do, never "0s left"
    wider = Work(150, {"a": (50, 10.0), "b": (50, 30.0)})
    assert wider.work_total == 2000 + 50 * 20.0
    wider.add(50, "a")
    wider.add(50, "b")
    assert wider.left(100.0) == 100.0 * 1000 / 2000


def test_the_bar_advances_by_work_and_counts_passes():
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    bar = Bar(console)
    bar.start(total=4, runs=2, plan={"deep-s0": (2, 56.0), "shallow-s0": (2, 20.0)})
    bar.run("deep-s0")
    bar.step("init", 2, "deep-s0")
    task = bar.bar.tasks[0]
    assert task.completed == 112.0 and task.total == 152.0 and task.fields["passes"] == 2
    bar.close()


def test_a_users_reporter_gets_the_plain_calls_and_every_pass(tmp_path):
    """``progress=`` an object of the user's: start(total, runs), run(name), step(phase, n) and close(interrupted),
    with no plan or run names it was not written for; its passes add up to the total."""
    import gradscope

    class Mine:
        def __init__(self):
            self.calls = []

        def start(self, total, runs):
            self.calls.append(("start", total, runs))

        def run(self, name):
            self.calls.append(("run", name))

        def step(self, phase, n):
            self.calls.append(("step", phase, n))

        def close(self, interrupted):
            self.calls.append(("close", interrupted))

    mine = Mine()
    gradscope.profile(model=f"{TASKS}:lm", seeds=[0, 1], steps=3, init_batches=2, batch_size=4, progress=mine)
    assert mine.calls[0] == ("start", 10, 2) and mine.calls[-1] == ("close", False)
    assert [c[1] for c in mine.calls if c[0] == "run"] == ["lm-s0", "lm-s1"]
    assert sum(c[2] for c in mine.calls if c[0] == "step") == 10


def test_a_built_in_study_plans_each_run_by_its_depth_and_a_resumed_run_is_left_out(tmp_path, one_thread):
    """The plan the reporter gets: each run's passes and depth; on --resume only the runs still to do, and their
    passes add up to the new total (a finished run's passes used to stay in it, so the bar never reached 100%)."""
    import shutil

    import gradscope

    options = dict(models=["plain"], depths=[8, 14], bn="on", seeds=[0], steps=2, init_batches=1, batch_size=4,
                   train_size=16,
                   image_size=8, workers=1, format="records", out=tmp_path / "out")
    first = Lines(io.StringIO(), clock=FakeClock())
    gradscope.profile(progress=first, **options)
    assert first.work.plan == {"plain8-bn-s0": (3, 8.0), "plain14-bn-s0": (3, 14.0)}
    assert first.work.done == 6 and first.work.work_done == first.work.work_total == 66.0
    shutil.rmtree(tmp_path / "out" / "records" / "plain14-bn-s0" / "finished")
    again = Lines(io.StringIO(), clock=FakeClock())
    gradscope.profile(progress=again, resume=True, **options)
    assert again.work.plan == {"plain14-bn-s0": (3, 14.0)} and again.work.done == again.work.total == 3
    text = again.stream.getvalue()
    assert "profiling 1 run(s), 3 forward/backward passes" in text and "resuming: 1 of 2 run(s) finished before" in text
    assert "done: 3/3 passes (100%)" in text


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
