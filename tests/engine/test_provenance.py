"""Every attach(out=...) folder says how it was made: command, options, seeds, versions, device, wall time."""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import gradscope
from gradscope.engine import provenance

pytestmark = pytest.mark.usefixtures("one_thread")


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def test_attach_out_records_how_the_folder_was_made(tmp_path):
    torch.manual_seed(123)
    model = _net()
    out = tmp_path / "run"
    t0 = time.perf_counter()
    with gradscope.attach(model, every=3, out=out, blocks=nn.Linear) as scope:
        running = provenance.read(out)
        for _ in range(4):
            model(torch.randn(5, 4)).sum().backward()
            scope.step()
    elapsed = time.perf_counter() - t0
    rec = json.loads((out / "provenance.json").read_text())
    assert running["status"] == "running" and running["finished"] is None
    assert rec["status"] == "finished" and rec["made_by"] == "attach"
    assert rec["command"] == sys.argv
    assert rec["config"]["every"] == 3 and rec["config"]["sites"] == ["0", "2", "4"]
    assert rec["config"]["blocks"] == "torch.nn.modules.linear.Linear"
    assert rec["seeds"]["torch_initial_seed"] == 123
    assert rec["versions"]["torch"] == torch.__version__
    assert rec["versions"]["gradscope"] == gradscope.__version__
    assert rec["versions"]["python"] == platform.python_version()
    assert rec["device"] == "cpu"
    assert 0 < rec["wall_s"] <= elapsed
    assert rec["steps"] == 4 and rec["rows"] == len(scope.frame())


def test_a_failed_run_says_so_and_keeps_its_rows(tmp_path):
    model = _net()
    with pytest.raises(ZeroDivisionError):
        with gradscope.attach(model, out=tmp_path / "r") as scope:
            model(torch.randn(5, 4)).sum().backward()
            scope.step()
            1 / 0
    rec = provenance.read(tmp_path / "r")
    assert rec["status"] == "failed: ZeroDivisionError: division by zero"
    assert len(gradscope.load(tmp_path / "r")) == rec["rows"] > 0


def test_a_run_stopped_by_ctrl_c_is_interrupted_not_failed(tmp_path):
    """A KeyboardInterrupt (Ctrl-C, or the SIGTERM the CLI turns into one) stops a run; it was written as
    'failed: KeyboardInterrupt: '."""
    model = _net()
    with pytest.raises(KeyboardInterrupt):
        with gradscope.attach(model, out=tmp_path / "r") as scope:
            model(torch.randn(5, 4)).sum().backward()
            scope.step()
            raise KeyboardInterrupt
    assert provenance.read(tmp_path / "r")["status"] == "interrupted"


def test_jsonable_keeps_data_and_names_the_rest():
    got = provenance.jsonable({"a": (1, 2.5), "b": float("nan"), "c": {3}, "d": nn.Linear, "e": None})
    assert got == {"a": [1, 2.5], "b": "nan", "c": [3], "d": "torch.nn.modules.linear.Linear", "e": None}
    assert isinstance(provenance.jsonable(lambda n, m: True), str)
    json.dumps(got)


def test_a_profile_folder_and_each_run_folder_say_how_they_were_made(tmp_path, capsys):
    from gradscope.cli import main

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "user_models.py"
    argv = ["profile", "--model", f"{fixture}:tiny", "--input-shape", "3,8,8", "--format", "records",
            "--steps", "2", "--train-size", "64", "--batch-size", "16", "--init-batches", "1", "--quiet",
            "--seeds", "4", "--out", str(tmp_path)]
    assert main(argv) == 0
    rec = provenance.read(tmp_path)
    assert rec["made_by"] == "profile" and rec["status"] == "finished" and rec["exit_status"] == 0
    assert rec["config"]["steps"] == 2 and rec["config"]["input_shape"] == [3, 8, 8]
    assert rec["seeds"]["seeds"] == [4] and rec["runs"] == ["tiny-s4"]
    assert rec["device"] == "cpu" and rec["versions"]["torch"] == torch.__version__ and rec["wall_s"] > 0
    for phase in ("init", "train"):  # the records each run streamed: attach(out=...) folders
        inner = provenance.read(tmp_path / "records" / "tiny-s4" / phase)
        assert inner["made_by"] == "attach" and inner["status"] == "finished"
