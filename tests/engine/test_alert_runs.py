"""Alerts on real training runs: built-in faults fire the right kind at the right step and block; a healthy run is
silent. A small MLP (4 Linear+Tanh blocks and a head) learns a fixed linear rule from fresh batches."""
from __future__ import annotations

import math
import warnings

import pandas as pd
import pytest
import torch
from torch import nn

import gradscope
import gradscope.store
from gradscope import AlertRules, AnomalyError

BLOCKS = ["0", "1", "2", "3", "4"]
RULE = torch.randn(20, 5, generator=torch.Generator().manual_seed(123))


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    hidden = [nn.Sequential(nn.Linear(20 if i == 0 else 32, 32), nn.Tanh()) for i in range(4)]
    return nn.Sequential(*hidden, nn.Linear(32, 5))


def train(steps, lr=lambda step: 0.1, nan_at=None, give_loss=True, **options):
    """Train ``mlp()`` for ``steps`` SGD steps with learning rate ``lr(step)``; returns the scope (detached)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr(0))
    g = torch.Generator().manual_seed(1)
    if nan_at is not None:  # inside block "2": its output is the first to carry the NaN
        step_of = {"now": 0}
        model[2][0].register_forward_hook(
            lambda m, i, out: out * math.nan if step_of["now"] == nan_at else None)
    options.setdefault("on_nonfinite", "ignore")
    with gradscope.attach(model, blocks=BLOCKS, optimizer=opt, **options) as scope:
        for step in range(steps):
            if nan_at is not None:
                step_of["now"] = step
            for group in opt.param_groups:
                group["lr"] = lr(step)
            x = torch.randn(32, 20, generator=g)
            loss = nn.functional.cross_entropy(model(x), (x @ RULE).argmax(1))
            loss.backward()
            scope.step(loss=loss if give_loss else None)
            opt.step()
            opt.zero_grad()
    return scope


def test_healthy_run_is_silent(one_thread):
    scope = train(200)
    assert scope.frame().step.nunique() == 200
    assert len(scope.alerts()) == 0, scope.alerts().to_string()


def test_learning_rate_spike(one_thread):
    scope = train(130, lr=lambda step: 30.0 if step == 100 else 0.1)
    alerts = scope.alerts()
    assert alerts.step.min() == 100  # nothing before the fault
    first = alerts.groupby("kind").first()
    # the spiked update happens at step 100; the next forward (step 101) sees the damaged weights
    assert (first.loc["update_band", "step"], first.loc["update_band", "block"]) == (100, "0")
    assert first.loc["update_band", "value"] > first.loc["update_band", "threshold"] == 0.1
    assert first.loc["loss_spike", "step"] == 101 and pd.isna(first.loc["loss_spike", "block"])
    assert first.loc["grad_spike", "step"] == 101
    assert first.loc["grad_spike", "block"] == "4"  # the block nearest the loss: where a backward spike starts
    frame = scope.frame()
    loss_alert = alerts[alerts.kind == "loss_spike"].iloc[0]
    assert loss_alert.value > loss_alert.threshold > 0
    grad_alert = alerts[alerts.kind == "grad_spike"].iloc[0]
    recorded = frame[(frame.step == 101) & (frame.block == "4") & (frame.metric == "grad_norm")].value.item()
    assert grad_alert.value == pytest.approx(recorded)


def test_nan_injected_at_one_block_names_that_block(one_thread):
    scope = train(60, nan_at=40)
    alerts = scope.alerts()
    assert list(alerts.kind) == ["divergence"]  # one alert for the episode, though every later step is NaN
    alert = alerts.iloc[0]
    assert (alert.step, alert.block, alert.metric) == (40, "2", "act_nonfinite")
    assert alert.others.split() == ["3", "4"]


@pytest.mark.parametrize("lr, bound", [(1e-7, 1e-5), (5.0, 1e-1)])
def test_update_ratio_band(one_thread, lr, bound):
    scope = train(4, lr=lambda step: lr)
    alerts = scope.alerts()
    band = alerts[alerts.kind == "update_band"]
    # one alert per episode: the lr stays out of the band; above it fires at once, below it after band_patience (3)
    # recorded steps in a row, naming the step it started
    at_step = 0 if lr > 1 else AlertRules().band_patience - 1
    assert list(band.step) == [at_step]
    first = band.iloc[0]
    assert first.threshold == bound
    assert ("since step 0" in first.note) == (lr < 1)
    frame = scope.frame()
    ratios = frame[(frame.step == at_step) & (frame.metric == "update_ratio")].sort_values("depth")
    outside = ratios[(ratios.value < 1e-5) | (ratios.value > 1e-1)]
    assert [first.block] + first.others.split() == list(outside.block)  # the earliest block out of the band first
    assert (first.value < bound) if bound == 1e-5 else (first.value > bound)
    at = lambda metric: frame[(frame.step == at_step) & (frame.block == first.block)
                              & (frame.metric == metric)].value.item()
    assert first.value == at("update_ratio")
    if lr > 1:  # plain SGD's first step moves theta by lr * grad: the ratio is lr * |grad| / |theta|
        assert first.value == pytest.approx(lr * at("param_grad_norm") / at("param_norm"), rel=1e-4)
    # (at lr 1e-7 float32 cannot even represent most of the update: the ratio is what was applied, not lr * |g|)


def test_band_is_configurable(one_thread):
    assert len(train(3, lr=lambda step: 1e-7, alert_rules=AlertRules(update_band=(1e-12, 1.0))).alerts()) == 0


def test_detection_can_be_switched_off(one_thread):
    scope = train(8, nan_at=3, alert_rules=AlertRules(kinds=()))
    assert len(scope.alerts()) == 0 and len(scope.losses()) == 8


def test_losses_are_those_of_recorded_steps(one_thread):
    scope = train(9, every=4)
    assert sorted(scope.losses()) == [0, 4, 8]


def test_loss_spike_needs_the_loss(one_thread):
    scope = train(110, lr=lambda step: 30.0 if step == 100 else 0.1, give_loss=False)
    assert "loss_spike" not in set(scope.alerts().kind)
    assert "grad_spike" in set(scope.alerts().kind)


def test_raise_stops_at_the_step_with_records_kept(one_thread):
    with pytest.raises(AnomalyError, match="divergence at step 5, block '2'"):
        train(10, nan_at=5, on_anomaly="raise")


def test_callable_and_warn(one_thread):
    got = []
    train(8, nan_at=3, on_anomaly=got.append)
    assert [(a.step, a.kind, a.block) for a in got] == [(3, "divergence", "2")]
    assert isinstance(got[0], gradscope.Alert)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(8, nan_at=3, on_anomaly="warn")
    assert any("gradscope alert: divergence at step 3" in str(w.message) for w in caught)


def test_alerts_written_beside_the_records(one_thread, tmp_path):
    scope = train(8, nan_at=3, out=tmp_path / "run")
    on_disk = gradscope.store.read_alerts(tmp_path / "run")
    assert on_disk.equals(scope.alerts())
    assert on_disk[["step", "kind", "block"]].values.tolist() == [[3, "divergence", "2"]]
    assert not list((tmp_path / "run").glob(".tmp-*"))
    assert len(gradscope.load(tmp_path / "run")) == len(scope.frame())


def test_bad_handler_is_refused():
    with pytest.raises(gradscope.GradscopeError, match="on_anomaly"):
        gradscope.attach(mlp(), on_anomaly="loudly")


def test_grad_scaler_overflow_is_not_a_divergence(one_thread):
    """fp16 autocast on the CPU with a GradScaler whose first scales overflow: the scaler skips those steps and
    lowers its scale, which is no divergence; gradscope still reports where the non-finite gradients were."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    g = torch.Generator().manual_seed(1)
    with gradscope.attach(model, blocks=BLOCKS, optimizer=opt, scaler=scaler, on_nonfinite="ignore") as scope:
        for _ in range(30):
            x = torch.randn(32, 20, generator=g)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), (x @ RULE).argmax(1))
            scaler.scale(loss).backward()
            scope.step(loss=loss)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    assert scaler.get_scale() < 2.0 ** 30  # steps were skipped
    assert scope.first_nonfinite()["backward"][0] == 0
    assert len(scope.alerts()) == 0, scope.alerts().to_string()
