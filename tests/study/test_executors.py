"""Study execution: Ray gives the local pool's results value for value; a killed study resumes without running its
finished runs again; resuming under other settings is refused."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from gradscope.data import synthetic
from gradscope.errors import GradscopeError
from gradscope.study.executors import finished_dir
from gradscope.study.runs import Settings, run_study
from gradscope.study.specs import RunSpec

SETTINGS = Settings(steps=4, batch_size=8, every=2, init_batches=1, image_size=8, workers=2)
SPECS = [RunSpec(model="plain20", family="plain", depth=20, residual=False, seed=0),
         RunSpec(model="resnet20", family="resnet", depth=20, residual=True, seed=1)]


def train_set():
    return synthetic(n_train=64, n_test=1, image_size=8, seed=0)[0]


def canonical(frame: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("run", "phase", "step", "block", "call", "metric") if c in frame.columns]
    return frame.sort_values(keys).reset_index(drop=True)


def test_ray_equals_the_local_pool(tmp_path):
    import ray  # noqa: F401  (the [ray] extra is part of the test extra: a missing Ray fails here, not skips)

    local = run_study(SPECS, train_set(), SETTINGS, out=tmp_path / "local")
    ran = []
    remote = run_study(SPECS, train_set(), SETTINGS, out=tmp_path / "ray", executor="ray",
                       on_run=lambda spec: ran.append(spec.name))
    assert sorted(ran) == sorted(s.name for s in SPECS) and not remote.failed and not remote.interrupted
    pd.testing.assert_frame_equal(canonical(local.frame), canonical(remote.frame))
    pd.testing.assert_frame_equal(local.losses, remote.losses)
    assert local.configs == remote.configs
    for spec in SPECS:  # records streamed into the folder by the Ray workers
        assert list((tmp_path / "ray" / "records" / spec.name).glob("**/part-*.parquet"))


def test_an_unknown_executor_is_refused():
    with pytest.raises(GradscopeError, match="executor='dask'"):
        run_study(SPECS, train_set(), SETTINGS, executor="dask")


SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from gradscope.data import synthetic
    from gradscope.study.runs import Settings, run_study
    from gradscope.study.specs import RunSpec
    out = Path(sys.argv[1])
    settings = Settings(steps=4, batch_size=8, every=2, init_batches=1, image_size=8, workers=1)
    specs = [RunSpec(model="plain20", family="plain", depth=20, residual=False, seed=0),
             RunSpec(model="resnet20", family="resnet", depth=20, residual=True, seed=1)]

    def slow_second(spec):
        if spec.name == specs[1].name:
            time.sleep(600)  # killed here, after the first run finished

    run_study(specs, synthetic(n_train=64, n_test=1, image_size=8, seed=0)[0], settings, out=out,
              on_run=slow_second)
""")


def test_a_killed_study_resumes_without_running_finished_runs_again(tmp_path, one_thread):
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(out)], env=env)
    first, second = (s.name for s in SPECS)
    deadline = time.time() + 300
    while not (finished_dir(out, first) / "result.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the first run never finished"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not finished_dir(out, second).exists()
    settings = Settings(steps=4, batch_size=8, every=2, init_batches=1, image_size=8, workers=1)
    ran = []
    resumed = run_study(SPECS, train_set(), settings, out=out, resume=True, on_run=lambda s: ran.append(s.name))
    assert ran == [second]  # the finished run is loaded, not run again
    fresh = run_study(SPECS, train_set(), settings)
    pd.testing.assert_frame_equal(canonical(resumed.frame), canonical(fresh.frame), check_exact=False, rtol=1e-5)
    pd.testing.assert_frame_equal(resumed.losses, fresh.losses, check_exact=False, rtol=1e-5)
    assert set(resumed.configs) == {first, second}
    # resuming the same folder with other settings would mix two studies: refused, naming what differs
    with pytest.raises(GradscopeError, match="steps"):
        run_study(SPECS, train_set(), Settings(steps=5, batch_size=8, every=2, init_batches=1, image_size=8,
                                               workers=1), out=out, resume=True)


def test_resume_needs_a_folder():
    with pytest.raises(GradscopeError, match="out="):
        run_study(SPECS, train_set(), SETTINGS, resume=True)


def test_a_study_into_a_folder_holding_another_studys_records_is_refused(tmp_path, one_thread):
    """`gradscope profile --out DIR` into a folder that held another study mixed that study's runs into the new one's
    frame (counted as seeds of it) without a word; now the study stops before it runs, naming the runs there."""
    out = tmp_path / "study"
    one = Settings(steps=2, batch_size=8, every=1, init_batches=1, image_size=8, workers=1)
    run_study(SPECS[:1], train_set(), one, out=out)
    with pytest.raises(GradscopeError, match=r"already holds the records of a study \(runs plain20-bn-s0\)"):
        run_study(SPECS[1:], train_set(), one, out=out)
    assert sorted(p.name for p in (out / "records").iterdir()) == ["plain20-bn-s0"]
    resumed = run_study(SPECS, train_set(), one, out=out, resume=True)  # the same folder, on purpose: resumed
    assert sorted(resumed.frame["run"].unique()) == ["plain20-bn-s0", "resnet20-bn-s1"]


def test_a_run_stopped_after_it_recorded_runs_again_from_its_start_on_resume(tmp_path, one_thread):
    """A run killed or stopped mid-way leaves its streamed parts but no snapshot. Resuming used to stop the whole
    study on that run ("already holds the records of another run"); now its partial records are replaced by a
    fresh run's, and the finished run is left as it was."""
    import shutil

    from gradscope import store

    settings = Settings(steps=4, batch_size=8, every=2, init_batches=1, image_size=8, workers=1)
    out = tmp_path / "study"
    fresh = run_study(SPECS, train_set(), settings, out=out)
    first, second = (s.name for s in SPECS)
    shutil.rmtree(finished_dir(out, second))  # as if killed before its snapshot: its records stay
    kept = {p: p.stat().st_mtime_ns for p in (out / "records" / first).rglob("*.parquet")}
    ran = []
    resumed = run_study(SPECS, train_set(), settings, out=out, resume=True, on_run=lambda s: ran.append(s.name))
    assert ran == [second] and not resumed.failed
    assert {p: p.stat().st_mtime_ns for p in (out / "records" / first).rglob("*.parquet")} == kept
    pd.testing.assert_frame_equal(canonical(resumed.frame), canonical(fresh.frame), check_exact=False, rtol=1e-5)
    streamed = store.load(out / "records" / second / "train")
    assert len(streamed) == len(fresh.frame[(fresh.frame["run"] == second) & (fresh.frame["phase"] == "train")])
    assert (finished_dir(out, second) / "result.json").is_file()
