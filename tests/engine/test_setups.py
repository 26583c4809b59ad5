"""Real training setups: gradient accumulation, mixed precision, activation checkpointing, torch.compile."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradscope
from tests import nets
from tests.reference import assert_matches, measured, reference_metrics


def _frame(model, run, steps=1, **kw):
    with gradscope.attach(model, **kw) as scope:
        for _ in range(steps):
            run(model)
            scope.step()
        return scope.frame()


def test_gradient_accumulation_records_each_micro_batch_as_a_call():
    """A step is one optimizer step; micro-batch k is call k; parameter gradients are the accumulated ones."""
    torch.manual_seed(0)
    model = nets.mlp()
    batches = [torch.randn(8, 12) for _ in range(3)]
    frame = _frame(copy.deepcopy(model), lambda m: [m(x).pow(2).mean().backward() for x in batches])
    for k, x in enumerate(batches):
        want = reference_metrics(model, ["2"], lambda m, x=x: m(x).pow(2).mean())
        got = measured(frame)
        for (block, _, metric), value in want.items():
            if metric in ("param_norm", "param_grad_norm"):
                continue
            assert got[(block, k, metric)] == pytest.approx(value, rel=1e-5, abs=1e-7), (k, metric)
    full = copy.deepcopy(model)
    sum(full(x).pow(2).mean() for x in batches).backward()
    accumulated = torch.cat([p.grad.flatten() for p in full[2].parameters()]).norm().item()
    got = frame[(frame.block == "2") & (frame.metric == "param_grad_norm")].value.item()
    assert got == pytest.approx(accumulated, rel=1e-5)


def test_bf16_autocast_statistics_match_float32_of_the_same_tensors():
    torch.manual_seed(0)
    model = nets.conv_bn_net()
    x = torch.randn(8, 3, 8, 8) * 100.0

    def run(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        return out.float().sum()

    frame, names = None, [s.name for s in gradscope.find_blocks(model)]
    frame = _frame(copy.deepcopy(model), lambda m: run(m).backward())
    want = reference_metrics(model, names, run)
    # the references see the same bf16 tensors, reduced in float64: float32 reductions agree to 1e-5
    assert_matches(measured(frame), want, rtol=1e-4)
    assert frame.value.map(math.isfinite).all()


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler appeared in torch 2.3")
def test_grad_scaler_values_are_reported_unscaled():
    torch.manual_seed(0)
    model = nets.mlp()
    x = torch.randn(16, 12)
    plain = _frame(copy.deepcopy(model), lambda m: m(x).pow(2).mean().backward())
    for order in ("scope_first", "scaler_first"):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1)  # the scale changes each step
        scaled_model = copy.deepcopy(model)
        opt = torch.optim.SGD(scaled_model.parameters(), lr=0.0)
        with gradscope.attach(scaled_model, scaler=scaler, optimizer=opt) as scope:
            scaler.scale(scaled_model(x).pow(2).mean()).backward()
            if order == "scope_first":
                scope.step()
            scaler.step(opt)
            scaler.update()
            if order == "scaler_first":  # grads already unscaled by scaler.step, scale already grown
                scope.step()
            frame = scope.frame()
        for metric in ("grad_norm", "grad_in_norm", "param_grad_norm"):
            a = plain[plain.metric == metric].value.to_numpy()
            b = frame[frame.metric == metric].value.to_numpy()
            assert len(a) == len(b) > 0
            assert b == pytest.approx(a, rel=1e-5), (order, metric)


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler appeared in torch 2.3")
@pytest.mark.parametrize("order", ["scope_first", "unscale_then_scope", "scaler_first"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_grad_scaler_values_stay_unscaled_over_steps_whatever_the_order(order, set_to_none):
    """Three steps of each documented order. With ``backward, scope.step(), scaler.step, scaler.update``, the
    optimizer step of one iteration used to mark the next iteration's fresh (scaled) gradients as unscaled:
    ``param_grad_norm`` was the scale (4096-16384) times too large from the second step on. ``lr=0`` keeps the
    weights, so every step's true values are the unscaled run's."""
    torch.manual_seed(0)
    model = nets.mlp()
    x = torch.randn(16, 12)
    plain = _frame(copy.deepcopy(model), lambda m: m(x).pow(2).mean().backward())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1)  # the scale changes each step
    scaled_model = copy.deepcopy(model)
    opt = torch.optim.SGD(scaled_model.parameters(), lr=0.0)
    with gradscope.attach(scaled_model, scaler=scaler, optimizer=opt) as scope:
        for _ in range(3):
            scaler.scale(scaled_model(x).pow(2).mean()).backward()
            if order == "scope_first":
                scope.step()
            if order == "unscale_then_scope":
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(scaled_model.parameters(), 1e9)
                scope.step()
            scaler.step(opt)
            scaler.update()
            if order == "scaler_first":
                scope.step()
            opt.zero_grad(set_to_none=set_to_none)
        frame = scope.frame()
    for metric in ("grad_norm", "grad_in_norm", "param_grad_norm"):
        want = plain[plain.metric == metric].value.to_numpy()
        for step in range(3):
            got = frame[(frame.metric == metric) & (frame.step == step)].value.to_numpy()
            assert len(got) == len(want) > 0
            assert got == pytest.approx(want, rel=1e-5), (metric, step)


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler appeared in torch 2.3")
@pytest.mark.parametrize("first", ["D", "G"])
def test_grad_scaler_with_two_optimizers_keeps_the_generators_gradients_unscaled(first):
    """A GAN step (scaler.step(opt_d), then the generator's backward and scaler.step(opt_g), update, scope.step):
    only the first optimizer's step was watched, so with [opt_d, opt_g] the generator's param_grad_norm was divided
    by the scale once more (1024x too small). Any optimizer's step now marks the gradients it used."""
    torch.manual_seed(0)
    gen, disc = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6)), nn.Sequential(nn.Linear(6, 1))
    z, real = torch.randn(16, 4), torch.randn(16, 6)

    def generator_grads(scaler):
        g, d = copy.deepcopy(gen), copy.deepcopy(disc)
        opt_g, opt_d = torch.optim.SGD(g.parameters(), lr=0.0), torch.optim.SGD(d.parameters(), lr=0.0)
        model = nn.ModuleDict({"G": g, "D": d})
        scale = scaler.scale if scaler else (lambda t: t)
        step = scaler.step if scaler else (lambda o: o.step())
        with gradscope.attach(model, blocks=["G.0", "G.2"], scaler=scaler,
                              optimizer=[opt_d, opt_g] if first == "D" else [opt_g, opt_d]) as scope:
            for _ in range(2):
                opt_d.zero_grad()
                opt_g.zero_grad()
                scale(d(real).mean() - d(g(z).detach()).mean()).backward()
                step(opt_d)
                scale(-d(g(z)).mean()).backward()
                step(opt_g)
                if scaler:
                    scaler.update()
                scope.step()
            frame = scope.frame()
        rows = frame[frame.metric == "param_grad_norm"].sort_values(["step", "block"])
        return rows.value.to_numpy()

    want = generator_grads(None)
    got = generator_grads(torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert len(got) == len(want) == 4 and got == pytest.approx(want, rel=1e-5)


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler appeared in torch 2.3")
def test_a_step_the_scaler_skips_for_an_inf_keeps_the_finite_blocks_unscaled():
    """scaler.step skips the optimizer when a gradient is inf, so no step hook runs, and update() forgets the stage:
    the finite blocks' param_grad_norm was divided by the scale again (4096x too small). A scale that changed since
    the backward (update() backs off after an inf) now says unscale_ ran; the check stays on the device."""
    torch.manual_seed(0)
    model = nets.mlp()
    x = torch.randn(16, 12)
    plain = _frame(copy.deepcopy(model), lambda m: m(x).pow(2).mean().backward())
    want = plain[plain.metric == "param_grad_norm"].set_index("block").value
    scaled = copy.deepcopy(model)
    opt = torch.optim.SGD(scaled.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    last = list(scaled.parameters())[-2]  # the last block's weight
    with gradscope.attach(scaled, scaler=scaler, optimizer=opt, on_nonfinite="ignore") as scope:
        scaler.scale(scaled(x).pow(2).mean()).backward()
        last.grad[0, 0] = float("inf")  # an overflow: scaler.step skips the optimizer
        scaler.step(opt)
        scaler.update()
        scope.step()
        frame = scope.frame()
    got = frame[frame.metric == "param_grad_norm"].set_index("block").value
    finite = [b for b in got.index if math.isfinite(got[b])]
    assert len(finite) == len(got) - 1
    for block in finite:
        assert got[block] == pytest.approx(want[block], rel=1e-5), block


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.blocks = nn.ModuleList(nets.ConvBNReLU(3 if i == 0 else 8, 8) for i in range(4))
        self.head = nn.Linear(8, 5)
        self.reentrant = reentrant
        self.use_checkpoint = True

    def forward(self, x):
        for block in self.blocks:
            if self.use_checkpoint:
                x = checkpoint(block, x, use_reentrant=self.reentrant)
            else:
                x = block(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_recomputed_forwards_once(reentrant):
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    x = torch.randn(4, 3, 8, 8, requires_grad=reentrant)  # reentrant checkpointing needs an input that requires grad
    run = lambda m: m(x).logsumexp(1).sum().backward()
    eager = copy.deepcopy(model)
    eager.use_checkpoint = False
    want = _frame(eager, run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _frame(copy.deepcopy(model), run)
    assert (got.call == 0).all()
    key = ["step", "block", "call", "metric"]
    merged = want.merge(got, on=key, how="outer", suffixes=("_eager", "_ckpt"), indicator=True)
    assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"]
    assert merged.value_ckpt.to_numpy() == pytest.approx(merged.value_eager.to_numpy(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_attach_then_compile_gives_eager_numbers(backend):
    torch.manual_seed(0)
    model = nets.mlp()
    xs = [torch.randn(16, 12) for _ in range(4)]
    eager = copy.deepcopy(model)
    with gradscope.attach(eager, every=2) as scope:
        for x in xs:
            eager(x).pow(2).mean().backward()
            scope.step()
        want = scope.frame()
    compiled_src = copy.deepcopy(model)
    with gradscope.attach(compiled_src, every=2) as scope:
        compiled = torch.compile(compiled_src, backend=backend)
        for x in xs:
            compiled(x).pow(2).mean().backward()
            scope.step()
        got = scope.frame()
    assert sorted(got.step.unique()) == [0, 2]
    merged = want.merge(got, on=["step", "block", "call", "metric"], suffixes=("_eager", "_compiled"))
    assert len(merged) == len(want) == len(got)
    assert merged.value_compiled.to_numpy() == pytest.approx(merged.value_eager.to_numpy(), rel=1e-4, abs=1e-6)


def test_attaching_to_a_compiled_module_explains_the_order():
    compiled = torch.compile(nets.mlp(), backend="aot_eager")
    with pytest.raises(gradscope.GradscopeError, match="Attach first, then compile"):
        gradscope.attach(compiled)


def test_a_recorded_step_where_no_block_ran_warns():
    model = nets.mlp()
    other = nets.mlp()
    with gradscope.attach(model) as scope:
        other(torch.randn(2, 12)).sum().backward()  # the user trains a different object
        with pytest.warns(RuntimeWarning, match="no hooked block ran during recorded step 0"):
            scope.step()


def test_a_compiled_submodule_is_refused_too():
    model = nn.Sequential(nets.mlp(), nn.Linear(5, 2))
    model[0] = torch.compile(model[0], backend="aot_eager")
    with pytest.raises(gradscope.GradscopeError, match=r"torch.compile-d module \(0\)"):
        gradscope.attach(model)
