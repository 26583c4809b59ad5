"""The training record: only forwards that build a graph are a step's calls; validation forwards (``no_grad``,
``inference_mode``, in eval mode or not) leave the record exactly as a run without them."""
from __future__ import annotations

import copy
import warnings

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradscope
from gradscope.errors import GradscopeError
from tests import nets

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = ["step", "block", "call", "metric"]


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(KEY).reset_index(drop=True)


def _train(model, batches, validate_every=0, val_context=torch.no_grad, **attach):
    """A plain loop: forward, backward, scope.step(), opt.step(); validation every N steps after opt.step()."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    val = torch.randn(32, 3, 8, 8) * 3 + 2  # validation data of another scale: a mixed-up record shows
    with gradscope.attach(model, optimizer=opt, **attach) as scope:
        for i, (x, y) in enumerate(batches):
            model.train()
            nn.functional.cross_entropy(model(x), y).backward()
            scope.step()
            opt.step()
            opt.zero_grad()
            if validate_every and i % validate_every == 0:
                model.eval()
                with val_context():
                    model(val)
                    model(val[:8])
    return scope.frame()


def _batches(n=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_validation_forwards_leave_the_training_record_unchanged(context):
    torch.manual_seed(0)
    model = nets.conv_bn_net()
    want = _train(copy.deepcopy(model), _batches())
    got = _train(copy.deepcopy(model), _batches(), validate_every=2, val_context=context)
    assert set(got.call) == {0}  # the training forward is the step's only call
    pd.testing.assert_frame_equal(_sorted(got), _sorted(want))
    v_want, v_got = gradscope.verdicts(want), gradscope.verdicts(got)
    pd.testing.assert_frame_equal(v_got, v_want)
    act = lambda f: f[(f.call == 0) & (f.metric == "act_var")].value.to_numpy()
    assert act(got).tolist() == act(want).tolist()


def test_eval_mode_with_grad_is_a_training_forward():
    """Frozen-BatchNorm fine-tuning trains in eval mode: its forwards are the training record."""
    torch.manual_seed(0)
    model = nets.conv_bn_net().eval()
    x, y = _batches(1)[0]
    with gradscope.attach(model) as scope:
        nn.functional.cross_entropy(model(x), y).backward()
        scope.step()
    frame = scope.frame()
    assert {"act_var", "grad_norm", "param_grad_norm"} <= set(frame.metric)
    out = model[0](x)
    got = frame[(frame.block == "0") & (frame.metric == "act_var")].value.item()
    assert got == pytest.approx(out.double().var(unbiased=False).item(), rel=1e-5)


def test_a_step_with_only_validation_forwards_records_no_calls_and_says_why():
    model = nets.mlp()
    with gradscope.attach(model) as scope:
        with torch.no_grad():
            model(torch.randn(4, 12))
        with pytest.warns(RuntimeWarning, match="no_grad"):
            scope.step()
    assert scope.frame().query("metric == 'act_var'").empty


def test_forwards_eval_records_only_the_validation_forwards():
    """Asked for, evaluation forwards are recorded apart: a second scope with forwards="eval"."""
    torch.manual_seed(0)
    model = nets.mlp()
    x, val = torch.randn(8, 12), torch.randn(16, 12) * 2
    with gradscope.attach(model) as train, gradscope.attach(model, forwards="eval") as evaluation:
        model(x).pow(2).mean().backward()
        train.step()
        with torch.no_grad():
            model(val)
        evaluation.step()
    t, e = train.frame(), evaluation.frame()
    assert set(t.call) == {0} and set(e.call) == {0}
    assert not set(e.metric) & {"grad_norm", "grad_in_norm", "param_grad_norm", "update_ratio"}
    first = lambda f: f[(f.block == "0") & (f.metric == "act_var")].value.item()
    assert first(t) == pytest.approx(model[0](x).double().var(unbiased=False).item(), rel=1e-5)
    assert first(e) == pytest.approx(model[0](val).double().var(unbiased=False).item(), rel=1e-5)


def test_forwards_all_keeps_every_forward_and_the_training_forwards_batch_size():
    """The validation forward (batch 9) comes first; batch_size is the training forward's (4), as BN theory reads
    it (it was 9). With forwards="eval" it is the validation forward's, the only one recorded."""
    model = nets.mlp()
    with gradscope.attach(model, forwards="all") as scope:
        with torch.no_grad():
            model(torch.randn(9, 12))
        model(torch.randn(4, 12)).sum().backward()
        scope.step()
    frame = scope.frame()
    assert sorted(frame.query("block == '0' and metric == 'act_var'").call) == [0, 1]
    assert frame.query("metric == 'batch_size'").value.tolist() == [4.0]
    with gradscope.attach(model, forwards="eval") as scope:
        with torch.no_grad():
            model(torch.randn(9, 12))
        model(torch.randn(4, 12)).sum().backward()
        scope.step()
    assert scope.frame().query("metric == 'batch_size'").value.tolist() == [9.0]


def test_forwards_rejects_an_unknown_value():
    with pytest.raises(GradscopeError, match="forwards='validation'"):
        gradscope.attach(nets.mlp(), forwards="validation")


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nets.ConvBNReLU(3 if i == 0 else 8, 8) for i in range(3))
        self.head = nn.Linear(8, 5)
        self.use_checkpoint = True

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=True) if self.use_checkpoint else block(x)
        return self.head(x.mean((2, 3)))


def test_reentrant_checkpointing_runs_its_forward_under_no_grad_and_is_still_recorded():
    """Reentrant checkpointing runs the forward without grad and recomputes it in backward: the recomputation is
    the training forward, recorded once, at the depth of forward order."""
    torch.manual_seed(0)
    model = Checkpointed()
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    val = torch.randn(4, 3, 8, 8)
    frames = []
    for use in (False, True):
        m = copy.deepcopy(model)
        m.use_checkpoint = use
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with gradscope.attach(m) as scope:
                with torch.no_grad():
                    m(val)  # a validation forward first
                m(x).logsumexp(1).sum().backward()
                scope.step()
        frames.append(_sorted(scope.frame()))
    eager, ckpt = frames
    assert (ckpt.call == 0).all()
    pd.testing.assert_frame_equal(ckpt.drop(columns="value"), eager.drop(columns="value"))
    assert ckpt.value.to_numpy() == pytest.approx(eager.value.to_numpy(), rel=1e-5, abs=1e-7)
