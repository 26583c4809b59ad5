"""One spec per metric: every metric has a raw layout, a host finish and a cross-rank rule, and a new forward metric
needs only its schema name, its spec and its reduction."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import gradscope
import gradscope.engine.metrics as M
from gradscope import schema as S
from gradscope.engine import spec
from gradscope.errors import GradscopeError


def test_every_schema_metric_has_a_spec_with_a_cross_rank_rule_and_a_reduction():
    assert set(spec.SPECS) == set(S.ALL_METRICS)
    for name in S.ALL_METRICS:
        s = spec.SPECS[name]
        assert s.combine in spec.COMBINE, name
        if s.layout == spec.MOMENTS and s.raw != spec.CORE_SLOTS:
            assert s.raw in M.SLOT_REDUCTIONS, name  # the hook knows how to compute its raw slots


def test_a_metric_without_a_cross_rank_rule_or_a_spec_fails_validation():
    broken = dict(spec.SPECS)
    broken["act_new"] = spec.MetricSpec("act_new", spec.MOMENTS, ("new",), lambda r, n: r["new"], "average-ish")
    with pytest.raises(GradscopeError, match="act_new.*no cross-rank rule"):
        spec.validate(broken, S.ALL_METRICS + ("act_new",), spec.COMBINE)
    with pytest.raises(GradscopeError, match="act_other.*no spec"):
        spec.validate(spec.SPECS, S.ALL_METRICS + ("act_other",), spec.COMBINE)


def test_a_schema_name_without_a_spec_is_an_error_at_import():
    code = ("import sys, gradscope.schema as S; S.ALL_METRICS = S.ALL_METRICS + ('act_new',); "
            "del sys.modules['gradscope.engine.spec']; import gradscope.engine.spec")  # a fresh import of spec
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0 and "act_new" in done.stderr and "no spec" in done.stderr


def _shards():
    g = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(300, generator=g) * 2 + 0.5)
    b = torch.relu(torch.randn(500, generator=g) - 0.3) * 3
    b[7] = float("inf")  # one rank saw an overflow
    return a, b


@pytest.mark.parametrize("checked", [True, False])
def test_moment_rules_combine_shards_into_the_statistics_of_their_union(checked):
    a, b = _shards()
    a_finite, b_finite = a, b.clone()
    b_finite[7] = 1.0
    group = S.FORWARD_METRICS
    extras = tuple(spec.SPECS[m].raw for m in group[3:])
    for shards in ((a_finite, b_finite), (a, b)):
        per_rank = [spec.finish(group, list(M.activation_sums(x, extras=extras, check_on_host=checked)), x.numel(),
                                spec.MOMENTS) for x in shards]
        got = spec.combine(group, per_rank, [float(x.numel()) for x in shards], 2, spec.MOMENTS)
        union = torch.cat(shards).double()
        finite = torch.isfinite(union).all().item()
        want = [union.mean().item(), torch.var(union, unbiased=False).item(), union.pow(2).mean().sqrt().item(),
                (union == 0).double().mean().item(), float((~torch.isfinite(union)).sum()), union.abs().max().item()]
        for name, g, w in zip(group, got, want):
            if finite or name in (S.ACT_ZERO_FRAC, S.ACT_NONFINITE, S.ACT_MAX_ABS):
                assert g == pytest.approx(w, rel=1e-5), name


def test_gradient_norm_rule_is_the_norm_of_the_mean_loss_gradient():
    g = [torch.randn(40), torch.randn(40)]
    per_rank = [[float(x.norm())] for x in g]
    got = spec.combine((S.GRAD_NORM,), per_rank, [40.0, 40.0], 2, spec.SQNORM)
    assert got[0] == pytest.approx((torch.cat(g) / 2).norm().item(), rel=1e-6)


ACT_MEAN_ABS = "act_mean_abs"


@pytest.mark.parametrize("checked", [True, False], ids=["checked", "centred"])
def test_a_new_forward_metric_touches_schema_spec_and_metrics_only(monkeypatch, one_thread, checked):
    """Adding ``act_mean_abs`` = mean(|y|): its name in the schema, its spec, its reduction. Nothing else."""
    monkeypatch.setattr(M, "CHECK_ON_CPU", checked)
    # 1. schema: the name
    monkeypatch.setattr(S, "FORWARD_METRICS", S.FORWARD_METRICS + (ACT_MEAN_ABS,))
    monkeypatch.setattr(S, "ALL_METRICS", S.ALL_METRICS + (ACT_MEAN_ABS,))
    # 2. spec: raw slot, host finish, cross-rank rule
    monkeypatch.setitem(spec.SPECS, ACT_MEAN_ABS, spec.MetricSpec(
        ACT_MEAN_ABS, spec.MOMENTS, ("abs_sum",), lambda r, n: r["abs_sum"] / n, "pooled_mean"))
    # 3. metrics: the device reduction
    monkeypatch.setitem(M.SLOT_REDUCTIONS, ("abs_sum",), M.SlotReduction(
        lambda flat: (flat.abs().sum().item(),), lambda flat, work: [flat.abs().sum()]))
    spec.validate(spec.SPECS, S.ALL_METRICS, spec.COMBINE)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    seen = {}
    handles = [model[i].register_forward_hook(lambda m, a, y, i=i: seen.__setitem__(str(i), y.detach().double()))
               for i in (0, 2, 4)]
    with gradscope.attach(model, blocks=[model[0], model[2], model[4]],
                          metrics=[S.ACT_VAR, S.ACT_ZERO_FRAC, ACT_MEAN_ABS, S.GRAD_NORM]) as scope:
        model(torch.randn(5, 6)).sum().backward()
        scope.step()
    for h in handles:
        h.remove()
    frame = scope.frame().set_index(["block", "metric"])["value"]
    assert set(frame.index.get_level_values("metric")) == {S.ACT_VAR, S.ACT_ZERO_FRAC, ACT_MEAN_ABS, S.GRAD_NORM}
    for block, y in seen.items():
        assert frame[(block, ACT_MEAN_ABS)] == pytest.approx(y.abs().mean().item(), rel=1e-6)
        assert frame[(block, S.ACT_VAR)] == pytest.approx(torch.var(y, unbiased=False).item(), rel=1e-5)
        assert frame[(block, S.ACT_ZERO_FRAC)] == pytest.approx((y == 0).double().mean().item())


def test_internal_moment_slots_use_the_named_metric_spec():
    assert spec.spec_of("_" + S.ACT_MEAN) is spec.SPECS[S.ACT_MEAN]
    assert spec.raw_slots(("_act_mean", S.BRANCH_VAR, "_act_rms")) == spec.CORE_SLOTS
    assert spec.raw_slots(S.FORWARD_METRICS) == spec.CORE_SLOTS + ("zeros", "nonfinite", "min", "max")
    assert all(math.isnan(v) for v in spec.finish(S.FORWARD_METRICS[:3], [0.0] * 3, 0, spec.MOMENTS))
