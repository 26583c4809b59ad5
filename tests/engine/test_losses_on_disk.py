"""The losses given to ``scope.step(loss=...)`` reach ``out=`` beside the record parts, at every flush: a run killed
after a flush keeps them, ``gradscope.store.read_losses`` reads them back equal to ``scope.losses()``, and a write
redone after an interruption never holds a loss twice."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import gradscope
from gradscope import store
from gradscope.errors import DataError, OutputError


def _train(out, steps, every=1, flush_every=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with gradscope.attach(model, optimizer=opt, out=out, every=every, flush_every=flush_every) as scope:
        for _ in range(steps):
            x = torch.randn(16, 8, generator=g)
            loss = nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long())
            loss.backward()
            scope.step(loss=loss)
            opt.step()
            opt.zero_grad()
    return scope


def test_losses_are_written_beside_the_parts_and_read_back(tmp_path, one_thread):
    scope = _train(tmp_path / "run", steps=22, every=2)
    back = store.read_losses(tmp_path / "run")
    assert list(back.columns) == ["step", "loss"] and back.step.dtype == "int64"
    assert dict(zip(back.step, back.loss)) == scope.losses()  # float32 losses held exactly in float64
    assert list(back.step) == list(range(0, 22, 2))
    assert len(list((tmp_path / "run").glob(store.LOSS_PART_GLOB))) == 3  # flushes after 4 and 8, then at detach
    assert len(gradscope.load(tmp_path / "run")) == len(scope.frame())  # the records do not read the losses


def test_a_run_killed_after_a_flush_keeps_its_losses(tmp_path):
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from torch import nn
        import gradscope
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
        scope = gradscope.attach(model, out={str(out)!r}, flush_every=5)
        for step in range(12):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            loss.backward()
            scope.step(loss=loss)
            print(step, float(loss), flush=True)
            if step == 11:
                os.kill(os.getpid(), signal.SIGKILL)  # no detach, no atexit: what is on disk is what a flush wrote
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    printed = dict(line.split() for line in proc.stdout.split("\n") if line)
    back = store.read_losses(out)
    assert list(back.step) == list(range(10))  # two flushes of five recorded steps; steps 10-11 were in memory
    for step, loss in zip(back.step, back.loss):
        assert loss == pytest.approx(float(printed[str(step)]), rel=1e-6)


def test_a_losses_write_redone_after_an_interruption_holds_each_loss_once(tmp_path, one_thread):
    scope = _train(tmp_path / "run", steps=6, flush_every=4)
    rec = scope._rec
    rec._losses_written = 0  # as if the bookkeeping after the first write had been cut short
    rec.write_part()
    back = store.read_losses(tmp_path / "run")
    assert list(back.step) == list(range(6))
    assert sorted(p.name for p in (tmp_path / "run").glob(store.LOSS_PART_GLOB)) == \
        ["losses-000000000.parquet", "losses-000000004.parquet"]


def test_a_folder_with_losses_of_another_run_is_refused_and_a_damaged_part_is_named(tmp_path, one_thread):
    _train(tmp_path / "run", steps=3)
    for part in (tmp_path / "run").glob(store.PART_GLOB):
        part.unlink()  # only the losses are left: still another run's folder
    with pytest.raises(OutputError, match="already holds"):
        _train(tmp_path / "run", steps=1)
    (tmp_path / "run" / "losses-000000000.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="losses-000000000.parquet"):
        store.read_losses(tmp_path / "run")
    assert store.read_losses(tmp_path / "empty").empty


def test_a_losses_write_that_fails_warns_once_and_a_moved_folder_gets_every_loss(tmp_path, one_thread, monkeypatch):
    real, calls = store.write_losses_part, {"n": 0}

    def flaky(losses, out, first):
        calls["n"] += 1
        if calls["n"] <= 3:  # a full disk for the first three flushes
            raise OSError(28, "No space left on device")
        return real(losses, out, first)

    monkeypatch.setattr(store, "write_losses_part", flaky)
    with pytest.warns(RuntimeWarning) as caught:
        scope = _train(tmp_path / "run", steps=22, flush_every=4)
    assert sum("could not write the losses" in str(w.message) for w in caught) == 1
    assert dict(zip(*store.read_losses(tmp_path / "run")[["step", "loss"]].T.values)) == scope.losses()
    monkeypatch.setattr(store, "write_losses_part", real)
    # the folder moved away mid-run: the new one gets every loss, not only those after the move
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 2))
    out = tmp_path / "moving"
    with pytest.warns(RuntimeWarning, match="moved or deleted"):
        with gradscope.attach(model, out=out, flush_every=2) as scope:
            for step in range(8):
                loss = model(torch.randn(4, 8)).pow(2).mean()
                loss.backward()
                scope.step(loss=loss)
                if step == 4:
                    out.rename(tmp_path / "gone")
    assert list(store.read_losses(out).step) == list(range(8))
