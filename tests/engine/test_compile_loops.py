"""torch.compile after attach in two common loops (issue 20): blocks under non-reentrant activation checkpointing,
and a hand-written mixture of experts whose routing breaks the graph. gradscope must compile exactly as many graphs
as the model alone, break none, and record what the eager run records."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

import gradscope
from tests.reference import assert_matches, measured, reference_metrics

WIDTH = 8


class _Block(nn.Module):
    gradscope_block = True

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class _Checkpointed(nn.Module):
    """Every block runs under non-reentrant ``torch.utils.checkpoint`` (a higher-order op under Dynamo)."""

    def __init__(self, depth: int = 3, use_checkpoint: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(depth))
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.use_checkpoint else block(x)
        return x


class _MoE(nn.Module):
    """Top-1 routing written by hand: an expert runs on the rows routed to it, and is skipped when none are (the
    ``numel() == 0`` test breaks Dynamo's graph on data). Two layers share the experts, so each runs twice a step."""

    def __init__(self, experts: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.gate = nn.Linear(WIDTH, experts)
        self.experts = nn.ModuleList(_Block() for _ in range(experts))
        self.layers = layers

    def forward(self, x):
        for _ in range(self.layers):
            route = self.gate(x).argmax(-1)
            out = torch.zeros_like(x)
            for i, expert in enumerate(self.experts):
                rows = (route == i).nonzero().flatten()
                if rows.numel() == 0:
                    continue
                out = out.index_add(0, rows, expert(x[rows]))
            x = x + out
        return x


def _batch(step: int) -> torch.Tensor:
    return torch.randn(16, WIDTH, generator=torch.Generator().manual_seed(step))


def _run(model: nn.Module, steps: int, backend=None, attach=True, blocks=r"(blocks|experts)\.\d+"):
    """Train ``steps`` SGD steps; returns (frame or None, graphs compiled, graph breaks)."""
    torch._dynamo.reset()
    counters.clear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.attach(model, blocks=blocks) if attach else None
    run = torch.compile(model, backend=backend) if backend else model
    for step in range(steps):
        run(_batch(step)).pow(2).mean().backward()
        if scope is not None:
            scope.step()
        opt.step()
        opt.zero_grad()
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    frame = None
    if scope is not None:
        scope.detach()
        frame = scope.frame()
    torch._dynamo.reset()
    return frame, graphs, breaks


def _assert_same(eager, compiled, rel=1e-5):
    key = ["step", "block", "call", "metric"]
    merged = eager.merge(compiled, on=key, how="outer", suffixes=("_eager", "_compiled"), indicator=True)
    assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"][key].head(10)
    assert merged.value_compiled.to_numpy() == pytest.approx(merged.value_eager.to_numpy(), rel=rel, abs=1e-7)
    depth = ["block", "depth"]
    assert eager[depth].drop_duplicates().sort_values("block").values.tolist() == \
        compiled[depth].drop_duplicates().sort_values("block").values.tolist()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_checkpointed_blocks_compile_into_the_same_single_graph_as_without_gradscope(one_thread, backend):
    """Before: the traced hooks appended to a Python list inside the checkpoint higher-order op, Dynamo refused the
    side effect and gave up on the whole frame: 0 graphs, the model silently ran uncompiled."""
    torch.manual_seed(0)
    model = _Checkpointed()
    _, plain_graphs, _ = _run(copy.deepcopy(model), 3, backend, attach=False)
    compiled, graphs, breaks = _run(copy.deepcopy(model), 3, backend)
    eager, _, _ = _run(copy.deepcopy(model), 3)
    assert plain_graphs == 1 and graphs == plain_graphs and breaks == 0
    assert set(compiled.metric) >= {"act_var", "grad_norm", "grad_in_norm", "param_grad_norm"}
    _assert_same(eager, compiled)


def test_checkpointed_compiled_values_equal_an_autograd_reference(one_thread):
    torch.manual_seed(1)
    model = _Checkpointed()
    names = [f"blocks.{i}" for i in range(3)]
    plain = _Checkpointed(use_checkpoint=False)
    plain.load_state_dict(model.state_dict())  # the same weights, no recomputation for the reference's hooks
    want = reference_metrics(plain, names, lambda m: m(_batch(0)).pow(2).mean())
    torch._dynamo.reset()
    scope = gradscope.attach(model, blocks=names)
    torch.compile(model, backend="aot_eager")(_batch(0)).pow(2).mean().backward()
    scope.step()
    scope.detach()
    torch._dynamo.reset()
    assert assert_matches(measured(scope.frame()), want, rtol=1e-5) >= 3 * 7


def test_routed_moe_compiles_no_more_graphs_than_without_gradscope(one_thread, caplog):
    """Before: hooks that ran after the routing's graph break were compiled as frames of their own and guarded on the
    length of an internal list: a recompile per routing pattern, Dynamo's recompile limit hit (18 graphs, not 5)."""
    torch.manual_seed(0)
    model = _MoE()
    caplog.set_level(logging.WARNING)
    _, plain_graphs, plain_breaks = _run(copy.deepcopy(model), 12, "aot_eager", attach=False)
    compiled, graphs, breaks = _run(copy.deepcopy(model), 12, "aot_eager")
    eager, _, _ = _run(copy.deepcopy(model), 12)
    assert graphs == plain_graphs and breaks == plain_breaks
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]
    assert compiled.call.max() == 1  # each expert ran in both layers: two calls, kept apart
    assert set(compiled.metric) >= {"act_var", "grad_norm", "grad_in_norm"}
    _assert_same(eager, compiled)


def test_routed_moe_with_checkpointed_experts_matches_eager(one_thread):
    """Both at once: experts under checkpoint, called after the routing's graph break."""

    class _CheckpointedMoE(_MoE):
        def forward(self, x):
            for _ in range(self.layers):
                route = self.gate(x).argmax(-1)
                out = torch.zeros_like(x)
                for i, expert in enumerate(self.experts):
                    rows = (route == i).nonzero().flatten()
                    if rows.numel() == 0:
                        continue
                    out = out.index_add(0, rows, checkpoint(expert, x[rows], use_reentrant=False))
                x = x + out
            return x

    torch.manual_seed(2)
    model = _CheckpointedMoE()
    compiled, _, _ = _run(copy.deepcopy(model), 4, "aot_eager")
    eager, _, _ = _run(copy.deepcopy(model), 4)
    _assert_same(eager, compiled)


def test_a_compiled_recorded_step_reads_back_once(one_thread):
    """The traced buffers, the parameter norms and every other measurement of a recorded step come back in one
    transfer (on a GPU: one synchronisation per recorded step), and the forward and backward read nothing."""
    from tests.engine.test_lifecycle import SyncCounter

    torch.manual_seed(0)
    model = _Checkpointed()
    torch._dynamo.reset()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scope = gradscope.attach(model, blocks=r"blocks\.\d+", optimizer=opt)
    run = torch.compile(model, backend="aot_eager")
    for step in range(3):
        with SyncCounter() as during:
            loss = run(_batch(step)).pow(2).mean()
            loss.backward()
        with SyncCounter() as at_step:
            scope.step(loss)
        opt.step()
        opt.zero_grad()
        if step:  # step 0 compiled (Dynamo may read values then)
            assert during.calls == [] and at_step.calls == ["tolist"], (during.calls, at_step.calls)
    scope.detach()
    torch._dynamo.reset()
    frame = scope.frame()
    assert set(frame.metric) >= {"act_var", "grad_norm", "grad_in_norm", "param_grad_norm", "update_ratio"}


@pytest.mark.parametrize("forwards, expected", [("all", 4.0), ("eval", 9.0)])
def test_compiled_batch_size_under_forwards_all_is_the_training_forwards(one_thread, forwards, expected):
    """As in eager mode (test_training_record.py): a validation forward (batch 9) that runs first in the step is
    recorded under forwards="all", but batch_size is the training forward's (4); under forwards="eval" the
    validation forward is the only one recorded, and its batch is the step's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    torch._dynamo.reset()
    scope = gradscope.attach(model, blocks=["0", "2"], forwards=forwards)
    run = torch.compile(model, backend="aot_eager")
    for _ in range(2):
        with torch.no_grad():
            run(torch.randn(9, 12))
        run(torch.randn(4, 12)).sum().backward()
        scope.step()
    scope.detach()
    torch._dynamo.reset()
    frame = scope.frame()
    assert frame.query("metric == 'batch_size'").value.tolist() == [expected, expected]
    if forwards == "all":
        assert sorted(frame.query("step == 1 and block == '0' and metric == 'act_var'").call) == [0, 1]


def test_gradient_accumulation_under_compile_names_every_block_it_costs_gradient_rows(one_thread):
    """Three micro-batches per step: every block ran three times and lost its gradient rows, but the warning named
    block '0' only, as if the others were fine. It now names each block and how often it ran."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    fast = torch.compile(model, backend="aot_eager")
    with pytest.warns(RuntimeWarning) as caught:
        with gradscope.attach(model, blocks=["0", "2", "4"]) as scope:
            for micro in range(3):
                torch.manual_seed(micro)
                fast(torch.randn(4, 6)).pow(2).mean().backward()
            scope.step()
    said = [str(w.message) for w in caught if "ran more than once" in str(w.message)]
    assert len(said) == 1, said
    assert "3 block(s) ran more than once in step 0: '0' (3 calls), '2' (3 calls), '4' (3 calls)" in said[0]
    frame = scope.frame()
    assert not frame["metric"].isin(["grad_norm", "grad_in_norm"]).any()  # what the warning says is gone
    assert sorted(frame.loc[frame["metric"] == "act_var", "call"].unique()) == [0, 1, 2]  # forward rows per call
