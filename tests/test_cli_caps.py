"""``gradscope compare`` and ``gradscope sweep`` through ``main(argv)``: exit codes (0, 3 with --fail-on, 2 with one
line on bad input), printed verdicts, JSON and the files written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gradscope
from gradscope.cli import main
from gradscope.models import build

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "width_nets.py"


def _record(folder: Path, init: str, seed: int) -> str:
    model = build("mlp", seed=seed, depth=6, width=64, in_features=32, init=init, bn=False)
    g = torch.Generator().manual_seed(100 + seed)
    with gradscope.attach(model, out=folder) as scope:
        for _ in range(3):
            x, y = torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            model.zero_grad()
            scope.step()
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("sides")
    k = ",".join(_record(root / f"k{s}", "kaiming", s) for s in (0, 1, 2, 3))
    k2 = ",".join(_record(root / f"k{s}", "kaiming", s) for s in (4, 5, 6, 7))
    x = ",".join(_record(root / f"x{s}", "xavier", s) for s in (0, 1, 2, 3))
    return k, k2, x


def test_compare_exits_3_on_a_difference_and_writes_the_page(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    k, _, x = folders
    code = main(["compare", k, x, "--fail-on", "differs", "--labels", "kaiming,xavier", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 3 and "xavier vs kaiming" in out and "differs" in out
    assert '<section id="compare">' in (tmp_path / "compare.html").read_text()


def test_compare_of_one_configuration_exits_0(folders, capsys):
    k, k2, _ = folders
    assert main(["compare", k, k2, "--fail-on", "differs", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["differs"] is False and {b["verdict"] for b in report["blocks"]} == {"same"}
    assert report["not_compared"] == {}


def test_compare_bad_input_is_one_line_and_exit_2(folders, tmp_path, capsys):
    k, _, _ = folders
    assert main(["compare", k, str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err
    assert main(["compare", k, k, "--metrics", "adam_m_norm"]) == 2
    assert "not recorded on both sides" in capsys.readouterr().err


def test_sweep_fits_prints_and_fails_on_growth(tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    args = ["sweep", "--model", f"{FIXTURE}:sp", "--optimizer", f"{FIXTURE}:adam", "--widths", "32,64,128,256,512",
            "--steps", "3", "--blocks", "hidden.*"]
    code = main(args + ["--fail-on", "grows", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 3 and "act_change" in out and "grows ~ width^" in out
    # like `profile --fail-on`, one stderr line names each block found (there was none)
    named = [line for line in err.splitlines() if line.startswith("gradscope: --fail-on grows: block 'hidden.")]
    assert named and all("act_change grows ~ width^" in line for line in named)
    assert (tmp_path / "sweep.png").exists() and (tmp_path / "sweep_fits.csv").exists()
    code = main(["sweep", "--model", f"{FIXTURE}:mup", "--optimizer", f"{FIXTURE}:adam", "--widths",
                 "32,64,128,256,512", "--steps", "3", "--blocks", "hidden.*", "--fail-on", "grows", "--json"])
    fits = json.loads(capsys.readouterr().out)["fits"]
    assert code == 0 and any(f["quantity"] == "act_change" for f in fits)


def test_sweep_says_when_values_are_not_finite_and_its_json_stays_strict(capsys, one_thread):
    """NaN weights: every fit was 'unclear' with no word about NaN, and --json printed bare NaN tokens, which
    strict JSON parsers refuse."""
    args = ["sweep", "--model", f"{FIXTURE}:nan_sp", "--widths", "16,32,64", "--steps", "2", "--blocks", "hidden.*"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "non-finite: " in out and "measured values are NaN or inf" in out and "widths 16, 32, 64" in out
    assert main(args + ["--json"]) == 0
    text = capsys.readouterr().out
    report = json.loads(text, parse_constant=lambda token: pytest.fail(f"not strict JSON: {token}"))
    assert "non-finite" in report["summary"] and any(f["exponent"] is None for f in report["fits"])


def test_sweep_bad_input(capsys, tmp_path):
    assert main(["sweep", "--model", f"{FIXTURE}:nothing", "--widths", "8,16,32"]) == 2
    assert "no callable 'nothing'" in capsys.readouterr().err
    assert main(["sweep", "--model", f"{FIXTURE}:sp", "--widths", "8,16"]) == 2
    assert "three or more" in capsys.readouterr().err
    assert main(["sweep", "--model", f"{FIXTURE}:sp", "--widths", "8,x"]) == 2
    assert main(["sweep", "--model", f"{FIXTURE}:sp", "--widths", "8,16,32", "--optimizer", "lion"]) == 2
    assert "lion" in capsys.readouterr().err
