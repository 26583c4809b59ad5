"""gradscope in a real accelerate loop (CPU): ``accelerator.prepare(...)`` then one ``attach`` line; with gradient
accumulation a recorded step is one optimizer step, equal to a hand-rolled accumulation loop."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn

import gradscope
from tests import nets

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = ["step", "block", "call", "metric"]
MICRO, K = 6, 3  # six micro-batches, an optimizer step every three


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each test starts from a clean one."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(KEY).reset_index(drop=True)


def _data():
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(MICRO)]


def _model():
    torch.manual_seed(0)
    return nets.mlp()


def _reference(k: int):
    """Hand-rolled accumulation: k backward passes of loss / k, then scope.step(loss=mean), opt.step()."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = _data()
    with gradscope.attach(model, optimizer=opt) as scope:
        for start in range(0, MICRO, k):
            losses = []
            for x, y in data[start:start + k]:
                loss = nn.functional.cross_entropy(model(x), y)
                (loss / k).backward()
                losses.append(loss.detach())
            scope.step(loss=torch.stack(losses).mean())
            opt.step()
            opt.zero_grad()
    return _sorted(scope.frame()), scope.losses()


def _accelerate(k: int, order: str):
    accelerator = Accelerator(gradient_accumulation_steps=k, cpu=True)
    model, opt = _model(), None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(_data(), batch_size=None, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    with gradscope.attach(model, optimizer=opt) as scope:  # the one line
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                if order == "before":  # after backward, before the optimizer (the order the docs recommend)
                    scope.step(loss=loss)
                opt.step()
                opt.zero_grad()
                if order == "after":  # after zero_grad: the optimizer's step hook read the gradients in time
                    scope.step(loss=loss)
    return _sorted(scope.frame()), scope.losses()


@pytest.mark.parametrize("order", ["before", "after"])
def test_accumulation_records_one_step_per_optimizer_step_like_a_hand_rolled_loop(order):
    want, want_losses = _reference(K)
    got, got_losses = _accelerate(K, order)
    assert sorted(set(got.step)) == [0, 1] and sorted(set(got.call)) == [0, 1, 2]  # k forwards per step
    assert {"update_ratio", "param_grad_norm", "grad_norm"} <= set(got.metric)
    pd.testing.assert_frame_equal(got.drop(columns="value"), want.drop(columns="value"))
    if order == "after":  # param_norm is read at scope.step(): here after the update, the rest is the same
        moved = (got.metric == "param_norm").to_numpy()
        assert (got.value[moved] != want.value[moved]).all()
        got, want = got[~moved], want[~moved]
    assert got.value.to_numpy() == pytest.approx(want.value.to_numpy(), rel=1e-5, abs=1e-8)
    assert list(got_losses) == [0, 1]
    assert list(got_losses.values()) == pytest.approx(list(want_losses.values()), rel=1e-6)


def test_without_accumulation_every_batch_is_a_step():
    want, _ = _reference(1)
    got, _ = _accelerate(1, "before")
    assert sorted(set(got.step)) == list(range(MICRO)) and set(got.call) == {0}
    pd.testing.assert_frame_equal(got.drop(columns="value"), want.drop(columns="value"))
    assert got.value.to_numpy() == pytest.approx(want.value.to_numpy(), rel=1e-5, abs=1e-8)
