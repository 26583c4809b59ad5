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


@pytest.mark.parametrize("loop", ["scope-first", "optimizer-first", "modified-between"])
def test_update_ratio_through_attach_matches_autograd_free_reference_over_steps(loop, monkeypatch):
    """Over four SGD-momentum steps, in the loop orders users write. ``scope-first`` reuses the norms ``param_norm``
    just measured as ||theta_before|| (KnownNorms); ``modified-between`` halves the weights in place after
    ``scope.step()`` (weight decay by hand), so those norms are stale and must be measured again."""
    recalled = []
    real_recall = P.KnownNorms.recall
    monkeypatch.setattr(P.KnownNorms, "recall", lambda self, index: recalled.append(real_recall(self, index))
                        or recalled[-1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scope = gradscope.attach(model, blocks=["0", "2", "4"], optimizer=opt)
    layers = (model[0], model[2], model[4])
    expected = []
    for step in range(4):
        x = torch.randn(5, 8)
        model(x).square().mean().backward()
        if loop != "optimizer-first":
            scope.step()
        if loop == "modified-between":
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.5)
        before = [(m.weight.detach().double().clone(), m.bias.detach().double().clone()) for m in layers]
        opt.step()
        if loop == "optimizer-first":
            scope.step()
        opt.zero_grad()
        for k, m in enumerate(layers):
            d = ((m.weight.double() - before[k][0]) ** 2).sum() + ((m.bias.double() - before[k][1]) ** 2).sum()
            b = (before[k][0] ** 2).sum() + (before[k][1] ** 2).sum()
            expected.append((step, f"{k * 2}", (d / b).sqrt().item()))
    frame = scope.frame()
    rows = frame[frame.metric == S.UPDATE_RATIO]
    assert len(rows) == len(expected)
    for step, block, value in expected:
        got = rows[(rows.step == step) & (rows.block == block)].value.item()
        assert abs(got - value) <= 1e-5 * value
    reused = [r is not None for r in recalled]
    # scope-first: every step reuses; optimizer-first: from the second step on (step k-1's scope.step() measured
    # the weights step k's optimizer starts from); modified-between: never
    assert reused == {"scope-first": [True] * 4, "optimizer-first": [False, True, True, True],
                      "modified-between": [False] * 4}[loop]


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


@pytest.mark.parametrize("given", ["no-optimizer", "no-update-ratio", "both"])
def test_param_norms_are_kept_for_the_update_ratio_only_when_one_will_be_measured(given, monkeypatch):
    """Keeping the norms costs a map of every parameter's version per recorded step: paid only with an optimizer
    and the update ratio on, the one reader of those norms."""
    remembered = []
    real = P.KnownNorms.remember
    monkeypatch.setattr(P.KnownNorms, "remember", lambda self, index, norms: remembered.append(1)
                        or real(self, index, norms))
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = [m for m in S.DEFAULT_METRICS if given != "no-update-ratio" or m != S.UPDATE_RATIO]
    scope = gradscope.attach(model, blocks=["0", "2"], optimizer=None if given == "no-optimizer" else opt,
                             metrics=metrics)
    for _ in range(3):
        model(torch.randn(3, 4)).sum().backward()
        scope.step()
        opt.step()
        opt.zero_grad()
    frame = scope.frame()
    assert (frame.metric == S.PARAM_NORM).any()
    assert len(remembered) == (3 if given == "both" else 0)
    assert (frame.metric == S.UPDATE_RATIO).any() == (given == "both")
