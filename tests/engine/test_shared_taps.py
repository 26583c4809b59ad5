"""Compiled blocks that share one gradient tap (engine/shared.py): block k+1's ``grad_in_norm`` is block k's output
gradient only where that is provable. Wherever it is not (block k's hooks ran eagerly, block k ran twice, a hook or a
module changed after attach, a second backward), the row comes from a real measurement or a warning names the block
and the step: no ``grad_norm`` / ``grad_in_norm`` row goes missing or wrong silently. References: gradscope eager
(verified against autograd elsewhere) and ``tests/reference.py`` (autograd on probe leaves)."""
from __future__ import annotations

import copy
import warnings

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
    traced pre-hook shares block 0's output tap, but block 0's hooks ran eagerly and wrote nothing into the traced
    buffers. Its grad_in_norm row was lost; now it is block 0's eager measurement of the same tensor."""
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
    with pytest.warns(RuntimeWarning, match="ran 2 times"):
        compiled = _record(model, ["0", "1"], lambda m: torch.compile(m, backend="aot_eager")(x).pow(2).sum())
    assert _same_grads(eager, compiled, keys=lambda k: k[1] == "1") == 2
    # b (held once) still lends its tap to a's second call; a (held twice) lends nothing
    assert SH.shared_inputs(SH.sequential_pairs(model, [a, b]), [a, b], set()) == [1, None]


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
    assert ("seq.1", "grad_norm") in {(b, m) for _, b, _, m in _grads(compiled)}


# ---- case 4: the structure decided at install time changes later --------------------------------------------------

def _doubled(module, args, out):
    return out * 2.0


def test_a_forward_hook_added_after_attach_and_before_compiling_stops_the_sharing(one_thread, dynamo):
    """attach, then a user's forward hook on block 0 that returns a new (doubled) output, then compile: block 1's
    input is no longer block 0's tapped output. The shared value was block 0's grad_norm, twice the true one."""
    x = _x()
    frames = []
    for backend in (None, "aot_eager"):
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


def test_a_global_forward_hook_added_after_attach_stops_the_sharing(one_thread, dynamo):
    x = _x()
    frames = []
    for backend in (None, "aot_eager"):
        model = _seq()
        scope = gradscope.attach(model, blocks=["0", "1", "2"])
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, a, out: out * 2.0 if isinstance(m, _Lin) else None)
        try:
            run = torch.compile(model, backend=backend) if backend else model
            run(x).pow(2).sum().backward()
        finally:
            handle.remove()
        scope.step()
        scope.detach()
        frames.append(scope.frame())
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
