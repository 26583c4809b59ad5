"""A NaN traced to its operator: a NaN/Inf injected into one operator of one block is named (aten op and module
path) in first_nonfinite(), the warning, NonFiniteError, the divergence alert and alerts.csv; healthy steps keep
no inputs past scope.step(); the replay restores buffers and says when it cannot reproduce."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradscope
from gradscope import store
from gradscope.engine.nonfinite import NonFiniteError


class Poison(nn.Module):
    """One operator of one block can be made to produce a non-finite value: ``op`` applied when ``on``."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.on = False

    def forward(self, x):
        if not self.on:
            return x
        if self.op == "sqrt":
            return torch.sqrt(x - 10.0)              # negative: NaN
        if self.op == "exp":
            return torch.exp(x * 1000.0)             # overflow: Inf
        if self.op == "log_":
            return (x - 10.0).log_()                 # in place
        raise AssertionError(self.op)


class Block(nn.Module):
    def __init__(self, op: str = "sqrt") -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.inner = nn.Sequential(nn.Linear(16, 16), Poison(op))
        self.act = nn.GELU()

    def forward(self, x):
        return x + self.act(self.inner(self.norm(self.lin(x))))


def net(op: str = "sqrt") -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(op) for _ in range(4)], nn.Linear(16, 3))


def _train(model, steps, poison_at, scope_kwargs=None, optimizer_first=True):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.attach(model, blocks=[f"{i}" for i in range(4)], optimizer=opt,
                              **(scope_kwargs or {})) as scope:
            for step in range(steps):
                model[2].inner[1].on = step == poison_at
                loss = model(torch.randn(8, 16)).pow(2).mean()
                loss.backward()
                if optimizer_first:
                    opt.step()
                scope.step(loss)
                if not optimizer_first:
                    opt.step()
                opt.zero_grad()
    return scope, [str(w.message) for w in caught]


@pytest.mark.parametrize("op, name", [("sqrt", "aten.sqrt"), ("exp", "aten.exp"), ("log_", "aten.log_")])
def test_the_operator_and_module_of_an_injected_nan_are_named(op, name, one_thread):
    scope, messages = _train(net(op), 4, poison_at=2, optimizer_first=False)
    first = scope.first_nonfinite()
    assert first["forward"] == (2, "2")
    assert first["operator"] == (2, name, "2.inner.1")
    assert any(f"made by {name} in module '2.inner.1'" in m for m in messages), messages
    alerts = scope.alerts()
    div = alerts[alerts.kind == "divergence"].iloc[0]
    assert div.step == 2 and div.block == "2" and div.origin == f"{name} in '2.inner.1'"


def test_an_update_between_forward_and_step_replays_on_the_weights_the_forward_saw(one_thread, tmp_path):
    """optimizer.step() before scope.step(): the NaN gradients made the weights NaN; the replay uses the copies the
    update ratio took before the step, so the operator is still found."""
    scope, messages = _train(net(), 3, poison_at=1, scope_kwargs={"out": tmp_path, "on_anomaly": None})
    assert scope.first_nonfinite()["operator"] == (1, "aten.sqrt", "2.inner.1")
    assert not torch.isfinite(scope.model[2].lin.weight).all()  # what a replay on the new weights would see
    saved = store.read_alerts(tmp_path)  # alerts.csv keeps the origin
    assert list(saved[saved.kind == "divergence"].origin)[:1] == ["aten.sqrt in '2.inner.1'"]
    # without the update ratio's copy, the replay runs on the updated (NaN) weights: it cannot say, and says why
    scope, messages = _train(net(), 3, poison_at=1, scope_kwargs={"metrics": ["act_nonfinite", "grad_norm"]})
    assert "operator" not in scope.first_nonfinite()
    assert any("cannot say: the weights changed after the forward" in m for m in messages), messages
    assert not any("came in through the weights" in m for m in messages), messages


def test_raise_names_the_operator(one_thread):
    model = net()
    model[1].inner[1].op, model[1].inner[1].on = "exp", True
    with pytest.raises(NonFiniteError, match=r"made by aten.exp in module '1.inner.1'"):
        with gradscope.attach(model, blocks=[f"{i}" for i in range(4)], on_nonfinite="raise") as scope:
            model(torch.randn(8, 16)).sum().backward()
            scope.step()


def test_a_non_finite_weight_is_named_as_the_origin_not_an_operator(one_thread):
    model = net()
    with torch.no_grad():
        model[3].norm.weight[5] = float("nan")
    scope, messages = _train(model, 1, poison_at=-1)
    assert scope.first_nonfinite()["forward"] == (0, "3")
    assert "operator" not in scope.first_nonfinite()
    assert any("parameter '3.norm.weight' is already non-finite" in m for m in messages), messages
    div = scope.alerts().query("kind == 'divergence'").iloc[0]  # the alert says why too (its note was empty)
    assert div.origin == "" and "operator not found in block '3'" in div.note
    assert "parameter '3.norm.weight' is already non-finite" in div.note


def test_healthy_steps_keep_nothing_past_the_step_and_ignore_turns_it_off(one_thread):
    model = net()
    scope, messages = _train(model, 3, poison_at=-1)
    assert "operator" not in scope.first_nonfinite() and not messages
    assert all(calls == [] for calls in scope._tracer.kept)
    with gradscope.attach(model, on_nonfinite="ignore") as quiet:
        assert quiet._tracer is None and quiet._probe.keep is None


def test_the_replay_restores_buffers_and_hooks(one_thread):
    torch.manual_seed(0)

    class BNBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(16)
            self.poison = Poison("sqrt")

        def forward(self, x):
            return self.poison(self.bn(x))

    model = nn.Sequential(nn.Linear(16, 16), BNBlock(), nn.Linear(16, 3))
    model[1].poison.on = True
    with gradscope.attach(model, blocks=["0", "1", "2"], on_nonfinite="ignore") as _:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradscope.attach(model, blocks=["0", "1", "2"]) as scope:
            model(torch.randn(8, 16)).sum().backward()
            mean, count = model[1].bn.running_mean.clone(), model[1].bn.num_batches_tracked.clone()
            scope.step()
    assert scope.first_nonfinite()["operator"] == (0, "aten.sqrt", "1.poison")
    assert torch.equal(model[1].bn.running_mean, mean) and torch.equal(model[1].bn.num_batches_tracked, count)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_nan_that_does_not_come_back_on_replay_is_said(one_thread):
    class Flaky(nn.Module):
        calls = 0

        def forward(self, x):
            Flaky.calls += 1
            return x * float("nan") if Flaky.calls == 1 else x  # a NaN once, like a dropout draw

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Sequential(nn.Linear(16, 16), Flaky()), nn.Linear(16, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.attach(model, blocks=["0", "1", "2"]) as scope:
            model(torch.randn(8, 16)).sum().backward()
            scope.step()
    assert "operator" not in scope.first_nonfinite()
    assert any("the replay gave finite values" in str(w.message) for w in caught)


class _LogOfNegative(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.norm, self.gate = nn.Linear(16, 16), nn.LayerNorm(16), nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.log(self.gate(self.norm(self.lin(x))) - 0.5)  # NaN wherever the gate is below 0.5


def test_weights_updated_before_scope_step_without_optimizer_are_not_blamed():
    """The nan-origin page's loop order (optimizer.step() before scope.step()) with attach() not given the
    optimizer: the update spoiled the weights after the forward, and the replay blamed them ("parameter '2.lin.weight'
    is already non-finite: the NaN came in through the weights") although the forward's weights were finite and
    aten.log made the NaN. It now says it cannot tell, and why; given the optimizer, it names aten.log."""
    import warnings

    for given in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), _LogOfNegative(), nn.Linear(16, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with gradscope.attach(model, blocks=["0", "2", "3"], **({"optimizer": optimizer} if given else {})) \
                    as scope:
                model(torch.randn(8, 16)).pow(2).mean().backward()
                optimizer.step()
                scope.step()
        alert = scope.alerts().iloc[0]
        if given:
            assert alert["origin"] == "aten.log in '2'"
        else:
            assert alert["origin"] == "" and "the NaN came in through the weights" not in alert["note"]
            assert "cannot say: the weights changed after the forward" in alert["note"]
            assert "pass optimizer= to attach() and keep the update_ratio metric" in alert["note"]


class _MaskedBlock(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(1, 2) / 4 + mask, -1) @ v
        return x + torch.log(self.proj(a))  # the bug: the log of a negative number


class _MaskedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.blk, self.head = nn.Linear(8, 16), _MaskedBlock(), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blk(self.emb(x), nn.Transformer.generate_square_subsequent_mask(x.shape[1])))


def test_an_additive_mask_with_minus_inf_is_not_a_non_finite_input():
    """A block given the standard causal mask (-inf above the diagonal) was always reported as "the block's input
    was already non-finite", so the real bug inside it was never named."""
    torch.manual_seed(0)
    net = _MaskedNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradscope.attach(net, blocks=["emb", "blk", "head"]) as scope:
            net(torch.randn(4, 6, 8)).pow(2).mean().backward()
            scope.step()
    assert scope.first_nonfinite()["operator"] == (0, "aten.log", "blk")


def _first_step_origin(model, blocks, batch):
    """Train one step with gradscope attached; the divergence alert's origin and note, and first_nonfinite()."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with gradscope.attach(model, blocks=blocks, optimizer=opt) as scope:
            loss = model(*batch).pow(2).mean()
            loss.backward()
            scope.step(loss=loss)
            opt.step()
    alert = scope.alerts().iloc[0]
    return alert.origin, alert.note, scope.first_nonfinite()


class SafeSqrtThenLog(nn.Module):
    """The "safe sqrt" idiom (a NaN only in the branch ``where`` drops) before a real bug (log of a negative)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.lin2 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = self.lin(x)
        r = torch.where(h > 0, torch.sqrt(h), torch.zeros_like(h))
        return x + torch.log(self.lin2(r))


def test_a_nan_that_never_reaches_the_output_is_not_named(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), SafeSqrtThenLog(), nn.Linear(16, 3))
    x = torch.randn(8, 16)
    with torch.no_grad():  # the reference, by hand: sqrt makes NaNs that where() drops; log makes the output's
        h = model[1].lin(model[0](x))
        assert torch.sqrt(h).isnan().any() and torch.where(h > 0, torch.sqrt(h), 0.0).isfinite().all()
        assert torch.log(model[1].lin2(torch.where(h > 0, torch.sqrt(h), 0.0))).isnan().any()
    origin, _, first = _first_step_origin(model, ["0", "1", "2"], (x,))
    assert origin == "aten.log in '1'"  # before: aten.sqrt, the first NaN of the replay
    assert first["operator"] == (0, "aten.log", "1")


class MaskedAttention(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x, mask):  # mask: True = padding; a row of all padding makes softmax 0/0
        q, k, v = self.qkv(x).chunk(3, -1)
        s = (q @ k.transpose(1, 2) / 4.0).masked_fill(mask[:, None, :], float("-inf"))
        return x + self.out(torch.softmax(s, -1) @ v)


class MaskedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.attn, self.head = nn.Linear(8, 16), MaskedAttention(), nn.Linear(16, 3)

    def forward(self, x, mask):
        return self.head(self.attn(self.emb(x), mask))


def test_a_fully_masked_row_names_the_softmax_not_the_mask(one_thread):
    torch.manual_seed(0)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[1, :] = True
    origin, _, _ = _first_step_origin(MaskedNet(), ["emb", "attn", "head"], (torch.randn(4, 5, 8), mask))
    assert origin == "aten._softmax in 'attn'"  # the -inf of masked_fill is meant; the 0/0 of the softmax is not


class WithTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.register_buffer("pos", torch.randn(16))

    def forward(self, x):
        return self.lin(x) + self.pos


def test_a_nan_loaded_into_a_buffer_is_named_in_the_note(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), WithTable(), nn.Linear(16, 3))
    state = model.state_dict()
    state["1.pos"][3] = float("nan")  # a corrupted checkpoint
    model.load_state_dict(state)
    origin, note, _ = _first_step_origin(model, ["0", "1", "2"], (torch.randn(8, 16),))
    assert origin == "aten.add in '1'" and "buffer '1.pos'" in note


class NormOfInf(nn.Module):
    """A batch norm fed an infinity makes NaNs (inf - inf) and spoils its running statistics in the same forward."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(16, 16), nn.BatchNorm1d(16)

    def forward(self, x):
        return self.bn(torch.exp(self.lin(x) * 200.0))


def test_batch_norm_running_statistics_spoiled_by_the_same_forward_are_not_blamed(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), NormOfInf(), nn.Linear(16, 3))
    origin, note, _ = _first_step_origin(model, ["0", "1", "2"], (torch.randn(8, 16),))
    assert not model[1].bn.running_var.isfinite().all()  # spoiled by the step's forward, before the replay
    # the output's NaNs were made by the batch norm from the infinities exp made by overflowing: the exp is named,
    # and the running statistics the batch norm writes (already NaN at the replay) are not read as a NaN buffer
    assert origin == "aten.exp in '1'"
    assert "became NaN in aten.native_batch_norm" in note or "became NaN in aten._native_batch_norm" in note
    assert "buffer" not in note


class SliceWrite(nn.Module):
    """A NaN written into a slice of a tensor (``out[:, :8] = log(h)``, a RoPE-style idiom) or made in place on a
    view (``h[:, :4].log_()``): the whole tensor is read later."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.lin, self.lin2, self.in_place = nn.Linear(16, 16), nn.Linear(16, 16), in_place

    def forward(self, x):
        h = self.lin(x)
        if self.in_place:
            h[:, :4].log_()
            out = h
        else:
            out = h * 2.0
            out[:, :8] = torch.log(h[:, :8])
        return x + self.lin2(out)


@pytest.mark.parametrize("in_place, op", [(False, "aten.log"), (True, "aten.log_")])
def test_a_nan_written_into_a_slice_or_a_view_is_named(in_place, op, one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), SliceWrite(in_place), nn.Linear(16, 3))
    origin, note, _ = _first_step_origin(model, ["0", "1", "2"], (torch.randn(8, 16),))
    assert origin == f"{op} in '1'" and note == ""  # before: aten.addmm, "came in through a tensor it reads"


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        h = self.lin(x)
        return x + torch.where(h > 0, torch.sqrt(h), torch.log(h + 0.3))


def test_where_names_the_branch_whose_nans_it_kept(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), TwoBranches(), nn.Linear(16, 3))
    x = torch.randn(8, 16)
    with torch.no_grad():  # by hand: every NaN of the output comes from the log branch, none from the sqrt one
        h = model[1].lin(model[0](x))
        out = torch.where(h > 0, torch.sqrt(h), torch.log(h + 0.3))
        assert out.isnan().any() and not (torch.sqrt(h).isnan() & (h > 0) & out.isnan()).any()
    origin, _, _ = _first_step_origin(model, ["0", "1", "2"], (x,))
    assert origin == "aten.log in '1'"  # before: aten.sqrt, the first NaN input of the where


class NormedTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("pos", torch.randn(16))
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x + self.pos)


def test_an_infinity_in_a_buffer_is_not_taken_for_a_mask(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), NormedTable(), nn.Linear(16, 3))
    with torch.no_grad():
        model[1].pos[3] = float("inf")
    origin, note, _ = _first_step_origin(model, ["0", "1", "2"], (torch.randn(8, 16),))
    assert origin == "aten.add in '1'" and "buffer '1.pos'" in note  # before: the layer norm, no word of the buffer


def test_the_replay_keeps_no_intermediate_alive():
    """Following NaNs through a deep block must not hold every non-finite intermediate until the replay ends (a
    40-layer block took ten times its forward's memory): sources are kept by weak reference; only views written in
    place are held, and their memory is an input's anyway."""
    from gradscope.engine.oporigin import _Provenance

    x = torch.full((256, 256), -1.0)
    mode = _Provenance(lambda: "blk", {})
    with torch.no_grad(), mode:
        h = torch.log(x)  # NaN everywhere
        for _ in range(20):
            h = h * 1.5 + 1.0  # each a new 256 KiB tensor carrying the NaN on
        h[:, :4].mul_(2.0)  # an in-place write into a view of the last
        result = h
    assert mode.source_of(result) == ("aten.log", "blk", "")
    assert len(mode.alive) == 1 and mode.alive[0].data_ptr() == result.data_ptr()  # the view alone
    living = [ref() for ref, _ in mode.nan_from.values() if ref is not None and ref() is not None]
    assert all(t is result or t.data_ptr() == result.data_ptr() for t in living)  # no intermediate is held
    # (each of the 40 intermediates was freed as the forward went on; their ids were reused, their entries with them)
