"""A study's alerts, found after the fact from its frame and losses, equal those a live scope raised."""
from __future__ import annotations

import pandas as pd

from gradscope import schema as S
from gradscope.study.alerts import COLUMNS, study_alerts
from tests.engine.test_alert_runs import train


def _as_study(scope, run):
    frame = scope.frame().assign(run=run)
    losses = pd.DataFrame([(run, s, v) for s, v in scope.losses().items()], columns=[S.RUN, S.STEP, "loss"])
    return frame, losses


def test_replay_equals_the_live_alerts(one_thread):
    spiked = train(120, lr=lambda step: 30.0 if step == 100 else 0.1)
    nan = train(20, nan_at=7)
    frames, losses = zip(_as_study(spiked, "spike"), _as_study(nan, "nan"))
    got = study_alerts(pd.concat(frames, ignore_index=True), pd.concat(losses, ignore_index=True))
    assert list(got.columns) == list(COLUMNS)
    for run, scope in (("spike", spiked), ("nan", nan)):
        live = scope.alerts()
        replay = got[got.run == run].drop(columns="run").reset_index(drop=True)
        assert len(live) >= 1
        pd.testing.assert_frame_equal(replay, live)


def test_no_runs_no_alerts():
    assert study_alerts(pd.DataFrame(), pd.DataFrame()).empty
