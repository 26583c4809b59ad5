"""Every metric the engine records equals an independent autograd/float64 computation on the same batch."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradscope
from tests import nets
from tests.reference import assert_matches, measured, reference_metrics


def _record_one_step(model, blocks, run, **kw):
    model = copy.deepcopy(model)
    with gradscope.attach(model, blocks=blocks, **kw) as scope:
        run(model).backward()
        scope.step()
        frame = scope.frame()
    return frame, [s.name for s in scope.sites]


def _image_loss(x, y):
    return lambda m: nn.functional.cross_entropy(m(x), y)


CASES = {
    "mlp": (lambda: nets.mlp(), "auto", lambda: (torch.randn(16, 12), torch.randint(0, 5, (16,)))),
    "conv_bn": (lambda: nets.conv_bn_net(), "auto", lambda: (torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,)))),
    "resnet_blocks": (lambda: nets.TinyResNet(), "auto", lambda: (torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,)))),
    # the paper's site: each conv's output after BN, before ReLU; bn2 is followed by `out += identity` in place
    "resnet_bn": (lambda: nets.TinyResNet(), nn.BatchNorm2d, lambda: (torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,)))),
    # torchvision reuses one ReLU(inplace=True) twice per block: two calls per step, each modified in place later
    "resnet_relu": (lambda: nets.TinyResNet(), nn.ReLU, lambda: (torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,)))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_metric_matches_autograd(case):
    torch.manual_seed(0)
    build, blocks, batch = CASES[case]
    model = build()
    x, y = batch()
    run = _image_loss(x, y)
    frame, names = _record_one_step(model, blocks, run)
    want = reference_metrics(model, names, run)
    compared = assert_matches(measured(frame), want)
    assert compared >= 6 * len(names)


def test_tuple_returning_blocks_called_with_keywords():
    torch.manual_seed(0)
    model = nets.TinyTransformer()
    ids = torch.randint(0, 50, (2, 7))
    run = lambda m: m(ids).logsumexp(-1).mean()
    names = [s.name for s in gradscope.find_blocks(model)]
    assert names == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    frame, names = _record_one_step(model, "auto", run)
    want = reference_metrics(model, names, run)
    assert_matches(measured(frame), want)
    # the first block's input is an embedding output: it requires grad, so grad_in_norm is there
    assert ("transformer.h.0", 0, "grad_in_norm") in want


def test_reused_module_records_each_call():
    torch.manual_seed(0)
    model = nets.TinyResNet()
    frame, _ = _record_one_step(model, nn.ReLU, _image_loss(torch.randn(2, 3, 8, 8), torch.tensor([0, 1])))
    block_relu = frame[(frame.block == "layer1.0.relu") & (frame.metric == "act_var")]
    assert sorted(block_relu.call) == [0, 1]
    # both calls share the depth of the first call
    assert block_relu.depth.nunique() == 1


def test_depth_is_forward_execution_order():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(self.b(self.c(x)))

    model = Reversed()
    with gradscope.attach(model) as scope:
        model(torch.randn(3, 4)).sum().backward()
        scope.step()
        frame = scope.frame()
    depth = frame.groupby("block").depth.first().to_dict()
    assert depth == {"c": 0, "b": 1, "a": 2}


def test_no_grad_and_eval_record_forward_only():
    """Asked for (forwards="eval"), no-grad forwards are recorded: forward rows only."""
    torch.manual_seed(0)
    model = nets.conv_bn_net().eval()
    x = torch.randn(4, 3, 8, 8)
    with gradscope.attach(model, forwards="eval") as scope:
        with torch.no_grad():
            model(x)
        scope.step()
        frame = scope.frame()
    metrics = set(frame.metric)
    assert {"act_mean", "act_var", "param_norm"} <= metrics
    assert not metrics & {"grad_norm", "grad_in_norm", "param_grad_norm"}
    # the same forward numbers as a direct computation
    out = model[0](x)
    got = frame[(frame.block == "0") & (frame.metric == "act_var")].value.item()
    assert got == pytest.approx(torch.var(out.double(), unbiased=False).item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_statistics_are_float32_and_do_not_overflow(dtype):
    big = nn.Linear(8, 8)
    with torch.no_grad():
        big.weight.fill_(0.0)
        big.bias.fill_(3.0e4)  # outputs at 3e4: their squares overflow fp16 (max 65504)
    model = nn.Sequential(big, nn.Linear(8, 8)).to(dtype)
    x = torch.randn(64, 8, dtype=dtype)
    with gradscope.attach(model, blocks=nn.Linear) as scope:
        (model(x).float() * 1e3).sum().backward()
        scope.step()
        frame = scope.frame()
    rms = frame[(frame.block == "0") & (frame.metric == "act_rms")].value.item()
    out = big(x).float()
    assert rms == pytest.approx(out.pow(2).mean().sqrt().item(), rel=1e-3)
    grad_norm = frame[(frame.block == "1") & (frame.metric == "grad_norm")].value.item()
    # d(sum(1e3 y))/dy is 1e3 on each of 64*8 elements: a norm whose square overflows fp16 and bf16 sums
    assert grad_norm == pytest.approx(1e3 * (64 * 8) ** 0.5, rel=1e-3)
    assert frame.value.notna().all()


def test_hugging_face_keyword_call_with_mask_first():
    """hidden_states passed by keyword after an attention mask, and integer tensors ahead of the hidden states."""
    torch.manual_seed(0)
    block = nets.TupleBlock(16)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.h = nn.ModuleList([block, nets.TupleBlock(16)])

        def forward(self, x):
            mask = torch.zeros(1, 1, x.shape[1], x.shape[1])
            for b in self.h:
                x = b(attention_mask=mask, hidden_states=x)[0]
            return x

    model = Stack()
    x = torch.randn(2, 5, 16, requires_grad=True)
    run = lambda m: m(x).pow(2).mean()
    frame, names = _record_one_step(model, "auto", run)
    assert names == ["h.0", "h.1"]
    got = measured(frame)
    assert ("h.1", 0, "grad_in_norm") in got and ("h.0", 0, "grad_in_norm") in got
    x.grad = None
    ref = copy.deepcopy(model)
    hidden = {}
    ref.h[1].register_forward_pre_hook(lambda m, a, k: hidden.update(x=k["hidden_states"]), with_kwargs=True)
    loss = run(ref)
    (g,) = torch.autograd.grad(loss, [hidden["x"]])
    assert got[("h.1", 0, "grad_in_norm")] == pytest.approx(g.norm().item(), rel=1e-5)


def test_module_registered_under_two_names_answers_to_both():
    shared = nn.Linear(3, 3)
    model = nn.Module()
    model.a = shared
    model.b = shared
    assert [s.module for s in gradscope.find_blocks(model, ["b"])] == [shared]


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_branch_and_shortcut_variances_match_direct_computation(shortcut):
    from gradscope.models import build

    model = build("resnet20", seed=0, shortcut=shortcut)
    x = torch.randn(8, 3, 32, 32)
    want = {}
    for name, module in model.named_modules():
        if getattr(module, "gradscope_block", False):
            for part in ("branch", "shortcut"):
                getattr(module, part).register_forward_hook(
                    lambda m, i, o, key=(name, f"{part}_var"): want.__setitem__(key, torch.var(o.double(), unbiased=False).item()))
    with gradscope.attach(model, metrics="all") as scope:
        model(x).sum().backward()
        scope.step()
        frame = scope.frame()
    got = {(b, m): v for b, m, v in zip(frame.block, frame.metric, frame.value) if m in ("branch_var", "shortcut_var")}
    assert set(got) == set(want) and len(got) == 18
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key


def test_opt_in_metrics_are_recorded_only_when_asked_for():
    from gradscope import schema as S
    from gradscope.models import build

    model = build("resnet20", seed=0)
    x = torch.randn(4, 3, 32, 32)
    recorded = {}
    for metrics in (None, "all", ["act_var", "branch_var"]):
        with gradscope.attach(model, metrics=metrics) as scope:
            model(x).sum().backward()
            scope.step()
            recorded[str(metrics)] = set(scope.frame().metric)
    assert recorded["None"] == set(S.DEFAULT_METRICS) - set(S.OPTIMIZER_METRICS)
    assert not recorded["None"] & set(S.OPT_IN_METRICS)
    assert recorded["all"] == set(S.ALL_METRICS) - set(S.OPTIMIZER_METRICS)
    assert recorded[str(["act_var", "branch_var"])] == {"act_var", "branch_var"}


class _Scale2InPlace(nn.Module):
    """Not a site: doubles its input in place, so the next block's input is the previous output, modified."""

    def forward(self, x):
        return x.mul_(2.0)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(x) * 0.9  # nothing saves this output for backward, so it may be changed in place


@pytest.mark.parametrize("in_place_between", [False, True])
def test_output_and_next_input_share_one_gradient_reduction_only_when_unmodified(monkeypatch, in_place_between):
    import gradscope.engine.gradwatch as gradwatch

    calls = []
    real = gradwatch.squared_norm
    monkeypatch.setattr(gradwatch, "squared_norm", lambda g: (calls.append(1), real(g))[1])
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [_Block()] + ([_Scale2InPlace()] if in_place_between else [])
    model = nn.Sequential(*layers)
    x = torch.randn(5, 6)
    run = lambda m: m(x).pow(2).sum()  # noqa: E731
    frame, names = _record_one_step(model, _Block, run)
    # 4 outputs, 3 inputs that require grad (the first is the data): one shared reduction per output/next-input
    # pair, while an in-place change in between makes every input need its own
    assert len(calls) == (7 if in_place_between else 4)
    want = reference_metrics(model, names, run)
    assert assert_matches(measured(frame), want) >= 4 * 6
