"""The anomaly detectors on hand-made series: known z-scores, which block an alert names, one alert per episode."""
from __future__ import annotations

import math

import pytest

from gradscope.engine.alertlog import check_handler
from gradscope.engine.alerts import (ALERT_KINDS, Alert, AlertRules, Detector, divergence, robust_z,
                                     update_band)
from gradscope.errors import GradscopeError

BLOCKS = ("a", "b", "c", "d")  # forward order: depth 0..3


def grad_rows(step, norms, call=0):
    return [(step, b, d, call, "grad_norm", v) for d, (b, v) in enumerate(zip(BLOCKS, norms))]


def test_robust_z_known_answer():
    z, med, scale = robust_z([1.0, 2.0, 3.0, 4.0, 5.0], 9.0, rel_floor=0.0)
    assert med == 3.0 and scale == pytest.approx(1.4826)  # MAD of 1..5 is 1
    assert z == pytest.approx(6.0 / 1.4826)
    # a constant history has MAD 0: the floor (a fraction of the median) keeps a 1 % wobble from being 'infinite'
    z, _, scale = robust_z([2.0] * 10, 2.02, rel_floor=0.02)
    assert scale == pytest.approx(0.04) and z == pytest.approx(0.5)


def test_loss_spike_fires_once_at_the_spike_step_and_never_for_a_falling_loss():
    det = Detector(AlertRules(window=10, warmup=5, z=6.0))
    losses = [2.0 - 0.01 * s + 0.005 * (-1) ** s for s in range(30)]
    losses[10] = 0.2  # a sudden drop is training going well, not an alert
    losses[20] = 9.0
    losses[21] = 8.0  # still high: the same episode
    alerts = [a for s, v in enumerate(losses) for a in det.observe([], [(s, v)])]
    assert [(a.step, a.kind, a.block, a.metric) for a in alerts] == [(20, "loss_spike", None, "loss")]
    window = losses[10:20]
    med = sorted(window)[4:6]
    assert alerts[0].value == 9.0 and sum(med) / 2 < alerts[0].threshold < 9.0


def test_no_spike_before_warmup():
    det = Detector(AlertRules(window=10, warmup=8))
    alerts = [a for s, v in enumerate([1.0] * 7 + [100.0]) for a in det.observe([], [(s, v)])]
    assert alerts == []


def test_grad_spike_names_the_block_nearest_the_loss():
    det = Detector(AlertRules(window=10, warmup=5))
    alerts = []
    for step in range(12):
        jitter = 1.0 + 0.01 * (step % 3)
        norms = [0.1 * jitter, 0.2 * jitter, 0.3 * jitter, 0.4 * jitter]
        if step == 10:  # the spike starts at block c and reaches every block before it, not d
            norms = [10.0, 20.0, 30.0, 0.4]
        alerts += det.observe(grad_rows(step, norms))
    assert len(alerts) == 1
    alert = alerts[0]
    assert (alert.step, alert.kind, alert.block, alert.value) == (10, "grad_spike", "c", 30.0)
    assert alert.others == ("b", "a")
    assert 0.3 < alert.threshold < 30.0
    assert "grad_spike at step 10" in str(alert) and "'c'" in str(alert)


def test_grad_spike_ignores_later_micro_batches():
    det = Detector(AlertRules(window=10, warmup=5))
    alerts = []
    for step in range(10):
        alerts += det.observe(grad_rows(step, [1.0] * 4) + grad_rows(step, [1e6 if step == 8 else 1.0] * 4, call=1))
    assert alerts == []


def test_divergence_names_the_earliest_forward_block_and_fires_once_per_episode():
    det = Detector()
    rows = lambda step, bad: [(step, b, d, 0, "act_nonfinite", float(bad and d >= 1)) for d, b in enumerate(BLOCKS)]
    alerts = []
    for step, bad in enumerate([False, True, True, True, False, True]):
        alerts += det.observe(rows(step, bad) + [(step, "d", 3, 0, "grad_norm", math.nan if bad else 1.0)])
    assert [(a.step, a.block) for a in alerts] == [(1, "b"), (5, "b")]
    assert alerts[0].metric == "act_nonfinite" and alerts[0].others == ("c", "d")


def test_divergence_in_backward_only_names_the_block_nearest_the_loss():
    rows = [(0, b, d, 0, "grad_norm", math.inf if d <= 2 else 1.0) for d, b in enumerate(BLOCKS)]
    alert = divergence(0, rows, loss=1.0)
    assert (alert.block, alert.metric, alert.others) == ("c", "grad_norm", ("b", "a"))
    assert divergence(3, [], loss=math.nan).block is None
    assert divergence(3, rows[3:], loss=2.0) is None


def test_a_non_finite_loss_with_finite_activations_is_the_origin_not_the_last_block():
    """A NaN target (or 0/0 in a weighted mean) makes the loss NaN and every gradient after it: the alert named the
    block nearest the loss with its grad_in_norm, never the loss. The step computes the loss before the backward,
    so the loss is named, with the blocks its NaN reached."""
    rows = [(0, b, d, 0, m, math.nan) for d, b in enumerate(BLOCKS) for m in ("grad_norm", "grad_in_norm")]
    rows += [(0, b, d, 0, "act_var", 1.0) for d, b in enumerate(BLOCKS)]
    alert = divergence(0, rows, loss=math.nan)
    assert (alert.block, alert.metric) == (None, "loss") and alert.others == ("d", "c", "b", "a")
    # a finite loss: the backward's first NaN, and at one block its output gradient before its input gradient
    alert = divergence(0, [(0, "c", 2, 0, "grad_in_norm", math.nan), (0, "c", 2, 0, "grad_norm", math.nan)], loss=1.0)
    assert (alert.block, alert.metric) == ("c", "grad_norm")


def test_with_a_grad_scaler_overflowing_gradients_are_not_a_divergence():
    rows = [(0, "a", 0, 0, "grad_norm", math.inf), (0, "a", 0, 0, "param_grad_norm", math.inf)]
    assert divergence(0, rows, loss=1.0, gradients=False) is None
    assert divergence(0, rows + [(0, "b", 1, 0, "act_nonfinite", 2.0)], loss=1.0, gradients=False).block == "b"
    assert divergence(0, rows, loss=math.inf, gradients=False).metric == "loss"
    assert divergence(0, rows, loss=1.0).block == "a"


def test_update_band_names_the_earliest_block_out_of_band():
    rows = [(4, b, d, 0, "update_ratio", v) for d, (b, v) in enumerate(zip(BLOCKS, [1e-3, 0.5, 1e-7, 0.2]))]
    alert = update_band(4, rows, (1e-5, 1e-1))
    assert (alert.block, alert.value, alert.threshold, alert.others) == ("b", 0.5, 0.1, ("c", "d"))
    assert "above 0.1" in str(alert)
    low = update_band(4, rows[2:3], (1e-5, 1e-1))
    assert low.threshold == 1e-5 and "below" in str(low)
    assert update_band(4, rows[:1], (1e-5, 1e-1)) is None
    assert update_band(4, rows, None) is None


def test_kinds_can_be_switched_off():
    det = Detector(AlertRules(kinds=("loss_spike",)))
    assert det.observe([(0, "a", 0, 0, "act_nonfinite", 3.0), (0, "a", 0, 0, "update_ratio", 5.0)]) == []


def test_alert_as_dict_is_flat():
    row = Alert(3, "update_band", "b", "update_ratio", 0.5, 0.1, ("c", "d")).as_dict()
    assert row == {"step": 3, "kind": "update_band", "block": "b", "metric": "update_ratio", "value": 0.5,
                   "threshold": 0.1, "others": "c d", "origin": "", "note": ""}


@pytest.mark.parametrize("bad, word", [({"window": 2}, "window"), ({"warmup": 50}, "warmup"), ({"z": 0}, "z="),
                                       ({"update_band": (0.1, 0.01)}, "update_band"),
                                       ({"kinds": ("spike",)}, "spike")])
def test_rules_reject_bad_values_naming_them(bad, word):
    with pytest.raises(GradscopeError, match=word):
        AlertRules(**bad)


def test_handler_is_checked():
    assert check_handler("warn") == "warn" and check_handler(None) is None and check_handler(print) is print
    with pytest.raises(GradscopeError, match="on_anomaly='loud'"):
        check_handler("loud")
    assert set(ALERT_KINDS) == {"loss_spike", "grad_spike", "update_band", "divergence"}
