"""The local worker pool (study/parallel.py): an interrupted study returns what its runs recorded and exits, however
much progress the workers had sent that nobody will now read."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys
    from gradscope.study.parallel import run_parallel
    from tests.fixtures import chatty_jobs
    from tests.fixtures.chatty_jobs import Settings, Spec

    steps, started = [], []

    def on_run(spec):
        started.append(spec.name)
        if sys.argv[1] == "interrupt" and len(started) == 2:  # Ctrl-C once both runs are training
            raise KeyboardInterrupt

    if __name__ == "__main__":
        job = chatty_jobs.quick_job if sys.argv[1] == "quick" else chatty_jobs.chatty_job
        done, failed, interrupted = run_parallel(job, [Spec("a"), Spec("b")], None, Settings(), None, 2,
                                                 lambda phase, n, run: steps.append(n), on_run)
        print(sorted(done), {k: v[2] for k, v in sorted(done.items())}, failed, interrupted, sum(steps))
""")


@pytest.mark.parametrize("mode", ["interrupt", "finish", "quick"])
def test_a_study_stopped_while_workers_still_send_progress_exits_with_their_results(mode, tmp_path):
    """Each worker sends about 1.2 MB of progress. Interrupted, the study used to stop reading it and wait for the
    workers, which waited (at exit) to flush that progress into a full pipe: the command hung for ever. Now it
    returns both runs' results; run to the end, every step's progress arrives. ``quick``: runs that report 20,000
    steps through the batching ``on_step`` and end at once, so their results overtake their last messages: the
    steps reported still add up, from the counts the results carry."""
    script = tmp_path / "study.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, str(script), mode], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # hung: TimeoutExpired
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("['a', 'b'] {'a': {'run': 'a'}, 'b': {'run': 'b'}} {} ")
    *_, interrupted, steps = line.split(" ")
    assert interrupted == str(mode == "interrupt")
    if mode != "interrupt":
        assert int(steps) == 2 * 20000


QUIET = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from gradscope.study.parallel import run_parallel
    from tests.fixtures import chatty_jobs
    from tests.fixtures.chatty_jobs import Settings, Spec

    out = Path(sys.argv[1])
    polls = []

    def poll():  # the CLI's stop check: a SIGTERM came once both runs are under way
        polls.append(1)
        if all((out / f"started-{name}").exists() for name in "ab"):
            raise KeyboardInterrupt

    if __name__ == "__main__":
        start = time.monotonic()
        done, failed, interrupted = run_parallel(chatty_jobs.quiet_job, [Spec("a"), Spec("b")], None, Settings(),
                                                 out, 2, lambda phase, n, run: None, None, poll)
        print(sorted(done), failed, interrupted, round(time.monotonic() - start, 1), len(polls))
""")


def test_a_stop_asked_while_no_run_reports_steps_is_seen_within_a_poll(tmp_path):
    """Two runs that report no step for 20 s (building a net, writing records): the stop check ran only when
    progress arrived, so a SIGTERM waited for the runs to end on their own. Now the pool polls it every 0.2 s and
    the study stops with both runs' results within seconds."""
    script = tmp_path / "quiet.py"
    script.write_text(QUIET)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names, failed, interrupted, seconds, polls = proc.stdout.strip().splitlines()[-1].rsplit(" ", 4)
    assert names == "['a', 'b']" and failed == "{}" and interrupted == "True", proc.stdout
    assert float(seconds) < 18 and int(polls) >= 1  # the runs alone take 20 s after starting


def test_progress_is_batched_and_adds_up_to_the_steps_run(monkeypatch):
    from gradscope.study import parallel

    class Sent(list):
        put = list.append

    sent = Sent()
    monkeypatch.setattr(parallel, "_QUEUE", sent)
    progress = parallel._Progress("plain20-bn", interval=3600.0)
    progress("init", 1)  # the first step goes at once: the study learns the run started
    assert sent == [("plain20-bn", "init", 1)]
    progress("init", 1)
    for _ in range(300):
        progress("train", 1)  # a new phase sends what the last one held
    progress.flush()
    assert sent == [("plain20-bn", "init", 1), ("plain20-bn", "init", 1), ("plain20-bn", "train", 300)]
    assert progress.totals == {"init": 2, "train": 300}  # sent or not: what the run's result carries back
    every = parallel._Progress("x", interval=0.0)  # no batching: one message per call
    sent.clear()
    for _ in range(3):
        every("train", 2)
    every.flush()
    assert sent == [("x", "train", 2)] * 3
