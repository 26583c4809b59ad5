"""A signal handler that raises (Ctrl-C's KeyboardInterrupt) may land on any line of the part bookkeeping: no row
may end up in two parts, and none may be lost.

The interruption is injected with ``sys.settrace`` at every line executed inside the functions that write and
release parts, one run per line, so every interruption point is tried, deterministically.
"""
from __future__ import annotations

import sys

import pandas as pd
import pytest
import torch

import gradscope
from gradscope import store
from gradscope.engine.recorder import Recorder
from tests import nets

KEY = ["step", "block", "call", "metric"]
TARGETS = {Recorder.write_part.__code__, Recorder.release.__code__, Recorder._write_frame.__code__,
           store.write_part.__code__, store.atomic_write.__code__}


class _InterruptAt:
    """A tracer that raises KeyboardInterrupt at the ``at``-th line executed inside :data:`TARGETS`."""

    def __init__(self, at: int) -> None:
        self.at, self.seen = at, 0

    def __call__(self, frame, event, arg):
        if frame.f_code not in TARGETS:
            return None
        return self.local

    def local(self, frame, event, arg):
        if event == "line":
            self.seen += 1
            if self.seen == self.at:
                raise KeyboardInterrupt
        return self.local


def _run(out, at: int) -> tuple:
    """Train until the interruption (or 7 steps), then leave the ``with`` as a stopped loop does."""
    torch.manual_seed(0)
    model = nets.mlp(width=8, depth=2)
    tracer = _InterruptAt(at)
    interrupted = False
    with gradscope.attach(model, out=out, flush_every=2) as scope:
        sys.settrace(tracer)
        try:
            for _ in range(7):
                model(torch.randn(4, 12)).sum().backward()
                scope.step()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sys.settrace(None)
    return scope.frame(), interrupted, tracer.seen


def _parts(out) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(out.glob("part-*.parquet"))], ignore_index=True)


def test_an_interruption_on_any_line_of_the_part_bookkeeping_neither_duplicates_nor_loses_rows(tmp_path):
    _, interrupted, lines = _run(tmp_path / "count", at=0)  # how many lines the bookkeeping runs in 7 steps
    assert not interrupted and lines > 40
    for at in range(1, lines + 1):
        out = tmp_path / f"at{at}"
        frame, interrupted, _ = _run(out, at)
        assert interrupted, at
        on_disk = _parts(out)
        assert not on_disk.duplicated(KEY).any(), f"a row in two parts when interrupted at line {at}"
        assert not frame.duplicated(KEY).any(), at
        recorded = set(frame[KEY].itertuples(index=False, name=None))
        assert set(on_disk[KEY].itertuples(index=False, name=None)) == recorded, f"rows lost at line {at}"
        pd.testing.assert_frame_equal(gradscope.load(out), frame)


@pytest.mark.parametrize("at", [1, 5])
def test_the_parts_of_an_interrupted_run_read_back_without_a_duplicate_warning(tmp_path, at, recwarn):
    frame, interrupted, _ = _run(tmp_path, at)
    gradscope.load(tmp_path)
    assert interrupted and not [w for w in recwarn if "duplicate rows" in str(w.message)]


class _WriteAt:
    """A tracer that, at the ``at``-th line executed inside :meth:`Recorder.flush` or :meth:`Recorder._unique`, runs
    what the SIGTERM handler of engine/exits.py runs (``write_remaining``) and lets the flush go on, as it does
    under the CLI, whose own handler only asks the study to stop."""

    CODES = {Recorder.flush.__code__, Recorder._unique.__code__}

    def __init__(self, at: int) -> None:
        self.at, self.seen, self.rec = at, 0, None

    def __call__(self, frame, event, arg):
        return self.local if frame.f_code in self.CODES else None

    def local(self, frame, event, arg):
        if event == "line":
            self.seen += 1
            if self.seen == self.at:
                self.rec.write_remaining()
        return self.local


def _run_writing(out, at: int) -> tuple:
    torch.manual_seed(0)
    model = nets.mlp(width=8, depth=2)
    tracer = _WriteAt(at)
    with gradscope.attach(model, out=out, flush_every=2) as scope:
        tracer.rec = scope._rec
        sys.settrace(tracer)
        try:
            for _ in range(5):
                model(torch.randn(4, 12)).sum().backward()
                scope.step()
        finally:
            sys.settrace(None)
    return scope.frame(), tracer.seen


def test_a_sigterm_handler_that_writes_and_returns_inside_a_flush_records_each_row_once(tmp_path):
    """The SIGTERM writer landing on any line of a flush (found by a flaky CLI test: rows of one step in two parts,
    when it landed before the flush had taken the buffer)."""
    reference, total = _run_writing(tmp_path / "ref", at=0)
    assert total > 10
    for at in range(1, total + 1):
        out = tmp_path / f"at{at}"
        frame, _ = _run_writing(out, at)
        on_disk = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("part-*.parquet"))], ignore_index=True)
        assert not on_disk.duplicated(KEY).any(), f"a row in two parts when the writer ran at line {at}"
        assert len(frame) == len(reference) and not frame.duplicated(KEY).any(), at
