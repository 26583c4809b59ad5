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
    import sys, time
    from gradscope.study.parallel import run_parallel
    from tests.fixtures.chatty_jobs import Settings, Spec, chatty_job

    steps, started = [], []

    def on_run(spec):
        started.append(spec.name)
        if sys.argv[1] == "interrupt" and len(started) == 2:  # Ctrl-C once both runs are training
            raise KeyboardInterrupt

    if __name__ == "__main__":
        t = time.monotonic()
        done, failed, interrupted = run_parallel(chatty_job, [Spec("a"), Spec("b")], None, Settings(), None, 2,
                                                 lambda phase, n: steps.append(n), on_run)
        print(sorted(done), {k: v[2] for k, v in sorted(done.items())}, failed, interrupted, len(steps),
              round(time.monotonic() - t))
""")


@pytest.mark.parametrize("mode", ["interrupt", "finish"])
def test_a_study_stopped_while_workers_still_send_progress_exits_with_their_results(mode, tmp_path):
    """Each worker sends about 1.2 MB of progress. Interrupted, the study used to stop reading it and wait for the
    workers, which waited (at exit) to flush that progress into a full pipe: the command hung for ever. Now it
    returns both runs' results; run to the end, every progress message arrives."""
    script = tmp_path / "study.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, str(script), mode], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # hung: TimeoutExpired
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("['a', 'b'] {'a': {'run': 'a'}, 'b': {'run': 'b'}} {} ")
    *_, interrupted, steps, _seconds = line.split(" ")
    assert interrupted == str(mode == "interrupt")
    if mode == "finish":
        assert int(steps) == 2 * 20000
