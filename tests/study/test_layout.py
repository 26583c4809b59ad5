"""The default study runs built-in nets channels-last: another memory order for the same arithmetic, so the frame and
the losses equal a contiguous run's to float32 rounding; a user's model keeps the layout it was given."""
from __future__ import annotations

import math

import torch
from torch import nn

from gradscope.data import synthetic
from gradscope.study.runs import Settings, batches_of, measure_run
from gradscope.study.specs import user_specs, zoo_spec


def _measure(spec, channels_last: bool, seen: list):
    train, _ = synthetic(n_train=64, n_test=8, image_size=8)
    settings = Settings(steps=4, batch_size=16, every=2, init_batches=1, image_size=8, channels_last=channels_last)
    orig_build = spec.build

    def build() -> nn.Module:
        net = orig_build()
        net.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
        return net

    object.__setattr__(spec, "build", build)  # the spec's net, with a probe of the layout it receives
    return measure_run(spec, batches_of(spec, train, settings), settings, torch.device("cpu"))


def test_channels_last_run_equals_the_contiguous_one():
    torch.manual_seed(0)
    seen_cl, seen_contig = [], []
    frame_cl, losses_cl, _ = _measure(zoo_spec("resnet", depth=8, seed=0), True, seen_cl)
    frame_c, losses_c, _ = _measure(zoo_spec("resnet", depth=8, seed=0), False, seen_contig)
    assert seen_cl and not any(seen_cl), "the built-in net did not receive channels-last images"
    assert seen_contig and all(seen_contig)
    assert list(frame_cl.metric) == list(frame_c.metric) and len(frame_cl) > 50
    for a, b in zip(frame_cl.value, frame_c.value):  # float32 sums in another order
        assert math.isclose(a, b, rel_tol=2e-3, abs_tol=1e-6), (a, b)
    for a, b in zip(losses_cl.loss, losses_c.loss):
        assert math.isclose(a, b, rel_tol=1e-4), (a, b)


def test_a_users_model_keeps_its_layout():
    def factory() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))

    spec = user_specs(factory, [0], (3, 8, 8))[0]
    seen: list = []
    frame, losses, _ = _measure(spec, True, seen)
    assert seen and all(seen) and len(losses) == 4
