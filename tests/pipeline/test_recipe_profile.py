"""``gradscope profile --recipe``: He et al.'s recipe end to end on a generated CIFAR-format folder, the Fig. 6 and
Table 6 files in the report, resuming without running finished runs again, and bad input in one line."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from gradscope.cli import main
from tests.fixtures.cifar_folder import write_cifar

ARGS = ["--recipe", "he2016", "--iterations", "4", "--models", "plain20,resnet20", "--seeds", "0",
        "--workers", "1", "--quiet"]


def test_recipe_study_writes_curves_and_table6_and_resumes(tmp_path, one_thread):
    data = write_cifar(tmp_path / "cifar", n_train=160, n_test=40)
    out = tmp_path / "out"
    assert main(["profile", *ARGS, "--data", str(data), "--out", str(out)]) == 0
    curves = pd.read_csv(out / "error_curves.csv")
    assert set(curves["model"]) == {"plain20", "resnet20"}
    assert curves.groupby("run")["iteration"].max().tolist() == [4, 4]  # milestones 2, 3: lr 0.1, 0.1, 0.01, 0.001
    losses = pd.read_csv(out / "losses.csv")
    assert losses.groupby("run")["lr"].apply(list).tolist() == [pytest.approx([0.1, 0.1, 0.01, 0.001])] * 2
    table = pd.read_csv(out / "table6.csv").set_index("model")
    assert table.loc["resnet20", "paper"] == 8.75 and pd.isna(table.loc["plain20", "paper"])
    assert (out / "error_curves.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary  # the same results object as any study: claims, verdicts
    assert "error_curves.png" in (out / "summary.md").read_text()
    assert (out / "records" / "resnet20-bn-s0" / "finished" / "result.json").exists()
    first = (out / "table6.csv").read_text()
    # resuming: both runs finished, so nothing runs again and the same table comes out
    stamp = {p: p.stat().st_mtime_ns for p in (out / "records").glob("*/train/part-*.parquet")}
    assert main(["profile", *ARGS, "--data", str(data), "--out", str(out), "--resume"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "records").glob("*/train/part-*.parquet")} == stamp
    assert (out / "table6.csv").read_text() == first


@pytest.mark.parametrize("extra, words", [
    (["--recipe", "he2017", "--data", "DATA"], "he2016"),
    (["--recipe", "he2016"], "--data"),
    (["--iterations", "5"], "--recipe"),
    (["--resume"], "--out"),
    (["--executor", "dask"], "executor"),
])
def test_bad_recipe_options_are_one_line_and_exit_2(extra, words, tmp_path, capsys):
    extra = [str(tmp_path) if e == "DATA" else e for e in extra]
    assert main(["profile", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "Traceback" not in err and len(err.splitlines()) == 1
