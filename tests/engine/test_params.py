"""The update ratio's parameter copies (engine/params.py): kept buffers, chunked differences, exact values."""
import pytest
import torch
from torch import nn

import gradscope
from gradscope import schema as S
from gradscope.engine import params as P
from gradscope.engine.sites import Site


def _sites(*modules: nn.Module):
    return [Site(f"b{i}", m, type(m).__name__) for i, m in enumerate(modules)]


def _reference(after, before, groups, n):
    """float64 per-group norms of after - before, computed independently."""
    out = torch.zeros(n, dtype=torch.float64)
    for a, b, g in zip(after, before, groups):
        out[g] += ((a.double() - b.double()) ** 2).sum()
    return out.sqrt()


def test_differences_in_chunks_equal_a_float64_reference(monkeypatch):
    monkeypatch.setattr(P, "_DELTA_CHUNK", 1000)  # many chunks, and one tensor larger than a chunk
    monkeypatch.setattr(P, "_ALONE", 100)  # both ways of differencing: torch.sub(out=) and foreach
    g = torch.Generator().manual_seed(0)
    shapes = [(40, 30), (7,), (3000,), (5, 5), (999,), (2,)]
    before = [torch.randn(s, generator=g) for s in shapes]
    after = [b + 1e-3 * torch.randn(b.shape, generator=g) for b in before]
    kept = [b.clone() for b in before]
    groups = [0, 0, 1, 2, 2, 2]
    got = P.Differences().group_norms(after, before, groups, 3)
    torch.testing.assert_close(got.double(), _reference(after, before, groups, 3), rtol=1e-5, atol=0)
    for b, k in zip(before, kept):  # the copies are read, never overwritten (a NaN's replay needs them)
        assert torch.equal(b, k)


def test_snapshot_reuses_its_buffers_on_the_cpu_and_remakes_them_after_a_change():
    a, b = nn.Linear(4, 4), nn.Linear(4, 2)
    index = P.param_index(_sites(a, b))
    snap = P.Snapshot(index)
    first = snap.take()
    ptrs = [t.data_ptr() for t in first]
    with torch.no_grad():
        a.weight.add_(1.0)
    second = snap.take()
    assert [t.data_ptr() for t in second] == ptrs  # no allocation in a later recorded step
    assert torch.equal(second[0], a.weight.detach())
    a.double()  # dtype changed: new buffers of the new dtype
    third = snap.take()
    assert third[0].dtype == torch.float64 and torch.equal(third[0], a.weight.detach())


def test_a_shared_parameter_is_copied_once_and_counted_in_both_blocks():
    shared = nn.Linear(3, 3)
    outer = nn.Sequential(shared, nn.Linear(3, 3))
    index = P.param_index(_sites(shared, outer))
    copies = P.Snapshot(index).take()
    assert len(copies) == len(index.order) == 2 + 4
    assert copies[0] is copies[2]  # the shared weight: one buffer in both blocks' places
    with torch.no_grad():
        for p in outer.parameters():
            p.add_(0.5)
    delta, base = P.update_norms(index, copies, 2)
    assert delta[0].item() == torch.tensor(0.5 * (9 + 3) ** 0.5).item()
    assert abs(delta[1].item() - 0.5 * 24 ** 0.5) < 1e-6


LOOPS = ["scope-first", "optimizer-first", "modified-between", "data-between", "clipped-after", "vector-between"]


@pytest.mark.parametrize("loop", LOOPS)
def test_update_ratio_through_attach_matches_autograd_free_reference_over_steps(loop):
    """Over four SGD-momentum steps, in the loop orders users write, against ||theta_after - theta_before|| /
    ||theta_before|| in float64. The weights change between ``scope.step()`` and the optimizer's step in place
    (``modified-between``: weight decay by hand under no_grad), through ``p.data`` (``data-between``; WGAN's
    clipping in ``clipped-after``: ``opt.step()``, ``scope.step()``, then ``p.data.clamp_``) or
    ``vector_to_parameters`` (``vector-between``). A write through ``.data`` leaves ``p._version`` as it was:
    reusing the norms ``param_norm`` had just measured gave half the ratio in ``data-between`` and wrong ones in the
    two others, so ||theta_before|| is always measured."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scope = gradscope.attach(model, blocks=["0", "2", "4"], optimizer=opt)
    layers = (model[0], model[2], model[4])
    expected = []
    for step in range(4):
        x = torch.randn(5, 8)
        model(x).square().mean().backward()
        if loop not in ("optimizer-first", "clipped-after"):
            scope.step()
        if loop == "modified-between":
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.5)
        if loop == "data-between":
            for p in model.parameters():
                p.data.mul_(0.5)
        if loop == "vector-between":
            flat = torch.nn.utils.parameters_to_vector(model.parameters())
            torch.nn.utils.vector_to_parameters(flat * 0.9, model.parameters())
        before = [(m.weight.detach().double().clone(), m.bias.detach().double().clone()) for m in layers]
        opt.step()
        for k, m in enumerate(layers):  # across the optimizer's step
            d = ((m.weight.double() - before[k][0]) ** 2).sum() + ((m.bias.double() - before[k][1]) ** 2).sum()
            b = (before[k][0] ** 2).sum() + (before[k][1] ** 2).sum()
            expected.append((step, f"{k * 2}", (d / b).sqrt().item()))
        if loop in ("optimizer-first", "clipped-after"):
            scope.step()
        if loop == "clipped-after":
            for p in model.parameters():
                p.data.clamp_(-0.05, 0.05)
        opt.zero_grad()
    frame = scope.frame()
    rows = frame[frame.metric == S.UPDATE_RATIO]
    assert len(rows) == len(expected)
    for step, block, value in expected:
        got = rows[(rows.step == step) & (rows.block == block)].value.item()
        assert abs(got - value) <= 1e-5 * value, (step, block, got, value)


def test_the_work_buffer_is_cut_once_and_cut_again_when_a_parameter_changes_dtype():
    before = [torch.randn(300), torch.randn(5), torch.randn(20000)]
    after = [b + 0.5 for b in before]
    work = P.Differences()
    first = work.group_norms(after, before, [0, 1, 1], 2)
    plan = work._plan(after)
    again = work.group_norms(after, before, [0, 1, 1], 2)
    assert work._plan(after) is plan and torch.equal(first, again)
    after64, before64 = [a.double() for a in after], [b.double() for b in before]
    got = work.group_norms(after64, before64, [0, 1, 1], 2)
    assert work._plan(after64) is not plan
    torch.testing.assert_close(got.double(), _reference(after64, before64, [0, 1, 1], 2), rtol=1e-6, atol=0)
