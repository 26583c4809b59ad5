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
from gradscope.engine.lrschedule import first_adaptive, group_lr
from gradscope.schema import GRAD_NORM, GRAD_SPIKE, UPDATE_BAND, UPDATE_RATIO


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
    assert len(fired) <= 6 and max(fired) < 100, fired  # the first few, until its tail recurred five times
    spiked = list(losses)
    spiked[250] = 30 * sorted(losses)[150]  # a real fault: 30x the median loss in one step
    assert [a.step for a in loss_alerts(spiked)] == fired + [250]


def test_faults_that_fire_never_teach_the_series_that_they_are_noise():
    rng = random.Random(0)
    losses = [1.0 + 0.05 * rng.gauss(0, 1) for _ in range(400)]
    norms = [math.exp(rng.gauss(0, 0.1)) for _ in range(400)]
    for s in (100, 150, 200, 250):  # four isolated real faults
        losses[s], norms[s] = 30.0, 10.0
    assert [a.step for a in loss_alerts(losses)] == [100, 150, 200, 250]
    assert [a.step for a in grad_alerts(norms)] == [100, 150, 200, 250]


def test_long_skewed_loss_noise_fires_less_than_the_plain_rule():
    # batch losses of a classifier at batch 1 are about exponential: the plain robust z (> 6 against the last 20)
    # calls about 2 % of them spikes; these rules under 1 % over 2000 steps (and less than half as many)
    for seed in range(3):
        rng = random.Random(seed)
        losses = [rng.expovariate(math.log(2)) for _ in range(2000)]
        plain = sum(robust_z(losses[s - 20:s], losses[s], 0.02)[0] > 6 for s in range(20, 2000))
        ours = len(loss_alerts(losses))
        assert ours <= 0.01 * 2000 and ours < plain / 2, (ours, plain)


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


@pytest.mark.parametrize("sigma, rate", [(0.1, 1.3), (0.15, 1.3), (0.1, 1.5)])
def test_a_gradient_explosion_that_grows_by_a_factor_each_step_is_caught(sigma, rate):
    # noise of sd sigma in log space (0.12-0.23 in ordinary runs at batch 32), then x rate per step from step 60
    caught = []
    for seed in range(10):
        rng = random.Random(seed)
        norms = [math.exp(rng.gauss(0, sigma)) * rate ** max(0, s - 60) for s in range(85)]
        steps = [a.step for a in grad_alerts(norms)]
        assert not [s for s in steps if s < 60], steps  # nothing before it
        caught.append(steps[0] - 60 if steps else None)
    assert None not in caught and max(caught) <= 8, caught  # before the review: 15 of 20 seeds never fired


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


def train(opt_name="sgd", lr=0.05, schedule=None, steps=60, init_scale=1.0, head=None):
    """A small classifier trained for ``steps``; ``schedule(step) -> factor`` set by hand (no ``initial_lr``) or a
    torch scheduler: ``"warmup"`` (LambdaLR from 0 up over 10 steps), ``"warmup-decay"`` (then linearly down to
    0), ``"step-per-batch"`` (StepLR(5, 0.1) stepped every batch: the lr collapses). ``head``: ``(optimizer name,
    lr, warm-up steps)`` of a second optimizer for the last layer alone, warmed up by its own LambdaLR."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(32, 64), nn.GELU()), nn.Sequential(nn.Linear(64, 64), nn.GELU()),
                          nn.Linear(64, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(init_scale)
    body = model.parameters() if head is None else list(model[0].parameters()) + list(model[1].parameters())
    make = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "radam": torch.optim.RAdam}
    opts = [make[opt_name](body, lr=lr) if opt_name in make else torch.optim.SGD(body, lr=lr, momentum=0.9)]
    scheds = []
    if head is not None:
        name, head_lr, warm = head
        opts.append(make[name](model[2].parameters(), lr=head_lr) if name in make else
                    torch.optim.SGD(model[2].parameters(), lr=head_lr))
        scheds.append(torch.optim.lr_scheduler.LambdaLR(opts[1], lambda s: min(1.0, (s + 1) / warm)))
    if schedule == "warmup":
        scheds.append(torch.optim.lr_scheduler.LambdaLR(opts[0], lambda s: min(1.0, s / 10)))
    elif schedule == "warmup-decay":
        scheds.append(torch.optim.lr_scheduler.LambdaLR(
            opts[0], lambda s: s / 10 if s < 10 else max(0.0, (steps - s) / (steps - 10))))
    elif schedule == "zero-at-20":  # a schedule (or a bug) that sets the lr to 0 from step 20 on
        scheds.append(torch.optim.lr_scheduler.LambdaLR(opts[0], lambda s: 1.0 if s < 20 else 0.0))
    elif schedule == "step-per-batch":
        scheds.append(torch.optim.lr_scheduler.StepLR(opts[0], step_size=5, gamma=0.1))
    g = torch.Generator().manual_seed(0)
    rule = torch.randn(32, 4, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradscope.attach(model, optimizer=opts if len(opts) > 1 else opts[0]) as scope:
            for step in range(steps):
                if callable(schedule):
                    for group in opts[0].param_groups:
                        group["lr"] = lr * schedule(step)
                x = torch.randn(64, 32, generator=g)
                loss = nn.functional.cross_entropy(model(x), (x @ rule).argmax(1))
                loss.backward()
                scope.step(loss=loss)
                for opt in opts:
                    opt.step()
                for sched in scheds:
                    sched.step()
                for opt in opts:
                    opt.zero_grad()
    return scope


def band_alerts(scope):
    alerts = scope.alerts()
    return alerts[alerts.kind == UPDATE_BAND]


@pytest.mark.parametrize("how", ["warmup", "hand-warmup"])
def test_a_warm_up_is_not_a_band_alert(one_thread, how):
    schedule = "warmup" if how == "warmup" else (lambda s: min(1.0, (s + 1) / 150))
    scope = train("adamw" if how == "warmup" else "sgd", lr=1e-3 if how == "warmup" else 0.05, schedule=schedule)
    frame = scope.frame()
    ratios = frame[frame.metric == UPDATE_RATIO]
    assert (ratios.value < 1e-5).any()  # the warm-up does take ratios below the band's low end (or to 0)
    assert len(scope.alerts()) == 0, scope.alerts().to_string()


def test_a_decaying_tail_is_judged_as_it_is_and_the_note_says_what_the_lr_is(one_thread):
    # a cosine down to 1e-4 of the peak at step 50, held there: the last steps move the blocks less than 1e-5
    scope = train("sgd", lr=0.05, schedule=lambda s: max(0.5 * (1 + math.cos(math.pi * min(s, 50) / 50)), 1e-4))
    frame = scope.frame()
    low = frame[(frame.metric == UPDATE_RATIO) & (frame.value < 1e-5)]
    first_low = int(low.step.min())
    assert 40 < first_low < 55 and set(range(first_low, 60)) <= set(low.step)  # low from there to the end
    band = band_alerts(scope)
    assert list(band.step) == [first_low + 2]  # three recorded steps below in a row
    assert "of the largest it has been" in band.note.iloc[0] and f"since step {first_low}" in band.note.iloc[0]


def test_a_learning_rate_that_collapses_fires(one_thread):
    # StepLR(5, 0.1) stepped per batch instead of per epoch: the lr falls 10x every 5 steps
    band = band_alerts(train("sgd", lr=0.05, schedule="step-per-batch", steps=40))
    assert len(band) == 1 and band.step.iloc[0] < 25 and band.value.iloc[0] > 0
    # an lr dropped by hand (a bug) from 0.05 to 1e-9 at step 20: fires three recorded steps later
    band = band_alerts(train("sgd", lr=0.05, schedule=lambda s: 1.0 if s < 20 else 2e-8, steps=30))
    assert list(band.step) == [22] and band.value.iloc[0] < 1e-5


@pytest.mark.parametrize("how", ["constant-factor", "resumed-after-decay"])
def test_a_flat_learning_rate_below_the_schedules_base_is_judged_as_it_is(one_thread, how):
    # LambdaLR(lambda s: 1e-6): initial_lr is 0.05, the lr a flat 5e-8; or a StepLR that decayed before attach()
    # (a resumed run): neither is a warm-up, so a ratio below the band fires after three recorded steps
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if how == "constant-factor":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1e-6)
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=1e-3)
        opt.step(), sched.step(), sched.step()  # two decays before the scope sees a step (lr 5e-8)
    x, y = torch.randn(64, 32), torch.randint(0, 4, (64,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradscope.attach(model, optimizer=opt) as scope:
            for _ in range(5):
                nn.functional.cross_entropy(model(x), y).backward()
                scope.step()
                opt.step()
                if how == "constant-factor":
                    sched.step()
                opt.zero_grad()
    assert list(band_alerts(scope).step) == [2]  # before: judged at 1e6x the lr, never


def test_a_block_stepped_every_other_step_keeps_its_run_below_the_band():
    # a critic stepped at even steps only (GAN, n_critic): its ratio rows come every other step, all below the band
    det, found = Detector(), []
    for step in range(12):
        rows = [(step, "gen", 0, 0, UPDATE_RATIO, 1e-3)] + ([(step, "critic", 1, 0, UPDATE_RATIO, 1e-7)]
                                                             if step % 2 == 0 else [])
        found += det.observe(rows)
    assert [(a.step, a.block) for a in found] == [(4, "critic")]  # its third row below; before: never


def test_a_warm_up_of_one_optimizer_is_judged_at_its_own_base(one_thread):
    # the head alone warms up over 10k steps with its own optimizer: its ratio is tiny, at its base it is in band
    scope = train("sgd", lr=0.05, steps=12, head=("sgd", 0.05, 10000))
    frame = scope.frame()
    head = frame[(frame.metric == UPDATE_RATIO) & (frame.block == "2")]
    assert (head.value < 1e-5).sum() >= 3
    assert len(band_alerts(scope)) == 0, scope.alerts().to_string()


def test_a_learning_rate_too_small_even_at_its_base_fires_with_the_reason(one_thread):
    band = band_alerts(train("sgd", lr=1e-6, steps=12))
    assert list(band.step) == [2] and band.value.iloc[0] < 1e-5
    assert "since step 0" in band.note.iloc[0]
    rows = [(7, "a", 0, 0, UPDATE_RATIO, 2e-6)]  # at half the base lr of a warm-up: 4e-6 at the base, still below
    now = AlertRules(band_patience=1)
    alert = Detector(now).observe(rows, optimizer_steps={7: {"a": OptimizerStep(5e-7, 0.5)}})[0]
    assert "base learning rate" in alert.note and "4e-06" in alert.note
    assert alert.threshold == pytest.approx(5e-6)  # the bound the ratio itself crossed: 1e-5 x 0.5
    # at a tenth of the base the same ratio is 2e-5 there: inside the band, no alert
    assert Detector(now).observe(rows, optimizer_steps={7: {"a": OptimizerStep(1e-7, 0.1)}}) == []
    assert Detector(now).observe(rows, optimizer_steps={7: {"a": OptimizerStep(0.0, 0.0)}}) == []  # lr 0


def test_an_lr_set_to_zero_after_training_fires_and_says_so(one_thread):
    scope = train("sgd", lr=0.05, schedule="zero-at-20", steps=30)
    frame = scope.frame()
    assert frame[(frame.metric == UPDATE_RATIO) & (frame.step >= 20)].value.max() == 0.0  # nothing moves any more
    band = band_alerts(scope)
    assert list(band.step) == [22]  # before: silent (lr 0 was never judged); three recorded steps of patience
    assert "lr is 0 after it was above 0" in band.note.iloc[0]
    # an lr of 0 that was never above 0 (the first step of a warm-up from 0) is still not judged
    assert band_alerts(train("sgd", lr=0.05, schedule="warmup", steps=30)).empty


def test_adam_first_step_is_named_in_the_note_for_adam_blocks_only(one_thread):
    adam = band_alerts(train("adamw", lr=0.02, steps=3, init_scale=0.05))
    assert list(adam.step) == [0] and adam.value.iloc[0] > 0.1
    assert "first step of its Adam-type optimizer" in adam.note.iloc[0]
    sgd = band_alerts(train("sgd", lr=20.0, steps=2))
    assert list(sgd.step) == [0] and "Adam" not in sgd.note.iloc[0]
    # SGD body at a large lr, Adam head: the alert names an SGD block, without Adam's note
    mixed = band_alerts(train("sgd", lr=20.0, steps=2, head=("adam", 1e-3, 1)))
    assert mixed.block.iloc[0] != "2" and "Adam" not in mixed.note.iloc[0]
    radam = band_alerts(train("radam", lr=2.0, steps=2))  # RAdam's first steps are momentum steps
    assert len(radam) and "Adam" not in radam.note.iloc[0]


def test_group_lr_and_first_adaptive_read_the_optimizer():
    w = nn.Parameter(torch.ones(3))
    sgd = torch.optim.SGD([w], lr=0.1)
    assert group_lr(sgd.param_groups[0]) == (0.1, 0.0) and not first_adaptive(sgd)
    torch.optim.lr_scheduler.OneCycleLR(sgd, max_lr=1.0, total_steps=10)  # starts at max_lr / 25
    lr, base = group_lr(sgd.param_groups[0])
    assert lr == pytest.approx(0.04) and base == 1.0
    adam = torch.optim.Adam([w], lr=1e-3)
    assert first_adaptive(adam) and not first_adaptive(torch.optim.RAdam([w], lr=1e-3))
    w.grad = torch.ones(3)
    adam.step()
    assert not first_adaptive(adam)


def test_rules_check_the_new_knobs():
    with pytest.raises(gradscope.GradscopeError, match="min_factor"):
        AlertRules(min_factor=0.5)
    with pytest.raises(gradscope.GradscopeError, match="band_patience"):
        AlertRules(band_patience=0)
