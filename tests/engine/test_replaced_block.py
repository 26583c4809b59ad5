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


def _inner_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Sequential(nn.Linear(16, 16), nn.Tanh()),
                         nn.Sequential(nn.Linear(16, 16), nn.Tanh()), nn.Linear(16, 3))


def _norms64(block):
    """float64 ||theta|| and ||grad|| over the block's parameters now (the independent reference)."""
    params = list(block.parameters())
    theta = sum(float(p.detach().double().square().sum()) for p in params) ** 0.5
    grad = sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None) ** 0.5
    return theta, grad


def _wrap_with_lora(model):
    model[2][0] = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))  # a new child inside the block


def _assign_state(model):
    state = {k: v * 3.0 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new Parameter objects in every block


def _weight_norm(model):
    nn.utils.parametrizations.weight_norm(model[2][0])  # weight becomes original0/original1


@pytest.mark.parametrize("change", [_wrap_with_lora, _assign_state, _weight_norm])
def test_parameters_that_change_inside_a_block_are_measured_from_the_next_step(change):
    """A child replaced inside a block, ``load_state_dict(assign=True)`` or a parametrization registers new
    parameters in a block gradscope hooks. They were indexed at attach only: ``param_norm`` stayed the old
    parameters' and ``param_grad_norm`` went missing or wrong. Now each recorded step after the change measures the
    block's parameters as they are, against a float64 reference, for both changed blocks."""
    model = _inner_model()
    x, y = _batch()
    want = {}
    with gradscope.attach(model, blocks=["1", "2"]) as scope:
        for step in range(4):
            if step == 2:
                change(model)
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            want.update({(step, name): _norms64(model[int(name)]) for name in ("1", "2")})
            scope.step()
    frame = scope.frame().set_index(["step", "block", "metric"]).value
    for (step, name), (theta, grad) in want.items():
        assert frame[(step, name, "param_norm")] == pytest.approx(theta, rel=1e-5), (step, name)
        assert frame[(step, name, "param_grad_norm")] == pytest.approx(grad, rel=1e-5), (step, name)


def test_a_param_group_added_later_gets_its_update_ratio():
    """Which blocks an optimizer updates was decided at attach: a block whose parameters joined through
    ``add_param_group`` later never got an ``update_ratio``. Now it does from the next recorded step, equal to
    ||theta_after - theta_before|| / ||theta_before|| in float64."""
    model = _inner_model()
    x, y = _batch()
    opt = torch.optim.SGD(list(model[0].parameters()) + list(model[1].parameters()) +
                          list(model[3].parameters()), lr=0.1)
    want = {}
    with pytest.warns(RuntimeWarning, match="'2'.*no optimizer"):
        scope = gradscope.attach(model, blocks=["1", "2"], optimizer=opt)
    with scope:
        for step in range(4):
            if step == 2:
                opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.05})
            nn.functional.cross_entropy(model(x), y).backward()
            scope.step()
            before = [p.detach().double().clone() for p in model[2].parameters()]
            opt.step()
            after = [p.detach().double() for p in model[2].parameters()]
            delta = sum(float((a - b).square().sum()) for a, b in zip(after, before)) ** 0.5
            want[step] = delta / sum(float(b.square().sum()) for b in before) ** 0.5
            opt.zero_grad()
    ratio = scope.frame().query("block == '2' and metric == 'update_ratio'").set_index("step").value
    assert sorted(ratio.index) == [2, 3]  # no false 0.0 before the group was added
    for step in (2, 3):
        assert ratio[step] == pytest.approx(want[step], rel=1e-5)


def test_a_model_built_elsewhere_mid_run_does_not_reindex_the_blocks():
    """Every module built anywhere moves the registration count; only a change of the blocks' own parameters makes
    the scope index them (and copy them for the update ratio) again."""
    model = _inner_model()
    x, y = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.attach(model, blocks=["1", "2"], optimizer=opt) as scope:
        watches = []
        for step in range(3):
            _inner_model()  # an evaluation copy, a second model: not ours
            nn.functional.cross_entropy(model(x), y).backward()
            scope.step()
            opt.step()
            opt.zero_grad()
            watches.append(scope._watch)
    assert watches[0] is watches[1] is watches[2]


def test_a_block_replaced_before_a_loop_that_bypasses_the_root_is_not_also_called_idle():
    """Children called one by one and optimizer.step() before scope.step(): the optimizer's pre-hook finds the
    replacement first, and scope.step() then also warned that the block 'did not run' (it ran, unhooked)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.attach(model, blocks=["0", "2", "4"], optimizer=opt) as scope:
            for i in range(2):
                if i == 1:
                    model[2] = nn.Linear(8, 8)
                    opt.add_param_group({"params": list(model[2].parameters())})
                out = torch.randn(3, 4)
                for child in model:
                    out = child(out)
                out.sum().backward()
                opt.step()
                opt.zero_grad()
                scope.step()
    messages = [str(w.message) for w in caught]
    assert any("was replaced after attach()" in m for m in messages), messages
    assert not any("did not run" in m for m in messages), messages
