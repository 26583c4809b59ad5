"""A block replaced after attach (``model[2] = nn.Linear(...)``) is followed: the numbers are the new module's,
never the old one's, and one warning names it."""
from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import gradscope


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


@pytest.mark.parametrize("every", [1, 2])
def test_a_replaced_block_is_measured_on_the_new_module(every):
    model = _model()
    x, y = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.attach(model, blocks=nn.Linear, optimizer=opt, every=every) as scope:
            for step in range(6):
                if step == 3:  # a new block, after the scope's step 2 closed
                    model[2] = nn.Linear(16, 16)
                    with torch.no_grad():
                        model[2].weight.mul_(3.0)
                nn.functional.cross_entropy(model(x), y).backward()
                scope.step()
                opt.step()
                opt.zero_grad()
    frame = scope.frame()
    block = frame[frame.block == "2"].set_index(["step", "metric"]).value
    new = model[2]
    first = 4 if every == 2 else 3  # the first recorded step that runs the new module
    want_norm = torch.cat([new.weight.reshape(-1), new.bias]).norm().item()  # opt does not hold it: unchanged
    for step in sorted(set(frame.step)):
        if step >= first:
            assert block[(step, "param_norm")] == pytest.approx(want_norm, rel=1e-5)
            assert (step, "act_var") in block.index and (step, "grad_norm") in block.index
            assert (step, "update_ratio") not in block.index  # no false 0.0 for a block no optimizer holds
        else:
            assert block[(step, "param_norm")] != pytest.approx(want_norm, rel=1e-3)
    assert (frame[(frame.block == "2") & (frame.step >= first)].kind == "Linear").all()
    messages = [str(w.message) for w in caught]
    assert sum("'2' was replaced" in m for m in messages) == 1
    assert sum("'2'" in m and "no optimizer" in m for m in messages) == 1


def test_the_new_module_numbers_equal_a_fresh_attach():
    model = _model()
    x, y = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradscope.attach(model, blocks=nn.Linear) as scope:
            nn.functional.cross_entropy(model(x), y).backward()
            scope.step()
            model[2] = nn.Linear(16, 16)
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            scope.step()
    got = scope.frame().query("step == 1").drop(columns="step").sort_values(["block", "metric"])
    model.zero_grad()
    with gradscope.attach(model, blocks=nn.Linear) as fresh:
        nn.functional.cross_entropy(model(x), y).backward()
        fresh.step()
    want = fresh.frame().drop(columns="step").sort_values(["block", "metric"])
    assert list(got.metric) == list(want.metric) and list(got.block) == list(want.block)
    assert got.value.to_numpy() == pytest.approx(want.value.to_numpy(), rel=1e-6)


def test_a_removed_block_warns_and_stops():
    model = nn.Sequential(OrderedDict(a=nn.Linear(6, 16), act=nn.ReLU(), b=nn.Linear(16, 16), c=nn.Linear(16, 3)))
    x, y = _batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.attach(model, blocks=nn.Linear) as scope:
            nn.functional.cross_entropy(model(x), y).backward()
            scope.step()
            del model.b
            nn.functional.cross_entropy(model(x), y).backward()
            scope.step()
    frame = scope.frame()
    assert set(frame[frame.step == 0].block) == {"a", "b", "c"}
    assert set(frame[frame.step == 1].block) == {"a", "c"}  # no param_norm of the removed block
    assert sum("'b' (Linear) was removed" in str(w.message) for w in caught) == 1
