"""torch.compile after attach: the hooks are traced into the graph (no graph break, no recompile per step, no
crash on a freed weak reference), and every value equals the eager run and an autograd reference."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import gradscope
from tests.reference import assert_matches, measured, reference_metrics

VOCAB, WIDTH = 40, 16


def _lm() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(WIDTH, 2, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    return nn.Sequential(nn.Embedding(VOCAB, WIDTH), encoder, nn.Linear(WIDTH, VOCAB))


def _tokens(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(step))


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    x = _tokens(step)
    return nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), x.reshape(-1))


def _train(model: nn.Module, steps: int, compile_backend=None, every=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scope = gradscope.attach(model, blocks=r"1\.layers\.\d+", every=every)
    run = torch.compile(model, backend=compile_backend) if compile_backend else model
    with scope:
        for step in range(steps):
            _loss(run, step).backward()
            scope.step()
            opt.step()
            opt.zero_grad()
    return scope.frame()


def _compare(eager, compiled, rel):
    key = ["step", "block", "call", "metric"]
    merged = eager.merge(compiled, on=key, how="outer", suffixes=("_eager", "_compiled"), indicator=True)
    assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"][key].head()
    for metric, rows in merged.groupby("metric"):
        assert rows.value_compiled.to_numpy() == pytest.approx(rows.value_eager.to_numpy(), rel=rel, abs=1e-6), metric


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def test_compiled_transformer_lm_equals_eager_without_graph_breaks(one_thread, dynamo):
    """Issue 15's crash (a guard on the weak reference of a freed tensor, at the second step) and issue 17's graph
    break per block: several steps of a TransformerEncoder LM compiled after attach."""
    eager = _train(_lm(), 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no 'no hooked block ran', no recompile-limit warning
        compiled = _train(_lm(), 5, compile_backend="aot_eager")
    assert set(compiled.metric) >= {"act_var", "act_zero_frac", "grad_norm", "grad_in_norm", "param_grad_norm"}
    assert len(compiled) == len(eager) and sorted(compiled.step.unique()) == list(range(5))
    _compare(eager, compiled, rel=1e-4)
    assert sum(dynamo["graph_break"].values()) == 0, dict(dynamo["graph_break"])
    assert dynamo["stats"]["unique_graphs"] == 1  # one graph for all five steps: nothing gradscope holds is guarded


def test_unrecorded_steps_under_compile_are_one_more_graph_not_a_recompile_per_step(one_thread, dynamo):
    eager = _train(_lm(), 12, every=4)
    compiled = _train(_lm(), 12, compile_backend="aot_eager", every=4)
    assert sorted(compiled.step.unique()) == [0, 4, 8]
    _compare(eager, compiled, rel=1e-4)
    assert sum(dynamo["graph_break"].values()) == 0
    assert dynamo["stats"]["unique_graphs"] == 2  # recorded and unrecorded variants, each compiled once


def test_compiled_values_equal_an_autograd_reference(one_thread, dynamo):
    model = _lm()
    names = [f"1.layers.{i}" for i in range(3)]
    want = reference_metrics(model, names, lambda m: _loss(m, 0))
    scope = gradscope.attach(model, blocks=names)
    _loss(torch.compile(model, backend="aot_eager"), 0).backward()
    scope.step()
    scope.detach()
    assert assert_matches(measured(scope.frame()), want, rtol=1e-4) >= 3 * 9


class _Dense(nn.Module):
    """A DenseNet-style layer: its input is the list of all earlier features."""

    gradscope_block = True

    def __init__(self, width: int, k: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width * k, width)

    def forward(self, feats):
        return torch.tanh(self.fc(torch.cat(feats, dim=1)))


class _DenseNet(nn.Module):
    def __init__(self, width: int = 5, depth: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.layers = nn.ModuleList(_Dense(width, k + 1) for k in range(depth))

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(feats))
        return torch.cat(feats, dim=1)


def _dense_reference(model, x, through_block: bool):
    """Autograd norms over each layer's input list: the total gradient of every feature (retain_grad: what a tensor
    hook sees) or, with ``through_block``, the gradient that flows back through this layer only (a zero added to
    each feature as it enters the layer: what the traced hooks see)."""
    ref = copy.deepcopy(model)
    feats = [ref.stem(x)]
    feats[0].retain_grad()
    probes = []
    for layer in ref.layers:
        if through_block:
            zs = [torch.zeros_like(f, requires_grad=True) for f in feats]
            probes.append(zs)
            out = layer([f + z for f, z in zip(feats, zs)])
        else:
            out = layer(feats)
        out.retain_grad()
        feats.append(out)
    torch.cat(feats, dim=1).pow(2).sum().backward()
    if through_block:
        return [torch.sqrt(sum(z.grad.double().pow(2).sum() for z in zs)).item() for zs in probes]
    return [torch.sqrt(sum(feats[j].grad.double().pow(2).sum() for j in range(k + 1))).item() for k in range(3)]


@pytest.mark.parametrize("backend", [None, "aot_eager"], ids=["eager", "compiled"])
def test_list_input_grad_in_norm_is_the_norm_over_all_its_tensors(one_thread, dynamo, backend):
    torch.manual_seed(0)
    model = _DenseNet()
    x = torch.randn(6, 4)
    want = _dense_reference(model, x, through_block=backend is not None)
    scope = gradscope.attach(model, metrics=["grad_in_norm", "grad_norm"])
    run = torch.compile(model, backend=backend) if backend else model
    run(x).pow(2).sum().backward()
    scope.step()
    scope.detach()
    got = scope.frame().query("metric == 'grad_in_norm'").sort_values("depth").value.tolist()
    assert got == pytest.approx(want, rel=1e-5)
    assert len(set(round(v, 6) for v in got)) == 3  # not the first tensor's norm three times


def test_detach_under_compile_leaves_a_graph_that_records_nothing(one_thread, dynamo):
    model = _lm()
    scope = gradscope.attach(model, blocks=r"1\.layers\.\d+")
    run = torch.compile(model, backend="aot_eager")
    for step in range(2):
        _loss(run, step).backward()
        scope.step()
    scope.detach()
    rows = len(scope.frame())
    for step in range(2):  # Dynamo does not guard on module hooks: the recorded-step flag sends it to a clean graph
        _loss(run, step).backward()
    assert not any(int(b.count) for b in scope._probe.traced) and len(scope.frame()) == rows


def test_a_hundred_and_twenty_compiled_steps_compile_twice_and_never_hit_the_recompile_limit(one_thread, dynamo, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(4)], nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 8), torch.randint(0, 2, (4,))
    with gradscope.attach(model, blocks=[str(i) for i in range(4)], every=10) as scope:
        run = torch.compile(model, backend="aot_eager")
        for _ in range(120):  # 12 recorded steps: more than the recompile limit (8) if each recompiled
            nn.functional.cross_entropy(run(x), y).backward()
            scope.step()
            opt.step()
            opt.zero_grad()
    frame = scope.frame()
    assert sorted(frame.step.unique()) == list(range(0, 120, 10))
    assert len(frame.query("metric == 'grad_norm'")) == 12 * 4
    assert dynamo["stats"]["unique_graphs"] == 2 and sum(dynamo["graph_break"].values()) == 0
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]


class _Lin(nn.Module):
    gradscope_block = True

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) * 1.0


class _InPlaceAfterBlocks(nn.Module):
    """Each block's output is modified in place after the block (``mul_``, then ``ReLU(inplace=True)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Lin() for _ in range(3))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
            x.mul_(2.0)
            x = self.act(x)
        return x


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_outputs_modified_in_place_after_a_block_compile_and_match_eager(one_thread, dynamo, backend):
    torch.manual_seed(0)
    model, x = _InPlaceAfterBlocks(), torch.randn(4, 8)
    frames = []
    for compile_backend in (None, backend):
        twin = copy.deepcopy(model)
        scope = gradscope.attach(twin)
        run = torch.compile(twin, backend=compile_backend) if compile_backend else twin
        run(x).pow(2).sum().backward()
        scope.step()
        scope.detach()
        frames.append(scope.frame())
    assert len(frames[1]) == len(frames[0]) > 0
    _compare(frames[0], frames[1], rel=1e-5)


def test_traced_sums_keep_the_variance_of_a_large_mean(one_thread, dynamo):
    from gradscope.engine import spec
    from gradscope.engine.traced import traced_sums

    x64 = 1.0e4 + torch.randn(256, 1024, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x64.float()
    group = ("act_mean", "act_var", "act_rms", "act_zero_frac", "act_nonfinite")
    extras = (("zeros",), ("nonfinite",))
    raw = torch.compile(lambda t: traced_sums(t, extras), backend="aot_eager")(x)
    mean, var, rms, zero_frac, nonfinite = spec.finish(group, raw.tolist(), x.numel(), spec.MOMENTS)
    ref = x.double()
    assert var == pytest.approx(torch.var(ref, unbiased=False).item(), rel=1e-4)
    assert mean == pytest.approx(ref.mean().item(), rel=1e-9) and zero_frac == 0 and nonfinite == 0
    x[0, :3] = torch.tensor([0.0, float("inf"), float("nan")])
    raw = torch.compile(lambda t: traced_sums(t, extras), backend="aot_eager")(x)
    *_, zero_frac, nonfinite = spec.finish(group, raw.tolist(), x.numel(), spec.MOMENTS)
    assert zero_frac * x.numel() == 1 and nonfinite == 2


def _clones_in_graph(model, x, backend_counts):
    """One step of ``model`` compiled with an aot_autograd backend that appends the number of copies in each graph
    it compiles (the forward's first) to ``backend_counts``."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def forward_compiler(gm, inputs):
        backend_counts.append(sum(1 for n in gm.graph.nodes if n.target is torch.ops.aten.clone.default))
        return make_boxed_func(gm.forward)

    torch.compile(model, backend=aot_autograd(fw_compiler=forward_compiler))(x).pow(2).sum().backward()


def _seq() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(_Lin(), _Lin(), _Lin())


def test_consecutive_blocks_of_a_sequential_share_one_gradient_reduction_under_compile(one_thread, dynamo):
    """Block k+1's input is block k's tapped output: under compile it is neither copied nor reduced again, and its
    grad_in_norm (block k's grad_norm) equals the autograd reference."""
    model, x = _seq(), torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
    names = ["0", "1", "2"]
    want = reference_metrics(model, names, lambda m: m(x).pow(2).sum())
    scope = gradscope.attach(model, blocks=names)
    clones = []
    _clones_in_graph(model, x, clones)
    scope.step()
    scope.detach()
    assert scope._probe.shared_in == [None, 0, 1]
    assert clones[0] == 4  # a copy per block output and one for block 0's input, not one per input and output (6)
    got = measured(scope.frame())
    assert {k[0] for k in got if k[2] == "grad_in_norm"} == set(names)
    assert assert_matches(got, want, rtol=1e-5) >= 3 * 9


def _double_in_place(module, args, out):
    out.mul_(2.0)


def test_a_forward_hook_that_changes_a_block_output_in_place_keeps_the_next_input_tap(one_thread, dynamo):
    """A user's forward hook on block 0 doubles its output in place after gradscope's hook: block 1's input gradient
    is then half block 0's output gradient, so nothing is shared and the compiled values equal eager."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
    frames = []
    for compiled in (False, True):
        model = _seq()
        model[0].register_forward_hook(_double_in_place)
        scope = gradscope.attach(model, blocks=["0", "1", "2"])
        clones = []
        if compiled:
            _clones_in_graph(model, x, clones)
        else:
            model(x).pow(2).sum().backward()
        scope.step()
        scope.detach()
        frames.append(scope.frame())
    grads = frames[1][frames[1].metric.isin(["grad_norm", "grad_in_norm"])].set_index(["block", "metric"]).value
    assert grads[("1", "grad_in_norm")] == pytest.approx(grads[("0", "grad_norm")] / 2, rel=1e-6)
    _compare(frames[0], frames[1], rel=1e-5)
    assert scope._probe.shared_in == [None, None, 1] and clones[0] == 5  # block 1's input tapped again
