"""Compiled blocks that share one gradient tap (engine/shared.py): block k+1's ``grad_in_norm`` is block k's output
gradient only where that is provable. Wherever it is not (block k's hooks ran eagerly, block k ran twice, a hook or a
module changed after attach, a second backward), the row comes from a real measurement or a warning names the block
and the step: no ``grad_norm`` / ``grad_in_norm`` row goes missing or wrong silently. References: gradscope eager
(verified against autograd elsewhere) and ``tests/reference.py`` (autograd on probe leaves)."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import gradscope
from gradscope.engine import shared as SH
from tests.reference import assert_matches, measured, reference_metrics

GRADS = ("grad_norm", "grad_in_norm")


class _Lin(nn.Module):
    gradscope_block = True

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def _seq(n: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[_Lin() for _ in range(n)])


def _x() -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def _grads(frame):
    """``{(step, block, call, metric): value}`` of the gradient rows."""
    rows = frame[frame.metric.isin(GRADS)]
    return {(int(s), b, int(c), m): float(v) for s, b, c, m, v in zip(rows.step, rows.block, rows.call, rows.metric,
                                                                      rows.value)}


def _record(model, blocks, run, steps: int = 1, between=None):
    """Attach to ``model``, call ``run(model)`` (a forward that returns the loss) for ``steps`` recorded steps;
    ``between(model, step)`` runs after each step's ``scope.step()``. Returns the frame."""
    scope = gradscope.attach(model, blocks=blocks)
    for step in range(steps):
        run(model).backward()
        scope.step()
        if between is not None:
            between(model, step)
    scope.detach()
    return scope.frame()


def _eager_and_compiled_with(install):
    """The frames of one step of ``_seq()`` attached, eager then under aot_eager, each with a user's hook that
    ``install(model)`` registers after attach (and that is removed after the step)."""
    x = _x()
    frames = []
    for backend in (None, "aot_eager"):
        model = _seq()
        scope = gradscope.attach(model, blocks=["0", "1", "2"])
        handle = install(model)
        try:
            run = torch.compile(model, backend=backend) if backend else model
            run(x).pow(2).sum().backward()
        finally:
            handle.remove()
        scope.step()
        scope.detach()
        frames.append(scope.frame())
    return frames


def _same_grads(eager, compiled, keys=None):
    want, got = _grads(eager), _grads(compiled)
    if keys is not None:
        want = {k: v for k, v in want.items() if keys(k)}
        got = {k: v for k, v in got.items() if keys(k)}
    assert set(got) == set(want), (sorted(set(want) - set(got)), sorted(set(got) - set(want)))
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    return len(want)


# ---- case 1: block k's hooks run eagerly while block k+1's are traced (only some blocks compiled) ------------------

def test_a_compiled_tail_after_an_eager_block_records_its_input_gradient(one_thread, dynamo):
    """Block 0 runs eagerly, ``torch.compile(model[1:])`` the rest (a stem kept eager, a pipeline stage): block 1's
    traced pre-hook shared block 0's output tap, but block 0's hooks ran eagerly and wrote nothing into the traced
    buffers, and its grad_in_norm row was lost. Block 1 is the first child of the Sequential that calls it now
    (``model[1:]``), so it taps its own input (and the drain would lend block 0's eager measurement otherwise:
    test_a_source_whose_hooks_ran_eagerly_lends_its_eager_measurement)."""
    model, x = _seq(), _x()
    names = ["0", "1", "2"]
    want = reference_metrics(model, names, lambda m: m(x).pow(2).sum())
    eager = _record(copy.deepcopy(model), names, lambda m: m(x).pow(2).sum())
    tail = torch.compile(model[1:], backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled = _record(model, names, lambda m: tail(m[0](x)).pow(2).sum())
    assert _same_grads(eager, compiled) == 6
    assert assert_matches(measured(compiled), want, rtol=1e-5) >= 3 * 9


def test_blocks_compiled_one_by_one_run_their_hooks_eagerly_and_lose_no_row(one_thread, dynamo):
    """``block.compile()`` per block: Dynamo runs the hooks of a compiled ``_call_impl`` eagerly, so no traced
    pre-hook shares anything; every gradient row equals eager."""
    model, x = _seq(), _x()
    eager = _record(copy.deepcopy(model), ["0", "1", "2"], lambda m: m(x).pow(2).sum())
    for block in model:
        block.compile(backend="aot_eager")
    assert _same_grads(eager, _record(model, ["0", "1", "2"], lambda m: m(x).pow(2).sum())) == 6


# ---- case 2: block k called more than once in a step --------------------------------------------------------------

def test_a_block_listed_twice_in_a_sequential_does_not_lend_its_tap(one_thread, dynamo):
    """``Sequential(a, b, a)``: a runs twice, so its tap sums two calls; b (called once) taps its own input and its
    grad_in_norm equals eager (it was missing). a's gradient rows are the known multi-call limitation (warned)."""
    torch.manual_seed(0)
    a, b = _Lin(), _Lin()
    model, x = nn.Sequential(a, b, a), _x()
    eager = _record(copy.deepcopy(model), ["0", "1"], lambda m: m(x).pow(2).sum())
    with pytest.warns(RuntimeWarning, match=r"ran more than once in step 0: .0. \(2 calls\)"):
        compiled = _record(model, ["0", "1"], lambda m: torch.compile(m, backend="aot_eager")(x).pow(2).sum())
    assert _same_grads(eager, compiled, keys=lambda k: k[1] == "1") == 2
    # b (held once) still lends its tap to a's second call; a (held twice) lends nothing
    assert SH.sequential_pairs(model, [a, b]) == [(1, 0)]


class _Reused(nn.Module):
    """A Sequential of two blocks, whose first block the model's own forward calls once more afterwards: nothing in
    the module tree says that block 0 runs twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.seq = nn.Sequential(_Lin(), _Lin())

    def forward(self, x):
        return self.seq[0](self.seq(x))


def test_a_block_called_again_outside_its_sequential_warns_about_the_next_blocks_input_gradient(one_thread, dynamo):
    """Block 0 runs twice (its tap sums both calls), block 1 once with a shared input tap: its grad_in_norm cannot be
    told apart any more, and a warning names block 1 and the step instead of the row vanishing silently."""
    x = _x()
    with pytest.warns(RuntimeWarning) as record:
        compiled = _record(_Reused(), ["seq.0", "seq.1"],
                           lambda m: torch.compile(m, backend="aot_eager")(x).pow(2).sum())
    messages = [str(w.message) for w in record]
    assert any("'seq.1'" in m and "grad_in_norm" in m and "step 0" in m for m in messages), messages
    eager = _grads(_record(_Reused(), ["seq.0", "seq.1"], lambda m: m(x).pow(2).sum()))
    got = _grads(compiled)
    assert set(got) == {(0, "seq.1", 0, "grad_norm")}  # seq.0: the multi-call rule; seq.1's input: left out
    assert got[(0, "seq.1", 0, "grad_norm")] == pytest.approx(eager[(0, "seq.1", 0, "grad_norm")], rel=1e-5)


# ---- case 4: the structure decided at install time changes later --------------------------------------------------

def _doubled(module, args, out):
    return out * 2.0


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_forward_hook_added_after_attach_and_before_compiling_stops_the_sharing(one_thread, dynamo, backend):
    """attach, then a user's forward hook on block 0 that returns a new (doubled) output, then compile: block 1's
    input is no longer block 0's tapped output. The shared value was block 0's grad_norm, twice the true one."""
    x = _x()
    frames = []
    for backend in (None, backend):
        model = _seq()
        scope = gradscope.attach(model, blocks=["0", "1", "2"])
        model[0].register_forward_hook(_doubled)
        run = torch.compile(model, backend=backend) if backend else model
        run(x).pow(2).sum().backward()
        scope.step()
        scope.detach()
        frames.append(scope.frame())
    assert _same_grads(*frames) == 6
    grads = _grads(frames[1])
    assert grads[(0, "1", 0, "grad_in_norm")] == pytest.approx(grads[(0, "0", 0, "grad_norm")] / 2, rel=1e-6)


def test_a_global_forward_hook_added_after_attach_keeps_every_gradient_row(one_thread, dynamo):
    """A global forward hook runs before the block's own hooks (gradscope's tap sees its result), and the check at
    trace time turns the sharing off while one exists: either way every row equals eager."""
    frames = _eager_and_compiled_with(lambda model: nn.modules.module.register_module_forward_hook(
        lambda m, a, out: out * 2.0 if isinstance(m, _Lin) else None))
    assert _same_grads(*frames) == 6


def _replace_middle(model, step):
    if step == 0:
        torch.manual_seed(5)
        model[1] = _Lin()


def test_a_block_replaced_between_compiled_steps_keeps_the_next_blocks_input_gradient(one_thread, dynamo):
    """``model[1] = new`` after step 0: Dynamo recompiles, and block 2's input is the new module's output, which no
    gradscope tap of the old block 1 measured. Block 2's grad_in_norm in step 1 was lost."""
    x = _x()
    eager = _record(_seq(), ["0", "1", "2"], lambda m: m(x).pow(2).sum(), steps=2, between=_replace_middle)
    model = _seq()
    run = torch.compile(model, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the replacement's own warning
        compiled = _record(model, ["0", "1", "2"], lambda m: run(x).pow(2).sum(), steps=2, between=_replace_middle)
    assert _same_grads(eager, compiled, keys=lambda k: k[1] != "1") == 8  # block 1 at step 1: engine/replaced.py


# ---- a second backward through one compiled graph -----------------------------------------------------------------

def test_a_second_backward_under_compile_warns_instead_of_summing_both(one_thread, dynamo):
    """Eager keeps the first backward's gradient norms and warns (recorder._unique); under compile the taps add up
    both backwards, so the rows would be sqrt(2) times the true norm: they are left out, and a warning says so."""
    model, x = _seq(), _x()
    scope = gradscope.attach(model, blocks=["0", "1", "2"])
    loss = torch.compile(model, backend="aot_eager")(x).pow(2).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    with pytest.warns(RuntimeWarning, match="backward"):
        scope.step()
    scope.detach()
    assert not _grads(scope.frame())


# ---- the common case keeps its single tap -------------------------------------------------------------------------

def test_resnet20_keeps_twelve_tap_copies_and_equals_eager(one_thread, dynamo):
    """The check made when Dynamo traces adds no copy where the sharing holds: ResNet-20's recorded forward graph
    holds 12 tap copies (6 of its 9 blocks share the previous block's tap; 18 without the sharing), no graph break,
    and every gradient row equals eager."""
    from gradscope.models import build
    from tests.engine.test_compile import _clones_in_graph

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = build("resnet20", seed=0)
    scope = gradscope.attach(model)
    clones = []
    _clones_in_graph(model, x, clones)  # loss: the sum of squares
    scope.step()
    scope.detach()
    assert clones[0] == 12 and scope._probe.shared_in == [None, 0, 1, None, 3, 4, None, 6, 7]
    assert sum(dynamo["graph_break"].values()) == 0
    eager = _record(build("resnet20", seed=0), "auto", lambda m: m(x).pow(2).sum())
    assert _same_grads(eager, scope.frame()) == 18


class _CheckpointedSeq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seq = _seq()

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.seq, x, use_reentrant=False)


def test_blocks_of_a_checkpointed_sequential_share_their_tap_inside_the_higher_order_op(one_thread, dynamo):
    """The check made at trace time runs inside ``torch.utils.checkpoint``'s higher-order op, which refuses Python
    side effects: Dynamo still compiles one graph without a break, and the shared rows equal eager."""
    x = _x()
    eager = _record(_CheckpointedSeq(), ["seq.0", "seq.1", "seq.2"], lambda m: m(x).pow(2).sum())
    model = _CheckpointedSeq()
    scope = gradscope.attach(model, blocks=["seq.0", "seq.1", "seq.2"])
    torch.compile(model, backend="aot_eager")(x).pow(2).sum().backward()
    codes = [int(b.pre[0, 1]) for b in scope._probe.traced]
    scope.step()
    scope.detach()
    assert codes == [SH.TAPPED, SH.SHARED + 0, SH.SHARED + 1]  # blocks 1 and 2 shared inside the op
    assert _same_grads(eager, scope.frame()) == 6
    assert dynamo["stats"]["unique_graphs"] == 1 and sum(dynamo["graph_break"].values()) == 0


# ---- the drain's rule, on hand-made tap summaries -----------------------------------------------------------------

def _lend(taps, eager=lambda source: None):
    rows, lost = [], []
    SH.lend([(1, 0, 0)], taps, lambda *row: rows.append(row), eager, lambda *why: lost.append(why))
    return rows, lost


@pytest.mark.parametrize("tap, why", [
    (SH.OutTap(1, True, (4.0, 1.0), 32), None),
    (SH.OutTap(2, True, (4.0, 2.0), 32), "ran 2 times in the traced graphs"),
    (SH.OutTap(1, False, (float("nan"), float("nan")), 32), "had no output tap"),  # case 3
    (SH.OutTap(1, True, (8.0, 2.0), 32), "saw 2 backward passes"),
    (SH.OutTap(0, False, (float("nan"), float("nan")), 0), "ran no traced hook"),
])
def test_a_shared_input_gradient_is_lent_only_from_one_call_and_one_backward(tap, why):
    rows, lost = _lend([tap, SH.OutTap(1, True, (1.0, 1.0), 32)])
    if why is None:
        assert rows == [(1, 0, (4.0, 1.0), 32)] and not lost
    else:
        assert rows == [] and lost == [(1, 0, why)]


def test_a_source_whose_hooks_ran_eagerly_lends_its_eager_measurement():
    eager = {0: ((2.5,), 32)}
    rows, lost = _lend([SH.OutTap(0, False, (float("nan"),) * 2, 0), SH.OutTap(1, True, (1.0, 1.0), 32)], eager.get)
    assert rows == [(1, 0, (2.5,), 32)] and not lost
    rows, lost = _lend([SH.OutTap(2, True, (1.0, 2.0), 32), SH.OutTap(1, True, (1.0, 1.0), 32)], eager.get)
    assert rows == [] and lost  # traced calls: the eager entry (if any) is not the one block 1 received


def test_the_trace_time_check_carries_the_marker_of_assume_constant_result():
    def mine(site):
        return site

    def theirs(site):
        return site

    SH.constant_when_traced(mine)
    torch.compiler.assume_constant_result(theirs)
    assert {k: v for k, v in vars(theirs).items()} == {k: v for k, v in vars(mine).items()} != {}


# ---- blocks of a Sequential called one by one by the model's own code ---------------------------------------------

class _OneByOne(nn.Module):
    """The blocks live in an ``nn.Sequential`` (used as a list), but the model's own forward calls them and scales
    block 0's output before block 1: block 1's input is not block 0's output."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = _seq()

    def forward(self, x):
        h = self.seq[0](x) * 0.5
        return self.seq[2](self.seq[1](h))


def test_blocks_of_a_sequential_called_by_the_models_own_code_tap_their_own_inputs(one_thread, dynamo):
    """The install-time rule (consecutive children of an nn.Sequential) assumed that the Sequential's forward runs
    them. Here it does not: the shared value was block 0's grad_norm, half the true grad_in_norm of block 1. The
    check at trace time asks for the Sequential's own forward as the caller."""
    x = _x()
    names = ["seq.0", "seq.1", "seq.2"]
    eager = _record(_OneByOne(), names, lambda m: m(x).pow(2).sum())
    model = _OneByOne()
    run = torch.compile(model, backend="aot_eager")
    compiled = _record(model, names, lambda m: run(x).pow(2).sum())
    assert _same_grads(eager, compiled) == 6


# ---- a block returning a dataclass ---------------------------------------------------------------------------------

@dataclass
class _Out:
    hidden: torch.Tensor


class _DataclassBlock(_Lin):
    def forward(self, x):
        return _Out(torch.tanh(self.fc(x)))


class _DataclassModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = _DataclassBlock(), _DataclassBlock()

    def forward(self, x):
        return self.b(self.a(x).hidden).hidden


def test_a_block_returning_a_dataclass_is_tapped_under_compile_as_in_eager(one_thread, dynamo):
    """Its first floating field is the block's output (engine/hookargs.py): eager hooks it, and the traced tap now
    replaces it in a copy of the dataclass (dataclasses.replace), so both record the output and input gradients.
    (Before dataclasses were read, only the input was tapped, and the traced row once had element count 0.)"""
    x = _x()
    eager = _record(_DataclassModel(), ["a", "b"], lambda m: m(x).pow(2).sum())
    model = _DataclassModel()
    run = torch.compile(model, backend="aot_eager")
    assert _same_grads(eager, _record(model, ["a", "b"], lambda m: run(x).pow(2).sum())) == 4


def _double_input(module, args):
    return (args[0] * 2.0,) + tuple(args[1:])


@pytest.mark.parametrize("where", ["block", "global"])
def test_a_pre_hook_that_runs_before_gradscopes_and_changes_the_input_stops_the_sharing(one_thread, dynamo, where):
    """A user's forward pre-hook on block 1 registered with ``prepend=True`` after attach (or a global one) runs
    before gradscope's and doubles the input: block 1's input is no longer block 0's tapped output."""
    def install(model):
        if where == "block":
            return model[1].register_forward_pre_hook(_double_input, prepend=True)
        return nn.modules.module.register_module_forward_pre_hook(
            lambda m, a: _double_input(m, a) if m is model[1] else None)

    assert _same_grads(*_eager_and_compiled_with(install)) == 6
