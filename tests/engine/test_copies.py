"""Copies and pickles of an attached model (EMA and evaluation copies, ``torch.save(model)``) carry none of
gradscope's hooks: a copy records nothing, a pickle works and loads without them; the user's own hooks travel."""
from __future__ import annotations

import copy
import io
import pickle

import pandas as pd
import pytest
import torch
from torch import nn

import gradscope
from tests import nets

HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
              "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def scale_output(module, args, output):  # a user's hook: module-level, so it pickles
    return output * 1.0


def _hook_counts(model: nn.Module) -> list:
    return [(name, d, len(getattr(m, d))) for name, m in model.named_modules() for d in HOOK_DICTS]


def _no_gradscope_traces(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert "__getstate__" not in module.__dict__, name
        for d in HOOK_DICTS[:4]:
            for hook in getattr(module, d).values():
                assert "gradscope" not in getattr(hook, "__module__", ""), (name, d, hook)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nets.TinyResNet()
    model.layer1[0].register_forward_hook(scale_output)  # the user's hook, registered before attach
    return model


def _train_step(model, scope=None, opt=None):
    x, y = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(7)), torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(model(x), y).backward()
    if scope is not None:
        scope.step()
    if opt is not None:
        opt.step()
        opt.zero_grad()


def test_a_deepcopy_records_nothing_and_has_no_gradscope_hooks():
    model = _model()
    before = _hook_counts(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.attach(model, optimizer=opt, blocks=lambda n, m: n != "") as scope:
        _train_step(model, scope, opt)
        ema = copy.deepcopy(model)  # an EMA / evaluation copy made while attached
        rows = len(scope.frame())
        _train_step(ema)  # the copy trains (forward and backward) outside the scope
        with torch.no_grad():
            ema(torch.randn(2, 3, 8, 8))
        assert len(scope.frame()) == rows  # nothing recorded from the copy
        _no_gradscope_traces(ema)
        assert _hook_counts(ema) == before  # the user's hook was copied, nothing else
        assert len(ema.layer1[0]._forward_hooks) == 1
        _train_step(model, scope, opt)  # the original still records
        assert len(scope.frame()) > rows
    _no_gradscope_traces(model)
    assert _hook_counts(model) == before


def test_a_shallow_copy_has_no_gradscope_hooks():
    model = _model()
    with gradscope.attach(model) as scope:
        block = scope.sites[0].module
        shallow = copy.copy(block)
        assert len(block._forward_hooks) > len(shallow._forward_hooks)
        assert not any("gradscope" in getattr(h, "__module__", "") for h in shallow._forward_hooks.values())
        assert "__getstate__" not in shallow.__dict__


@pytest.mark.parametrize("every", [1, 2])
def test_pickle_and_torch_save_work_every_step_and_load_without_gradscope_hooks(every):
    model = _model()
    before = _hook_counts(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.attach(model, optimizer=opt, every=every) as scope:
        for _ in range(3):
            _train_step(model, scope, opt)
            blob = pickle.dumps(model)
            assert b"gradscope" not in blob  # loads where gradscope is not installed
            buffer = io.BytesIO()
            torch.save(model, buffer)
            buffer.seek(0)
            for loaded in (pickle.loads(blob), torch.load(buffer, weights_only=False)):
                _no_gradscope_traces(loaded)
                assert _hook_counts(loaded) == before
                x = torch.randn(2, 3, 8, 8)
                with torch.no_grad():
                    assert torch.equal(loaded.eval()(x), copy.deepcopy(model).eval()(x))
                model.train()
    frame = scope.frame()
    assert sorted(set(frame.step)) == list(range(0, 3, every))


def test_nested_scopes_keep_the_guard_until_the_last_detaches():
    model = nets.mlp()
    outer = gradscope.attach(model)
    inner = gradscope.attach(model, every=2)
    inner.detach()
    pickle.dumps(model)  # the outer scope's hooks are still left out
    copied = copy.deepcopy(model)
    _no_gradscope_traces(copied)
    outer.detach()
    _no_gradscope_traces(model)
    assert _hook_counts(model) == _hook_counts(nets.mlp())


def test_a_copy_made_before_attach_is_not_hooked_and_the_original_frame_is_exact():
    """The guard changes what copies hold, not what the original records."""
    model = _model()
    twin = copy.deepcopy(model)
    with gradscope.attach(model) as a:
        _train_step(model, a)
    copy.deepcopy(twin)
    with gradscope.attach(twin) as b:
        copy.deepcopy(twin)
        pickle.dumps(twin)
        _train_step(twin, b)
    pd.testing.assert_frame_equal(a.frame(), b.frame())
