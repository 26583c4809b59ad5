"""Every fault path keeps its rows: an exception before step(), a forgotten scope, SIGTERM, a full disk, a second
backward; and memory stays bounded while streaming. Rows on disk are counted against steps recorded."""
from __future__ import annotations

import errno
import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import gradscope
from gradscope import schema as S
from gradscope import store
from tests import nets

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


def _step(model, scope, x=None):
    x = torch.randn(4, 12) if x is None else x
    model(x).sum().backward()
    scope.step()
    model.zero_grad()


def test_an_exception_before_step_under_raise_keeps_every_row_and_the_users_exception(tmp_path):
    model = nets.mlp(width=8, depth=2)
    with pytest.raises(ValueError, match="loss is not finite"):  # the user's exception, not NonFiniteError
        with gradscope.attach(model, out=tmp_path, on_nonfinite="raise") as scope:
            for _ in range(8):
                _step(model, scope)
            loss = model(torch.full((4, 12), float("inf"))).sum()
            if not torch.isfinite(loss):
                raise ValueError("loss is not finite")
    on_disk = gradscope.load(tmp_path)
    assert sorted(on_disk.step.unique()) == list(range(9))  # 8 closed steps and the open one's forward rows
    assert (on_disk[(on_disk.step == 8) & (on_disk.metric == S.ACT_NONFINITE)].value > 0).any()
    pd.testing.assert_frame_equal(on_disk, scope.frame())


def test_detach_under_raise_writes_first_then_raises(tmp_path):
    model = nets.mlp(width=8, depth=2)
    scope = gradscope.attach(model, out=tmp_path, on_nonfinite="raise")
    _step(model, scope)
    model(torch.full((4, 12), float("nan"))).sum()
    with pytest.raises(gradscope.NonFiniteError):
        scope.detach()
    assert sorted(gradscope.load(tmp_path).step.unique()) == [0, 1]
    assert all(len(getattr(m, "_forward_hooks")) == 0 for m in model.modules())


def test_a_scope_collected_without_detach_writes_its_rows(tmp_path):
    def forgotten():
        model = nets.mlp(width=8, depth=2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)  # its hooks tie model and scope in a cycle
        scope = gradscope.attach(model, out=tmp_path, optimizer=opt)
        for _ in range(7):
            _step(model, scope)
            opt.step()

    forgotten()
    gc.collect()
    assert sorted(gradscope.load(tmp_path).step.unique()) == list(range(7))


_SCRIPT = """
import os, signal, sys, time, torch
sys.path.insert(0, {root!r})
import gradscope
from tests import nets
torch.set_num_threads(1)
if {own_handler}:
    def mine(signum, frame):
        open({marker!r}, "w").write("called")
        sys.exit(3)
    signal.signal(signal.SIGTERM, mine)
model = nets.mlp(width=8, depth=2)
scope = gradscope.attach(model, out={out!r}, flush_every=10)
step = 0
while True:
    model(torch.randn(4, 12)).sum().backward()
    scope.step()
    step += 1
    print(step, flush=True)
    time.sleep(0.01)
"""


def _run_until(tmp_path, own_handler: bool, steps: int = 15):
    script = _SCRIPT.format(root=str(ROOT), own_handler=own_handler, marker=str(tmp_path / "marker"),
                            out=str(tmp_path / "out"))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    done = 0
    deadline = time.time() + 120
    while done < steps and time.time() < deadline:
        done = int(proc.stdout.readline() or 0)
    os.kill(proc.pid, signal.SIGTERM)  # mid-stream: 15 closed steps, one part of 10 written, 5 in memory
    rest = proc.stdout.read().split()
    proc.wait(timeout=60)
    return proc.returncode, int(rest[-1]) if rest else done


@pytest.mark.parametrize("own_handler", [False, True])
def test_sigterm_flushes_every_recorded_step_then_does_what_the_signal_would(tmp_path, own_handler):
    code, closed = _run_until(tmp_path, own_handler)
    if own_handler:  # the user's handler still runs, after the rows are written
        assert code == 3 and (tmp_path / "marker").read_text() == "called"
    else:  # no handler of the user's: the process dies of SIGTERM, as without gradscope (143 in a shell)
        assert code == -signal.SIGTERM
        # and its provenance says so (it said "running", with no end, forever)
        record = json.loads((tmp_path / "out" / "provenance.json").read_text())
        assert record["status"] == "interrupted" and record["signal"] == "SIGTERM" and record["finished"]
        assert record["steps"] >= closed
    steps = sorted(gradscope.load(tmp_path / "out").step.unique())
    assert closed >= 15
    assert steps[:closed] == list(range(closed))  # every closed step is on disk (and at most the open one)
    assert len(steps) in (closed, closed + 1)


def _no_space(calls: list, fail: int):
    real = store.write_part

    def write_part(frame, out, index):
        calls.append(index)
        if len(calls) <= fail:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(frame, out, index)

    return write_part


def test_a_full_disk_does_not_end_the_training_loop_and_the_next_flush_retries(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(store, "write_part", _no_space(calls, fail=2))
    model = nets.mlp(width=8, depth=2)
    with pytest.warns(RuntimeWarning, match=f"could not write records part 0 to {str(tmp_path)!r}: "
                                            f"No space left on device; its .* rows stay in memory"):
        with gradscope.attach(model, out=tmp_path, flush_every=2) as scope:
            for _ in range(7):
                _step(model, scope)  # no OSError escapes step()
            assert len(scope.frame()) > 0
    assert calls[:3] == [0, 0, 0]  # retried at the next flush, under the same part number
    pd.testing.assert_frame_equal(gradscope.load(tmp_path), scope.frame())
    assert sorted(scope.frame().step.unique()) == list(range(7))


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs (root only): a disk that really fills up."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs refused here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_keeps_training_and_every_row_in_memory(tiny_tmpfs):
    model = nets.mlp(width=8, depth=2)
    with pytest.warns(RuntimeWarning, match="No space left on device"):
        with gradscope.attach(model, out=tiny_tmpfs / "run", flush_every=1) as scope:
            for _ in range(60):  # a part is a few KiB: the 64 KiB fill up well before the end
                _step(model, scope)
    frame = scope.frame()
    assert sorted(frame.step.unique()) == list(range(60))
    on_disk = gradscope.load(tiny_tmpfs / "run")
    assert 0 < on_disk.step.nunique() < 60
    pd.testing.assert_frame_equal(on_disk, frame[frame.step < on_disk.step.nunique()].reset_index(drop=True))


def test_streaming_keeps_memory_bounded_and_frame_reads_the_parts_back(tmp_path):
    flush_every, steps = 5, 53

    def run(out):
        torch.manual_seed(0)
        model = nets.mlp(width=8, depth=4)
        with gradscope.attach(model, out=out, flush_every=flush_every) as scope:
            for step in range(steps):
                torch.manual_seed(100 + step)
                _step(model, scope)
                if out is not None:  # rows already in parts leave memory
                    assert len(scope._rec.rows) <= flush_every * len(scope.sites) * len(S.DEFAULT_METRICS)
                if step == 20:
                    middle = scope.frame()
        return scope.frame(), middle

    streamed, middle = run(tmp_path)
    in_memory, middle_in_memory = run(None)  # the same batches, nothing on disk: every row kept in memory
    pd.testing.assert_frame_equal(streamed, in_memory)
    pd.testing.assert_frame_equal(middle, middle_in_memory)
    pd.testing.assert_frame_equal(gradscope.load(tmp_path), streamed)
    assert sorted(streamed.step.unique()) == list(range(steps))


def test_a_second_backward_through_one_graph_keeps_the_first_and_warns():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(3, 4)
    with pytest.warns(RuntimeWarning, match=r"a second backward through block '\d' in step 0"):
        with gradscope.attach(model, blocks=[model[0], model[2], model[4]]) as scope:
            out = model(x)
            out.sum().backward(retain_graph=True)
            (3 * out).sum().backward()
            scope.step()
    frame = scope.frame()
    assert not frame.duplicated([S.STEP, S.BLOCK, S.CALL, S.METRIC]).any()
    # reference: autograd on the first loss alone
    h0 = model[0](x)
    h0.retain_grad()
    model[4](model[3](model[2](model[1](h0)))).sum().backward()
    got = frame[(frame.block == "0") & (frame.metric == S.GRAD_NORM)].value.item()
    assert got == pytest.approx(h0.grad.norm().item(), rel=1e-6)


def test_a_forked_child_never_writes_the_parents_rows(tmp_path):
    """A DataLoader worker is a fork: its copies of the scopes must not write parts into the parent's folder."""
    model = nets.mlp(width=8, depth=2)
    with gradscope.attach(model, out=tmp_path, flush_every=100) as scope:
        _step(model, scope)
        pid = os.fork()
        if pid == 0:  # the child: what SIGTERM or the exit writer would run there
            from gradscope.engine import scope as scope_module

            scope_module.LIVE.write_all()
            os._exit(0)
        os.waitpid(pid, 0)
        assert not list(tmp_path.glob("part-*.parquet"))
    assert [p.name for p in tmp_path.glob("part-*.parquet")] == ["part-000000.parquet"]


@pytest.mark.parametrize("every", [1, 2])
def test_an_input_reused_across_steps_keeps_one_hook_and_its_own_gradient_per_step(every):
    """A leaf input with requires_grad reused every step (input-gradient methods, adversarial training) outlives each
    step's graph: gradscope's hook from step k must not fire again in step k+1's backward (it piled up, recorded the
    new gradient under old steps and warned of a second backward that never happened)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(3, 4, requires_grad=True)
    expected = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no spurious "second backward" warning
        with gradscope.attach(model, blocks=[model[0], model[2], model[4]], every=every) as scope:
            for step in range(5):
                x.grad = None
                (model(x) * (step + 1)).sum().backward()
                expected[step] = x.grad.norm().item()
                scope.step()
                assert len(x._backward_hooks or {}) <= 1  # one live hook at most, not one per recorded step
    assert not x._backward_hooks  # detach() leaves no hook on the user's tensor
    frame = scope.frame()
    rows = frame[(frame.block == "0") & (frame.metric == S.GRAD_IN_NORM)].set_index(S.STEP).value
    assert sorted(rows.index) == list(range(0, 5, every))
    for step, value in rows.items():
        assert value == pytest.approx(expected[step], rel=1e-6)


def test_a_forked_child_killed_by_sigterm_leaves_the_parents_provenance_alone(tmp_path):
    """A fork worker (multiprocessing, Pool.terminate()) holds copies of the scopes; its SIGTERM marked the parent's
    still-running run as interrupted."""
    model = nets.mlp(width=8, depth=2)
    with gradscope.attach(model, out=tmp_path / "run") as scope:
        _step(model, scope)
        pid = os.fork()
        if pid == 0:  # the child: dies of SIGTERM through gradscope's handler
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        assert json.loads((tmp_path / "run" / "provenance.json").read_text())["status"] == "running"
    assert json.loads((tmp_path / "run" / "provenance.json").read_text())["status"] == "finished"
