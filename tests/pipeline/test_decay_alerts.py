"""update_band alerts say in words when weight decay alone drives a block's update (the gradient contributes
nothing): the ratio equals lr x wd x (1 - momentum^(t+1)) / (1 - momentum)."""
from __future__ import annotations

from pathlib import Path

import pytest

import gradscope
from gradscope.engine.alerts import AlertRules, Detector, decay_only_ratio
from gradscope.schema import UPDATE_BAND, UPDATE_RATIO

TASKS = Path(__file__).resolve().parents[1] / "fixtures" / "tasks.py"


def test_the_decay_only_ratio_by_hand():
    assert decay_only_ratio(0.01, 1e-4, 0.9) == pytest.approx(1e-5)  # the steady state
    assert decay_only_ratio(0.01, 1e-4, 0.9, step=0) == pytest.approx(1e-6)  # the momentum buffer is empty
    assert decay_only_ratio(0.01, 1e-4, 0.9, step=1) == pytest.approx(1.9e-6)
    assert decay_only_ratio(0.01, 0.0, 0.9) is None


def test_a_block_without_gradient_is_named_as_driven_by_weight_decay():
    results = gradscope.profile(model=f"{TASKS}:dead_branch", input_shape=(6,), seeds=[0], steps=3, every=1,
                                init_batches=1, batch_size=8, train_size=32)
    alerts = results.alerts[results.alerts.kind == UPDATE_BAND]
    # below the band from the first step; reported once three recorded steps in a row (band_patience) confirm it
    assert list(alerts.block) == ["dead"] and list(alerts.step) == [2]
    # lr 0.01 x wd 1e-4 x (1 + 0.9 + 0.81) as the momentum buffer fills
    assert alerts.value.iloc[0] == pytest.approx(decay_only_ratio(0.01, 1e-4, 0.9, step=2), rel=0.02)
    assert "the gradient contributes nothing" in alerts.note.iloc[0]
    assert "since step 0" in alerts.note.iloc[0]


def test_an_update_ratio_the_gradient_makes_gets_no_such_note():
    rows = [(5, "a", 0, 0, UPDATE_RATIO, 6e-6)]  # out of band, but 1.4x what weight decay alone gives at step 5
    now = AlertRules(band_patience=1)  # one step out of the band is enough here
    alert = Detector(now, decay=(0.01, 1e-4, 0.9)).observe(rows)[0]
    assert alert.kind == UPDATE_BAND and alert.note == ""
    exact = [(5, "a", 0, 0, UPDATE_RATIO, decay_only_ratio(0.01, 1e-4, 0.9, step=5))]
    assert "weight decay drives it" in str(Detector(now, decay=(0.01, 1e-4, 0.9)).observe(exact)[0])
