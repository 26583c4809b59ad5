"""gradscope.profile(...) is the claim check as a library call: the CLI's options as keywords, nothing written unless
asked, the same results as the command's folder, user models of any task, and run facts as fields."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import gradscope
from gradscope import schema as S
from gradscope import words as W
from gradscope.cli import EXIT_FAIL_ON, EXIT_OK, EXIT_USAGE, main
from gradscope.errors import GradscopeError
from gradscope.pipeline import fail_on, outcome
from gradscope.study.specs import grid, zoo_spec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TASKS = FIXTURES / "tasks.py"
TINY = dict(seeds=[0], steps=2, every=1, init_batches=1, batch_size=8, train_size=32)


def small_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def test_profile_writes_nothing_unless_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = gradscope.profile(model=small_mlp, input_shape=(3, 2, 2), **TINY)
    assert list(tmp_path.iterdir()) == []  # no folder, no records, no provenance
    assert results.phases() == [W.INIT, W.TRAIN] and len(results.losses) == 2
    assert results.claims == []  # the paper's claims are about the built-in nets, not a user's model
    assert set(results.configs) == {"small_mlp-s0"}


def test_the_library_result_equals_the_cli_folder(tmp_path, capsys):
    args = ["--models", "plain20", "--bn", "off", "--init", "xavier", "--seeds", "0,1", "--steps", "0",
            "--init-batches", "1", "--batch-size", "8", "--train-size", "32", "--image-size", "8", "--workers", "1",
            "--format", "records"]
    assert main(["profile", *args, "--json", "--out", str(tmp_path / "cli")]) == EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    results = gradscope.profile(models=["plain20"], bn="off", init="xavier", seeds=[0, 1], steps=0, init_batches=1,
                                batch_size=8, train_size=32, image_size=8, workers=1, format="records",
                                out=tmp_path / "lib")
    on_disk = json.loads((tmp_path / "cli" / "summary.json").read_text())
    mine = json.loads(json.dumps(results.summary(), default=str))
    for summary in (printed, on_disk):
        assert {k: v for k, v in summary.items() if k != "report"} == mine
    cli_v = pd.read_csv(tmp_path / "cli" / "verdicts.csv")
    lib_v = pd.read_csv(tmp_path / "lib" / "verdicts.csv")
    pd.testing.assert_frame_equal(cli_v, lib_v)
    assert set(lib_v.run) == {"plain20-nobn-xavier-s0", "plain20-nobn-xavier-s1"}


def test_init_only_is_the_ci_guard(tmp_path, capsys):
    """--init-only trains nothing, keeps only the claims about initialisation, and --fail-on still decides."""
    base = ["profile", "--models", "plain20", "--bn", "off", "--init", "xavier", "--seeds", "0", "--init-batches",
            "1", "--batch-size", "8", "--train-size", "32", "--image-size", "8", "--quiet", "--format", "records"]
    assert main(base + ["--init-only", "--fail-on", "vanishing", "--out", str(tmp_path / "a")]) == EXIT_FAIL_ON
    assert "plain20-nobn-xavier-s0 forward vanishing at initialisation" in capsys.readouterr().err
    assert main(base + ["--init-only", "--fail-on", "exploding", "--out", str(tmp_path / "b")]) == EXIT_OK
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["verdicts"].keys() == {W.INIT} and summary["final_loss"] == {}
    assert all(c["phase"] != W.TRAIN for c in summary["claims"])  # nothing trained: no claim about training
    assert not (tmp_path / "b" / "losses.csv").exists()


def test_fail_on_is_a_library_function_that_can_say_no():
    results = gradscope.profile(models=["plain20"], bn="off", init="xavier", init_only=True, seeds=[0],
                                init_batches=1, batch_size=8, train_size=32, image_size=8, workers=1)
    assert fail_on(results, ["vanishing"]) == [f"plain20-nobn-xavier-s0 {signal} vanishing at initialisation"
                                               for signal in (W.FORWARD, W.BACKWARD)]  # Xavier halves per layer
    assert fail_on(results, ["exploding", "diverged"]) == []
    assert outcome(results, ["exploding"]).status == EXIT_OK
    assert outcome(results, ["vanishing"]).status == EXIT_FAIL_ON
    with pytest.raises(GradscopeError, match="--fail-on sometimes: choose from"):
        fail_on(results, ["sometimes"])


def test_bad_options_are_one_clear_error():
    with pytest.raises(GradscopeError, match="takes no option 'step'; did you mean steps"):
        gradscope.profile(step=3)
    with pytest.raises(GradscopeError, match="--steps -1 must be an integer >= 0"):
        gradscope.profile(steps=-1)
    with pytest.raises(GradscopeError, match="--model .* and --models/--depths .* exclude each other"):
        gradscope.profile(model=small_mlp, models=["plain20"])


# --- any model and task ------------------------------------------------------------------------------------------

def test_a_sequence_model_with_its_loss_and_batches_through_the_cli(tmp_path, capsys):
    """(B, T, vocab) logits, the file's loss(output, batch) and batches(batch_size, seed): every block gets its
    backward rows, and the report holds no claim about BatchNorm or degradation."""
    code = main(["profile", "--model", f"{TASKS}:lm", "--seeds", "0,1", "--steps", "3", "--every", "1",
                 "--init-batches", "1", "--batch-size", "8", "--format", "records", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    frame = pd.read_parquet(tmp_path / "records.parquet")
    blocks = set(frame.block)
    assert {"embed", "head"} <= blocks
    assert set(frame[frame.metric == S.GRAD_NORM].block) == blocks  # no backward row missing
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["claims"] == [] and "BatchNorm" not in captured.out
    losses = pd.read_csv(tmp_path / "losses.csv")
    assert set(losses.run) == {"lm-s0", "lm-s1"} and losses.loss.between(3.0, 5.0).all()  # ~ln(50) = 3.9


def test_a_regressor_and_a_model_taking_dicts():
    reg = gradscope.profile(model=f"{TASKS}:regressor", **TINY)  # float targets: mean squared error
    first = reg.losses.loss.iloc[0]
    assert first > 1.0  # sum of 6 unit Gaussians: variance 6, a net at initialisation is far from it
    dicts = gradscope.profile(model=f"{TASKS}:takes_dicts", **TINY)
    assert set(dicts.frames[W.TRAIN].block) == {"net.0", "net.2"}


def test_a_model_the_default_loss_cannot_train_says_how_to_fix_it(tmp_path, capsys):
    code = main(["profile", "--model", f"{FIXTURES / 'user_models.py'}:tiny", "--input-shape", "3,8,8",
                 "--seeds", "0", "--steps", "1", "--quiet", "--out", str(tmp_path), "--format", "records",
                 "--batch-size", "4", "--train-size", "8"])
    assert code == EXIT_OK  # the classifier default still works
    capsys.readouterr()
    no_targets = {"model": nn.Linear(4, 2), "batches": lambda b, s: iter([torch.randn(b, 4)] * 3)}
    with pytest.raises(GradscopeError, match="give loss\\(output, batch\\) in the model file"):
        gradscope.profile(model=lambda: no_targets, **TINY)
    assert main(["profile", "--model", f"{FIXTURES / 'user_models.py'}:tiny", "--input-shape", "3,8,8",
                 "--seeds", "0", "--steps", "1", "--quiet", "--out", str(tmp_path)] + ["--lr", "0"]) == EXIT_USAGE


# --- run facts as fields ------------------------------------------------------------------------------------------

def test_run_facts_are_fields_never_parsed_from_names():
    assert zoo_spec("mlp").residual is False and zoo_spec("mlp").family == "mlp"  # was True: "not plain"
    assert zoo_spec("resnet20").residual is True and zoo_spec("plain56").depth == 56
    assert zoo_spec("plain", depth=26).model == "plain26"
    specs = grid(["plain20"], bn=(True,), seeds=(0, 1))
    assert [s.name for s in specs] == ["plain20-bn-s0", "plain20-bn-s1"]  # seed 0 named like the others
    assert {s.config for s in specs} == {"plain20-bn"}


def test_seeds_pool_by_the_config_field(tmp_path):
    results = gradscope.profile(models=["plain20"], bn="off", seeds=[0, 1], init_only=True, init_batches=1,
                                batch_size=8, train_size=32, image_size=8, workers=1)
    frame = results.frames[W.INIT]
    assert set(frame[S.CONFIG]) == {"plain20-nobn"} and set(frame[S.SEED]) == {0, 1}
    assert set(frame[S.RESIDUAL]) == {False}
    pooled = results.pooled
    assert set(pooled["group"]) == {"plain20-nobn"} and set(pooled["n"]) == {2}


def test_losses_of_runs_whose_names_differ_by_a_suffix_are_not_pooled_by_name():
    """Two configurations named 'a' and 'a-s1' (a user's label that looks like a seed suffix) stay apart."""
    from gradscope.analysis.results import Results
    from gradscope.render.tables import loss_rows

    configs = {"a-s0": {"config": "a"}, "a-s1-s0": {"config": "a-s1"}}
    rows = loss_rows(Results(title="t", frames={}, profiles={}, verdicts={}, configs=configs,
                             final_losses={"a-s0": 1.0, "a-s1-s0": 2.0}))
    assert [r[0] for r in rows[1:]] == ["a", "a-s1"]
    rows = loss_rows(Results(title="t", frames={}, profiles={}, verdicts={}, configs=configs,
                             final_losses={"a-s0": float("nan"), "a-s1-s0": 2.0}))
    assert rows[0][3] == "left out (why)" and rows[1][3] == "a-s0 (diverged)" and rows[2][3] == "—"


def test_report_of_a_killed_profile_pools_seeds_by_the_facts_in_provenance(tmp_path, capsys):
    """A killed profile leaves only records/<run>/<phase>/ parts (no config column): `gradscope report` takes the
    runs' facts from provenance.json, so seeds still pool by configuration."""
    out = tmp_path / "p"
    assert main(["profile", "--models", "plain20", "--bn", "off", "--seeds", "0,1", "--init-only", "--init-batches",
                 "1", "--batch-size", "8", "--train-size", "32", "--image-size", "8", "--workers", "1", "--quiet",
                 "--format", "records", "--out", str(out)]) == EXIT_OK
    for path in out.iterdir():  # what a kill before the report leaves: the streamed parts and provenance.json
        if path.is_file() and path.name != "provenance.json":
            path.unlink()
    assert main(["report", str(out)]) == EXIT_OK
    pooled = pd.read_csv(out / "pooled.csv")
    assert set(pooled["group"]) == {"plain20-nobn"} and set(pooled["n"]) == {2}


def test_a_run_that_crashed_mid_training_has_no_final_loss_beside_the_finished_ones(tmp_path):
    """Its last losses (steps 0-5 of 10) were averaged into its configuration's final loss as if it had finished,
    and the loss table did not mark it. Now the finished seeds alone make the final loss, the crashed one is named
    as failed beside them, and its steps still count for the alerts."""
    from gradscope.render.tables import loss_rows

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "crash_mid_run.py"
    results = gradscope.profile(model=f"{fixture}:seed_one_crashes", seeds=[0, 1], steps=10, every=2,
                                init_batches=2, batch_size=8, train_size=64, input_shape=(8,))
    assert set(results.failed) == {"seed_one_crashes-s1"}
    assert set(results.final_losses) == {"seed_one_crashes-s0"}
    header, row = loss_rows(results)
    assert row[1].endswith("(n=1)") and row[3] == "seed_one_crashes-s1 (failed)"
    assert results.alerts is not None


def test_a_resumed_profile_removes_the_copies_a_rebuilt_report_kept(tmp_path, capsys, one_thread):
    """`gradscope report DIR` over a profile's folder keeps the profile's answers as claims.profile.md and
    summary.profile.json; a later `profile --resume` into that folder wrote a new report and left those copies (an
    older state, still saying interrupted) beside it."""
    out = tmp_path / "p"
    args = ["profile", "--models", "plain20", "--bn", "on", "--seeds", "0", "--init-only", "--init-batches", "1",
            "--batch-size", "8", "--train-size", "32", "--image-size", "8", "--workers", "1", "--quiet",
            "--out", str(out)]
    assert main(args) == 0
    assert main(["report", str(out)]) == 0
    assert (out / "claims.profile.md").is_file() and (out / "summary.profile.json").is_file()
    assert main(args + ["--resume"]) == 0
    assert not (out / "claims.profile.md").exists() and not (out / "summary.profile.json").exists()
    assert (out / "claims.md").is_file() and (out / "summary.json").is_file()


def test_a_profile_refused_for_another_studys_folder_leaves_that_folder_as_it_was(tmp_path, capsys, one_thread):
    """The refusal came after the new study had written its provenance.json over the old one's (settings, seeds
    and run facts that `gradscope report DIR` rebuilds a killed profile from)."""
    out = tmp_path / "p"
    args = ["profile", "--models", "plain20", "--bn", "on", "--seeds", "0", "--init-only", "--init-batches", "1",
            "--batch-size", "8", "--train-size", "32", "--image-size", "8", "--workers", "1", "--quiet",
            "--out", str(out)]
    assert main(args) == 0
    before = (out / "provenance.json").read_text()
    assert main(args[:2] + ["resnet20"] + args[3:]) == 2
    assert "already holds the records of a study (runs plain20-bn-s0)" in capsys.readouterr().err
    assert (out / "provenance.json").read_text() == before


def test_a_rebuilt_report_of_an_interrupted_profile_counts_the_runs_that_finished(tmp_path, capsys):
    """The rebuilt report said "which of them finished is not in the records" although each finished run leaves
    its snapshot in records/<run>/finished/ (what --resume loads)."""
    out = tmp_path / "p"
    assert main(["profile", "--models", "plain20", "--bn", "off", "--seeds", "0,1", "--init-only", "--init-batches",
                 "1", "--batch-size", "8", "--train-size", "32", "--image-size", "8", "--workers", "1", "--quiet",
                 "--format", "records", "--out", str(out)]) == EXIT_OK
    record = json.loads((out / "provenance.json").read_text())
    (out / "provenance.json").write_text(json.dumps({**record, "interrupted": True, "status": "interrupted"}))
    (out / "records" / "plain20-nobn-s1" / "finished" / "result.json").unlink()  # as if killed before its end
    for path in out.iterdir():
        if path.is_file() and path.name != "provenance.json":
            path.unlink()
    assert main(["report", str(out)]) == EXIT_OK
    text = (out / "summary.md").read_text()
    assert "the records hold 2 of 2 runs (1 of them finished: their snapshots are what --resume loads)" in text


def test_fail_on_names_how_many_more_steps_met_it():
    from gradscope.pipeline.policy import steps_text

    assert steps_text([4, 5, 6]) == "steps [4, 5, 6]"
    # before: "[4, 5, 6, 7, 8]" and nothing more, while steps 4-9 diverged
    assert steps_text(list(range(4, 10))) == "steps [4, 5, 6, 7, 8] and 1 more (to step 9)"
