"""Numeric edge cases of real training loops (issue 20): empty block outputs, parameters that are all zero before a
step, fp16 parameter gradients that overflow without a GradScaler, complex-valued layers.

Every test runs through ``gradscope.attach`` and checks against an independent reference (plain autograd,
``torch.linalg.vector_norm``, a hand computation).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import gradscope
from gradscope.engine import spec


# ---- 1. empty block outputs (an MoE expert that receives no token) ----------------------------------------------

class Expert(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class HardRoutedMoE(nn.Module):
    """Hand-written MoE as older code does it: every expert is called, with the tokens routed to it (maybe none)."""

    def __init__(self, width: int = 8, experts: int = 3) -> None:
        super().__init__()
        self.experts = nn.ModuleList([Expert(width) for _ in range(experts)])
        self.route = [0] * 16  # token -> expert, set by the test

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.tensor(self.route[: x.shape[0]])
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            chosen = idx == e
            out = out.index_put((chosen,), expert(x[chosen]))
        return x + out


def _moe_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), HardRoutedMoE(), HardRoutedMoE(), nn.Linear(8, 1))


def test_an_expert_with_no_tokens_makes_no_rows_and_no_divergence():
    model = _moe_model()
    model[1].route = [0] * 8  # experts 1 and 2 of the first MoE layer get no token
    model[2].route = [0, 1, 2, 0, 1, 2, 0, 1]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 8)
    # the reference: expert 0's output and its gradient, by plain autograd
    seen = {}

    def keep(module, args, y):
        y.retain_grad()
        seen["y"] = y

    model[1].experts[0].register_forward_hook(keep)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.attach(model, blocks=Expert, optimizer=opt, on_anomaly="warn") as scope:
            for _ in range(3):
                loss = model(x).pow(2).mean()
                loss.backward()
                opt.step()
                scope.step(loss=loss)
                opt.zero_grad()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 0, messages  # no NaN warning, no alert; the idle experts ran (empty): no idle warning
    frame = scope.frame()
    assert frame.value.map(math.isfinite).all(), frame[~frame.value.map(math.isfinite)]
    counts = frame[frame.metric == "act_nonfinite"].value
    assert len(counts) and (counts == 0).all()
    idle = frame[frame.block.isin(["1.experts.1", "1.experts.2"])]
    activation_or_gradient = ("act_mean", "act_var", "act_rms", "act_zero_frac", "act_nonfinite", "grad_norm",
                              "grad_in_norm")
    assert idle[idle.metric.isin(activation_or_gradient)].empty  # an empty output: no row at all
    busy = frame[(frame.block == "1.experts.0") & (frame.step == 2)].set_index("metric").value
    y = seen["y"].detach().double()
    assert busy["act_var"] == pytest.approx(torch.var(y, unbiased=False).item(), rel=1e-5)
    assert busy["grad_norm"] == pytest.approx(seen["y"].grad.norm().item(), rel=1e-5)
    assert scope.first_nonfinite() == {}
    assert "divergence" not in set(scope.alerts().kind)
    verdicts = gradscope.verdicts(frame, step="all")
    assert "diverged" not in set(verdicts.verdict)


def test_an_empty_output_under_raise_policy_does_not_raise():
    model = _moe_model()
    model[1].route = [1] * 8
    with gradscope.attach(model, blocks=Expert, on_nonfinite="raise") as scope:
        model(torch.randn(8, 8)).sum().backward()
        scope.step()
    assert scope.first_nonfinite() == {}


def test_empty_moments_and_norms_finish_to_no_value():
    group = ("act_mean", "act_var", "act_rms", "act_zero_frac", "act_nonfinite")
    raw = gradscope.engine.metrics.activation_sums(torch.empty(0, 4))
    assert spec.finish(group, list(raw.tolist()), 0, spec.MOMENTS) == []
    assert spec.finish(("grad_norm",), [0.0], 0, spec.SQNORM) == []
    assert spec.finish(("grad_norm",), [4.0], 3, spec.SQNORM) == [2.0]
    # ranks: one rank saw no token, the other did: the global moments are the other rank's
    assert spec.combine(group, [[], [1.0, 2.0, 3.0, 0.5, 0.0]], [0, 10], 2, spec.MOMENTS) == \
        pytest.approx([1.0, 2.0, 3.0, 0.5, 0.0])


# ---- 2. parameters all zero before the step ---------------------------------------------------------------------

class ZeroInitResidual(nn.Module):
    """x + branch(x) with the branch's last layer zero-initialised (timm's zero_init_last, Goyal et al. 2017)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_update_ratio_of_parameters_that_were_all_zero_makes_no_row_and_no_alert():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), ZeroInitResidual(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, target = torch.randn(16, 8), torch.randn(16, 1)
    blocks = ["0", "1.fc1", "1.fc2", "2"]
    before, after = [], []
    with gradscope.attach(model, blocks=blocks, optimizer=opt) as scope:
        for _ in range(2):
            before.append({n: torch.cat([p.detach().flatten().clone() for p in model.get_submodule(n).parameters()])
                           for n in blocks})
            loss = (model(x) - target).pow(2).mean()
            loss.backward()
            opt.step()
            after.append({n: torch.cat([p.detach().flatten().clone() for p in model.get_submodule(n).parameters()])
                          for n in blocks})
            scope.step(loss=loss)
            opt.zero_grad()
    ratios = scope.frame().query("metric == 'update_ratio'").set_index(["step", "block"]).value
    assert before[0]["1.fc2"].abs().max() == 0 and (after[0]["1.fc2"] - before[0]["1.fc2"]).norm() > 0
    assert (0, "1.fc2") not in ratios.index  # ||theta|| was exactly 0: undefined, no row (never ~1e35)
    for step in (0, 1):
        for name in blocks:
            if (step, name) == (0, "1.fc2"):
                continue
            want = ((after[step][name] - before[step][name]).norm() / before[step][name].norm()).item()
            assert ratios[(step, name)] == pytest.approx(want, rel=1e-5)
    assert ratios[(0, "1.fc1")] == 0  # fc2 == 0 blocks fc1's gradient at the first step: it did not move
    assert ratios[0].max() < 0.1
    alerts = scope.alerts()
    assert alerts[alerts.step == 0].empty  # no ~1e35 ratio, no band alert from the zero block or the one it shields
    # one step later fc2's weights are tiny and its second update is as large: a real ratio near 1, which the band
    # may name; it is a measured value, not an artefact of a clamped denominator
    assert 0.1 < ratios[(1, "1.fc2")] < 10


def test_update_band_skips_blocks_that_did_not_move_unless_none_moved():
    from gradscope.engine.alerts import update_band

    rows = [(0, "a", 0, 0, "update_ratio", 0.0), (0, "b", 1, 0, "update_ratio", 1e-3)]
    assert update_band(0, rows, (1e-5, 1e-1)) is None  # "a" got no gradient (idle expert, zero-init branch)
    still = update_band(0, [(0, "a", 0, 0, "update_ratio", 0.0), (0, "b", 1, 0, "update_ratio", 0.0)], (1e-5, 1e-1))
    assert still.block == "a" and still.others == ("b",)  # lr=0: nothing moved, the band fires
    slow = update_band(0, rows + [(0, "c", 2, 0, "update_ratio", 1e-7)], (1e-5, 1e-1))
    assert slow.block == "c"


def test_ratio_finishing_keeps_divergence_and_drops_only_the_undefined():
    assert spec.ratios([0.5, 0.0, 2.0, math.inf], [0.0, 0.0, 4.0, 0.0]) == [None, None, 0.5, math.inf]
    got = spec.ratios([math.nan], [0.0])
    assert len(got) == 1 and math.isnan(got[0])
    # FSDP2 shards: numerators and denominators of two ranks' shards
    assert spec.combine_shards([[3.0, 0.0], [4.0, 0.0]], spec.SHARD_RATIO, 1) == [None]
    assert spec.combine_shards([[3.0, 3.0], [4.0, 4.0]], spec.SHARD_RATIO, 1) == [1.0]


# ---- 3. fp16 parameter-gradient overflow without a GradScaler ---------------------------------------------------

def _fp16_overflow_run(on_nonfinite: str):
    """fp16 weights on the CPU; the inputs are large (~100) and the first layer's weights small, so the first weight
    gradient (a sum over 4096 rows of ~100 * 0.3) overflows fp16 while every activation and every later weight
    gradient stays finite."""
    model = _fp16_model(3)
    x = (torch.randn(4096, 4) + 100).half()
    scope = gradscope.attach(model, on_nonfinite=on_nonfinite)
    model(x).float().sum().backward()
    return model, scope


def _fp16_model(depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(depth)]).half()
    with torch.no_grad():
        model[0].weight.mul_(0.01)
    return model


def test_fp16_weight_gradient_overflow_is_found_without_a_scaler():
    model, scope = _fp16_overflow_run("ignore")
    scope.step()
    scope.detach()
    finite = {name: bool(torch.isfinite(m.weight.grad).all()) for name, m in model.named_children()}
    assert finite == {"0": False, "1": True, "2": True}  # the reference: the first layer's weight gradient overflowed
    frame = scope.frame()
    grads = frame[frame.metric.isin(["grad_norm", "grad_in_norm"])].value
    assert grads.map(math.isfinite).all()  # activation gradients are finite: only parameters overflowed
    assert scope.first_nonfinite() == {"backward": (0, "0")}
    verdicts = gradscope.verdicts(frame, step="all")  # the backward signal diverged; the activations are finite
    backward, forward = (verdicts[verdicts.signal == s] for s in ("backward", "forward"))
    assert set(backward.verdict) == {"diverged"} and set(backward.nonfinite_block) == {"0"}
    assert "diverged" not in set(forward.verdict) and forward.nonfinite_block.isna().all()


def test_fp16_weight_gradient_overflow_raises_and_warns():
    _, scope = _fp16_overflow_run("raise")
    with pytest.raises(gradscope.NonFiniteError, match="backward pass first at block '0'"):
        scope.step()
    scope.detach()
    _, scope = _fp16_overflow_run("warn")
    with pytest.warns(RuntimeWarning, match="backward pass: block '0'"):
        scope.step()
    scope.detach()


def test_fp16_weight_gradient_overflow_is_a_divergence_alert():
    model = _fp16_model(2)
    x = (torch.randn(4096, 4) + 100).half()
    with gradscope.attach(model, on_nonfinite="ignore") as scope:
        loss = model(x).float().sum()
        loss.backward()
        scope.step(loss=loss)
    alerts = scope.alerts()
    assert list(alerts.kind) == ["divergence"]
    assert alerts.metric[0] == "param_grad_norm" and alerts.block[0] == "0"


def test_a_forward_nan_still_names_the_forward_and_activation_gradient_blocks():
    """A NaN weight in block 1 makes every later block's weight gradient NaN (their inputs are NaN): the backward
    finding stays block 1, where the activation gradient turned NaN, not the deepest NaN weight gradient."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with gradscope.attach(model, on_nonfinite="ignore") as scope:
        model(torch.randn(2, 4)).sum().backward()
        scope.step()
    assert not torch.isfinite(model[3].weight.grad).all()
    assert scope.first_nonfinite() == {"forward": (0, "1"), "backward": (0, "1")}


# ---- 4. complex-valued layers -----------------------------------------------------------------------------------

class ComplexLinear(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width, dtype=torch.cfloat) / width ** 0.5)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight


def test_complex_layers_are_measured_as_complex_numbers():
    torch.manual_seed(0)
    model = nn.Sequential(ComplexLinear(), ComplexLinear(), ComplexLinear())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    z = torch.randn(5, 6, dtype=torch.cfloat) + 0.3
    outs = []

    def keep(module, args, y):
        y.retain_grad()
        outs.append(y)

    for m in model:
        m.register_forward_hook(keep)
    before = [m.weight.detach().clone() for m in model]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Casting complex values to real discards the imaginary part"
        with gradscope.attach(model, optimizer=opt, metrics="all") as scope:
            loss = model(z).abs().pow(2).mean()
            loss.backward()
            opt.step()
            scope.step()
    rows = scope.frame().set_index(["block", "metric"]).value
    for i, y in enumerate(outs):
        y64 = y.detach().to(torch.complex128)
        mean = y64.mean()
        assert rows[(str(i), "act_mean")] == pytest.approx(abs(mean.item()), rel=1e-5)
        assert rows[(str(i), "act_var")] == pytest.approx((y64 - mean).abs().pow(2).mean().item(), rel=1e-5)
        assert rows[(str(i), "act_rms")] == pytest.approx(
            (torch.linalg.vector_norm(y64) / y64.numel() ** 0.5).item(), rel=1e-5)
        assert rows[(str(i), "act_max_abs")] == pytest.approx(y64.abs().max().item(), rel=1e-5)
        assert rows[(str(i), "act_zero_frac")] == 0 and rows[(str(i), "act_nonfinite")] == 0
        assert rows[(str(i), "grad_norm")] == pytest.approx(torch.linalg.vector_norm(y.grad).item(), rel=1e-5)
    assert rows[("1", "grad_in_norm")] == pytest.approx(torch.linalg.vector_norm(outs[0].grad).item(), rel=1e-5)
    for i, m in enumerate(model):
        assert rows[(str(i), "param_norm")] == pytest.approx(torch.linalg.vector_norm(m.weight).item(), rel=1e-5)
        assert rows[(str(i), "param_grad_norm")] == pytest.approx(
            torch.linalg.vector_norm(m.weight.grad).item(), rel=1e-5)
        want = torch.linalg.vector_norm(m.weight.detach() - before[i]) / torch.linalg.vector_norm(before[i])
        assert rows[(str(i), "update_ratio")] == pytest.approx(want.item(), rel=1e-5)


def test_complex_moments_agree_on_the_device_path_and_count_nonfinite_elements():
    z = torch.tensor([1 + 1j, 0j, complex(float("nan"), 0.0), 3 - 4j], dtype=torch.cfloat)
    metrics = gradscope.engine.metrics
    for check in (True, False):
        raw = metrics.activation_sums(z[[0, 1, 3]], max_abs=True, check_on_host=check)
        values = list(raw) if isinstance(raw, tuple) else raw.tolist()
        mean, var, rms, zero_frac, nonfinite, max_abs = metrics.finish_moments(values, 3, max_abs=True)
        assert mean == pytest.approx(abs((4 - 3j) / 3))
        assert rms == pytest.approx(math.sqrt((2 + 0 + 25) / 3))
        assert var == pytest.approx(rms ** 2 - mean ** 2)
        assert (zero_frac, nonfinite, max_abs) == (pytest.approx(1 / 3), 0, pytest.approx(5.0))
    raw = metrics.activation_sums(z, check_on_host=False).tolist()
    assert metrics.finish_moments(raw, 4)[4] == 1.0  # one element with a NaN part


def test_the_non_finite_scan_finds_counts_and_values_and_is_not_fooled_by_an_overflowing_sum():
    """first_nonfinite_rows skips its row-by-row scan when a sum of all values is finite: an act_nonfinite count on
    its own (finite values everywhere else) must still be found, and finite values whose sum overflows must not be
    reported."""
    from gradscope import schema as S
    from gradscope.engine.nonfinite import first_nonfinite_rows
    from gradscope.engine.recorder import Rows
    from gradscope.engine.sites import Site

    sites = [Site("a", nn.Identity(), "Identity"), Site("b", nn.Identity(), "Identity")]
    depth = {0: 0, 1: 1}

    def rows(*triples):
        r = Rows()
        for site, metric, value in triples:
            r.step.append(3), r.site.append(site), r.call.append(0), r.metric.append(metric), r.value.append(value)
        return r

    assert first_nonfinite_rows(rows((0, S.ACT_VAR, 1.0), (1, S.GRAD_NORM, 2.0)), 0, depth, sites) == {}
    assert first_nonfinite_rows(rows((0, S.ACT_VAR, 1e308), (1, S.ACT_VAR, 1e308)), 0, depth, sites) == {}
    found = first_nonfinite_rows(rows((0, S.ACT_ZERO_FRAC, 0.5), (1, S.ACT_NONFINITE, 2.0)), 0, depth, sites)
    assert found == {"forward": (3, "b")}
    found = first_nonfinite_rows(rows((0, S.GRAD_NORM, float("nan")), (1, S.GRAD_NORM, 1.0)), 0, depth, sites)
    assert found == {"backward": (3, "a")}
    # rows before ``start`` are not looked at
    assert first_nonfinite_rows(rows((0, S.GRAD_NORM, float("inf")), (1, S.GRAD_NORM, 1.0)), 1, depth, sites) == {}


@pytest.mark.parametrize("mean, std", [(1e30, 1e29), (1.5e38, 1e37), (-1e25, 3e24)])
def test_finite_activations_whose_float32_squares_overflow_are_measured_in_float64(mean, std):
    """Finite float32 activations beyond ~1e19: their squares (and past ~3e38/N their sum) overflow float32, and
    act_rms and act_var came out inf (act_mean NaN near the top of the range) while act_nonfinite said 0. The CPU
    path now sees the overflow and sums such a tensor in float64, against a float64 reference through attach."""
    torch.manual_seed(0)

    class Shift(nn.Module):
        def forward(self, x):
            return x * 1.0

    model = nn.Sequential(Shift(), Shift())
    x = (torch.randn(4096, dtype=torch.float64) * std + mean).float()
    assert torch.isfinite(x).all()
    with gradscope.attach(model, blocks=["0"], on_nonfinite="ignore") as scope:
        model(x.requires_grad_(True)).sum().backward()
        scope.step()
    rows = scope.frame().set_index("metric").value
    ref = x.double()
    assert rows["act_nonfinite"] == 0
    for metric, want in (("act_mean", ref.mean()), ("act_var", ref.var(unbiased=False)),
                         ("act_rms", ref.square().mean().sqrt())):
        assert math.isfinite(rows[metric]) and rows[metric] == pytest.approx(want.item(), rel=1e-5), metric
