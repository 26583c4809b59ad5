"""Alerts against ordinary training noise: what must stay silent (small-batch loss tails, smooth gradient rises,
learning-rate warm-up and decay) beside the faults that must still fire (a corrupt batch after a fast early fall,
a spike that lasts, a learning rate too small at its reference, Adam's first step named as such)."""
from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from torch import nn

import gradscope
from gradscope.engine.alerts import AlertRules, Detector, OptimizerStep, robust_z
from gradscope.engine.optwatch import first_adaptive, learning_rates
from gradscope.schema import GRAD_NORM, GRAD_SPIKE, LOSS_SPIKE, UPDATE_BAND, UPDATE_RATIO


def loss_alerts(losses, rules=AlertRules()):
    det = Detector(rules)
    return [a for s, v in enumerate(losses) for a in det.observe([], [(s, v)])]


def grad_alerts(norms, rules=AlertRules()):
    det = Detector(rules)
    return [a for s, v in enumerate(norms) for a in det.observe([(s, "b", 0, 0, GRAD_NORM, v)])]


def heavy_tailed_losses(steps, seed=0):
    """Batch losses of a classifier at batch 8: most batches near 0.5, about one in eight holds a confidently wrong
    example that lifts the batch loss 2-5x (the mean of eight per-example losses, one of them large)."""
    rng = random.Random(seed)
    return [0.5 * math.exp(rng.gauss(0, 0.08)) + (rng.uniform(0.6, 2.0) if rng.random() < 0.125 else 0.0)
            for _ in range(steps)]


def test_recurring_heavy_tail_of_small_batches_is_learned_and_a_real_spike_still_fires():
    losses = heavy_tailed_losses(300)
    big = [s for s, v in enumerate(losses) if v > 2.0 * sorted(losses)[150]]
    assert len(big) > 25  # the noise itself is several times the median, often
    # the plain rule (robust z > 6 against the last 20 losses) calls a fifth of the run's batches a spike
    plain = [s for s in range(10, 300) if robust_z(losses[s - 20 if s >= 20 else 0:s], losses[s], 0.02)[0] > 6]
    assert len(plain) > 25
    fired = [a.step for a in loss_alerts(losses)]
    assert len(fired) <= 2, fired  # at most the first of its tail's new heights
    spiked = list(losses)
    spiked[250] = 30 * sorted(losses)[150]  # a real fault: 30x the median loss in one step
    assert [a.step for a in loss_alerts(spiked)] == fired + [250]


def test_normal_noise_keeps_the_plain_z_bar():
    rng = random.Random(1)
    losses = [1.0 + 0.05 * rng.gauss(0, 1) for _ in range(200)]
    losses[150] = 1.0 + 0.05 * 7.5  # 7.5 standard deviations: above z = 6 and nothing else in the way
    assert [a.step for a in loss_alerts(losses)] == [150]


def test_a_smooth_rise_of_gradient_norms_is_not_a_spike_but_a_jump_is():
    flat = [0.0076 * (1 + 0.02 * math.sin(s)) for s in range(15)]
    rising = flat + [flat[-1] * 1.06 ** k for k in range(1, 30)]  # x5.4 over 29 steps, 6% a step
    assert grad_alerts(rising) == []
    jumped = flat + [flat[-1] * 1.06 ** k for k in range(1, 12)] + [flat[-1] * 1.06 ** 11 * 4]
    alerts = grad_alerts(jumped)
    assert [(a.step, a.kind) for a in alerts] == [(len(jumped) - 1, GRAD_SPIKE)]


def test_a_gradient_rise_below_min_factor_never_fires():
    steady = [1.0 + 0.001 * (s % 2) for s in range(20)]
    assert grad_alerts(steady + [1.4]) == []  # z is huge on a flat series, but 1.4x is ordinary drift
    assert [a.step for a in grad_alerts(steady + [1.6])] == [20]
    assert [a.step for a in grad_alerts(steady + [1.4], AlertRules(min_factor=1.0))] == [20]


def test_a_lasting_spike_is_one_episode_even_when_it_dips():
    losses = [0.5 + 0.01 * (s % 3) for s in range(20)] + [18.3, 12.0, 14.0, 19.5, 16.8, 14.8, 11.6] + [0.5] * 5
    assert [a.step for a in loss_alerts(losses)] == [20]  # before: 20 and again at 23, which topped the window


def test_a_corrupt_batch_after_a_fast_early_fall_fires():
    losses = [35.4, 29.9, 25.1, 17.6, 10.5, 6.28, 4.91, 4.47, 2.87, 1.84, 1.86, 1.34, 1.75, 1.39, 1.24, 1.01, 0.703,
              0.721, 0.865, 0.842, 0.895, 0.699, 1.01, 0.706, 6.92, 0.703, 0.565]
    # before: hidden, because the window still held the first losses (10.5 > 6.92)
    assert [a.step for a in loss_alerts(losses)] == [24]


def train(opt_name="sgd", lr=0.05, schedule=None, steps=60, init_scale=1.0):
    """A small classifier trained for ``steps``; ``schedule(step) -> factor`` set by hand (no ``initial_lr``) or a
    torch scheduler (``"warmup-decay"``: LambdaLR from 0 up over 10 steps, then linearly down to 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(32, 64), nn.GELU()), nn.Sequential(nn.Linear(64, 64), nn.GELU()),
                          nn.Linear(64, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(init_scale)
    opt = (torch.optim.AdamW(model.parameters(), lr=lr) if opt_name == "adamw" else
           torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    sched = None
    if schedule == "warmup-decay":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: s / 10 if s < 10 else max(0.0, (steps - s) / (steps - 10)))
    g = torch.Generator().manual_seed(0)
    rule = torch.randn(32, 4, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradscope.attach(model, optimizer=opt) as scope:
            for step in range(steps):
                if callable(schedule):
                    for group in opt.param_groups:
                        group["lr"] = lr * schedule(step)
                x = torch.randn(64, 32, generator=g)
                loss = nn.functional.cross_entropy(model(x), (x @ rule).argmax(1))
                loss.backward()
                scope.step(loss=loss)
                opt.step()
                if sched is not None:
                    sched.step()
                opt.zero_grad()
    return scope


@pytest.mark.parametrize("how", ["warmup-decay", "hand-warmup", "hand-cosine"])
def test_learning_rate_schedules_are_not_a_band_alert(one_thread, how):
    schedule = {"warmup-decay": "warmup-decay",
                "hand-warmup": lambda s: min(1.0, (s + 1) / 150),
                "hand-cosine": lambda s: 0.5 * (1 + math.cos(math.pi * s / 60))}[how]
    scope = train("adamw" if how == "warmup-decay" else "sgd", lr=1e-3 if how == "warmup-decay" else 0.05,
                  schedule=schedule)
    frame = scope.frame()
    ratios = frame[frame.metric == UPDATE_RATIO]
    assert (ratios.value < 1e-5).any()  # the schedule does take ratios below the band's low end (or to 0)
    assert len(scope.alerts()) == 0, scope.alerts().to_string()


def test_a_learning_rate_too_small_even_at_its_reference_fires_with_the_reason(one_thread):
    # the schedule's reference lr (the largest so far) is itself far too small: still an alert, after three steps
    scope = train("sgd", lr=1e-6, schedule=lambda s: 1.0 if s < 5 else 0.5, steps=12)
    band = scope.alerts()
    band = band[band.kind == UPDATE_BAND]
    assert list(band.step) == [2] and band.value.iloc[0] < 1e-5
    assert "since step 0" in band.note.iloc[0]
    rows = [(7, "a", 0, 0, UPDATE_RATIO, 2e-6)]  # at half the reference lr: 4e-6 at the reference, still below
    alert = Detector(AlertRules(band_patience=1)).observe(rows, optimizer_steps={7: OptimizerStep(5e-7, 0.5)})[0]
    assert "reference learning rate" in alert.note and "4e-06" in alert.note
    # at a tenth of the reference the same ratio is 2e-5 there: inside the band, no alert
    assert Detector(AlertRules(band_patience=1)).observe(rows, optimizer_steps={7: OptimizerStep(1e-7, 0.1)}) == []


def test_adam_first_step_is_named_in_the_note_and_sgd_is_not(one_thread):
    adam = train("adamw", lr=0.02, steps=3, init_scale=0.05).alerts()
    first = adam[adam.kind == UPDATE_BAND]
    assert list(first.step) == [0] and first.value.iloc[0] > 0.1
    assert "first step of an Adam-type optimizer" in first.note.iloc[0]
    sgd = train("sgd", lr=20.0, steps=2).alerts()
    big = sgd[sgd.kind == UPDATE_BAND]
    assert list(big.step) == [0] and "Adam" not in big.note.iloc[0]


def test_learning_rates_and_first_adaptive_read_the_optimizer():
    w = nn.Parameter(torch.ones(3))
    sgd = torch.optim.SGD([w], lr=0.1)
    assert learning_rates(sgd) == (0.1, 0.0) and not first_adaptive(sgd)
    torch.optim.lr_scheduler.OneCycleLR(sgd, max_lr=1.0, total_steps=10)  # starts at max_lr / 25
    lr, reference = learning_rates(sgd)
    assert lr == pytest.approx(0.04) and reference == 1.0
    adam = torch.optim.Adam([w], lr=1e-3)
    assert first_adaptive(adam)
    w.grad = torch.ones(3)
    adam.step()
    assert not first_adaptive(adam)


def test_rules_check_the_new_knobs():
    with pytest.raises(gradscope.GradscopeError, match="min_factor"):
        AlertRules(min_factor=0.5)
    with pytest.raises(gradscope.GradscopeError, match="band_patience"):
        AlertRules(band_patience=0)
    assert LOSS_SPIKE in AlertRules().kinds
