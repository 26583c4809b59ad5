"""Optimizer-state signals: adam_m_norm / adam_v_norm equal a direct computation from ``optimizer.state``, follow the
closed form after the first step, and are absent for optimizers that keep no such state."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradscope
from gradscope import schema as S
from gradscope.engine.optstate import state_of


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


BLOCKS = {"0": (0,), "2": (2,), "4": (4,)}


def _direct(model: nn.Module, optimizer, key: str, root: bool) -> dict:
    out = {}
    for name, (i,) in BLOCKS.items():
        states = [optimizer.state[p][key].double() for p in model[i].parameters()]
        if root:
            out[name] = math.sqrt(sum(s.sqrt().pow(2).sum().item() for s in states))
        else:
            out[name] = math.sqrt(sum(s.pow(2).sum().item() for s in states))
    return out


def _train(model, optimizer, steps: int, **attach):
    g = torch.Generator().manual_seed(3)
    with gradscope.attach(model, optimizer=optimizer, **attach) as scope:
        for _ in range(steps):
            x = torch.randn(16, 8, generator=g)
            loss = model(x).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scope.step(loss)
    return scope.frame()


@pytest.mark.parametrize("opt", [torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam])
def test_state_norms_equal_a_direct_computation_from_optimizer_state(opt, one_thread):
    model = _model()
    optimizer = opt(model.parameters(), lr=1e-2)
    frame = _train(model, optimizer, 4)
    last = frame[frame.step == 3].set_index(["block", "metric"])["value"]
    for metric, (key, root) in ((S.ADAM_M_NORM, ("exp_avg", False)), (S.ADAM_V_NORM, ("exp_avg_sq", True))):
        want = _direct(model, optimizer, key, root)
        for block, value in want.items():
            assert last[(block, metric)] == pytest.approx(value, rel=1e-5), (block, metric)
    assert set(frame[frame.metric == S.ADAM_M_NORM].step) == {0, 1, 2, 3}


def test_after_one_step_the_states_are_the_closed_form_of_the_gradient(one_thread):
    """From zero, m = (1 - b1) g and v = (1 - b2) g^2: adam_m_norm = (1-b1)||g||, adam_v_norm = sqrt(1-b2)||g||."""
    model = _model()
    b1, b2 = 0.8, 0.95
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(b1, b2))
    with gradscope.attach(model, optimizer=optimizer) as scope:
        model(torch.randn(16, 8)).pow(2).mean().backward()
        optimizer.step()  # before scope.step(): its state is read at this step, and .grad is still there
        scope.step()
    f = scope.frame().set_index(["block", "metric"])["value"]
    for block in BLOCKS:
        g = f[(block, S.PARAM_GRAD_NORM)]
        assert f[(block, S.ADAM_M_NORM)] == pytest.approx((1 - b1) * g, rel=1e-5)
        assert f[(block, S.ADAM_V_NORM)] == pytest.approx(math.sqrt(1 - b2) * g, rel=1e-5)


def test_an_optimizer_without_adam_state_records_none_and_metrics_can_be_chosen(one_thread):
    model = _model()
    frame = _train(model, torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9), 2)
    assert not set(frame.metric) & {S.ADAM_M_NORM, S.ADAM_V_NORM}
    assert S.UPDATE_RATIO in set(frame.metric)
    model = _model()
    frame = _train(model, torch.optim.Adam(model.parameters()), 2, metrics=[S.ACT_VAR, S.ADAM_V_NORM])
    assert set(frame.metric) == {S.ACT_VAR, S.ADAM_V_NORM}
    model = _model()  # no optimizer= : nothing to read
    with gradscope.attach(model) as scope:
        model(torch.randn(4, 8)).sum().backward()
        scope.step()
    assert not set(scope.frame().metric) & {S.ADAM_M_NORM, S.ADAM_V_NORM}


def test_frozen_parameters_and_wrapped_optimizers(one_thread):
    model = _model()
    for p in model[0].parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    class Wrapper:  # accelerate / Lightning style: the real optimizer under .optimizer, no .state of its own
        def __init__(self, inner):
            self.optimizer = inner

    assert state_of(Wrapper(optimizer)) is optimizer.state
    frame = _train(model, optimizer, 2)
    blocks = set(frame[frame.metric == S.ADAM_M_NORM].block)
    assert blocks == {"2", "4"}  # the frozen block has no state: no row, not a zero
