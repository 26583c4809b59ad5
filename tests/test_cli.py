"""The CLI through main(argv): every command, exit codes, and one clear line for each kind of bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from gradscope.cli import EXIT_FAIL_ON, EXIT_INTERRUPTED, EXIT_USAGE, main

FIXTURE = Path(__file__).parent / "fixtures" / "user_models.py"
FAST = ["--steps", "2", "--train-size", "64", "--batch-size", "16", "--init-batches", "1", "--quiet"]


def test_default_models_end_to_end(tmp_path, capsys):
    code = main(["profile", "--steps", "3", "--train-size", "128", "--out", str(tmp_path), "--batch-size", "16"])
    assert code == 0
    out = capsys.readouterr().out
    for claim in ("BatchNorm keeps forward signals from vanishing", "With BatchNorm, backward gradients keep healthy",
                  "Deeper plain nets train worse", "Deeper residual nets do not train worse"):
        assert claim in out
    for name in ("report.html", "summary.md", "verdicts.csv", "records.parquet", "init_verdicts.csv", "claims.md",
                 "losses.csv", "heatmap_grad_norm.png"):
        assert (tmp_path / name).exists(), name
    verdicts = pd.read_csv(tmp_path / "init_verdicts.csv")
    assert set(verdicts.run) == {f"{m}-{b}{s}" for m in ("plain20", "resnet20", "plain56", "resnet56")
                                 for b in ("bn", "nobn") for s in ("-s0", "-s1", "-s2")}  # three seeds, named alike
    losses = pd.read_csv(tmp_path / "losses.csv")
    assert len(losses) == 4 * 3 * 3  # the BN nets train (3 seeds x 3 steps); the nets without BN: init only


def test_json_output_and_user_model(tmp_path, capsys):
    code = main(["profile", "--model", f"{FIXTURE}:tiny", "--input-shape", "3,8,8", "--json", "--out", str(tmp_path)]
                + FAST)
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["report"] == str(tmp_path)
    runs = {v["run"] for v in summary["verdicts"]["init"]}
    assert runs == {"tiny-s0", "tiny-s1", "tiny-s2"}  # three seeds by default, every one with its suffix
    assert {v["phase"] for v in summary["verdicts"]["train"]} == {"train"}
    frame = pd.read_parquet(tmp_path / "records.parquet")
    assert set(frame.block) == {"1", "3", "5"}  # the Linear layers: 'auto' falls back to leaves with parameters


def test_module_path_factory_and_block_selector(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent))
    code = main(["profile", "--model", "tests.fixtures.user_models:tiny", "--input-shape", "3,8,8",
                 "--blocks", "nn.ReLU", "--format", "records", "--out", str(tmp_path)] + FAST)
    assert code == 0
    frame = pd.read_parquet(tmp_path / "records.parquet")
    assert set(frame.kind) == {"ReLU"}
    said = capsys.readouterr().out  # --format records writes no report.html, and does not point at one
    assert not (tmp_path / "report.html").exists() and "report.html" not in said
    assert f"records and tables: {tmp_path}" in said


def test_fail_on_exits_3_when_a_verdict_matches(tmp_path, capsys):
    args = ["profile", "--models", "plain20", "--bn", "off", "--init", "xavier", "--out", str(tmp_path)] + FAST
    assert main(args + ["--fail-on", "vanishing"]) == EXIT_FAIL_ON
    assert "plain20-nobn-xavier-s0 forward vanishing" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["profile", "--models", "resnet57"], "unknown model|not a known"),
    (["profile", "--model", "nowhere/model.py:make"], "no such file 'nowhere/model.py'"),
    (["profile", "--model", f"{FIXTURE}:missing"], "has no callable 'missing'"),
    (["profile", "--model", f"{FIXTURE}:not_a_module"], "returned dict without a 'model' entry, not a torch.nn.Module"),
    (["profile", "--model", f"{FIXTURE}:broken"], "raised RuntimeError: factory exploded"),
    (["profile", "--model", "no_such_package.models:make"], "importing no_such_package.models failed"),
    (["profile", "--model", f"{FIXTURE}:tiny", "--input-shape", "3,32,32"], "rejects inputs of shape"),
    (["profile", "--data", "/no/such/cifar"], "cifar-10-batches-py|data_batch_1"),
    (["profile", "--device", "cuda:0"] if not __import__("torch").cuda.is_available() else ["profile", "--lr", "-1"],
     "no CUDA GPU|--lr"),
    (["report", "/no/such/run"], "no run folder"),
    (["profile", "--fail-on", "sometimes"], "--fail-on sometimes"),
    (["profile", "--seeds", ""], "argument --seeds: '' is not a comma-separated list of integers"),
    (["profile", "--seeds", ","], "argument --seeds: ',' is not a comma-separated list of integers"),
    (["profile", "--models", ","], "argument --models: ',' names nothing"),
    (["profile", "--model", f"{FIXTURE}:tiny", "--input-shape", ""], "argument --input-shape: '' is not"),
    (["profile", "--input-shape", "3,8,8"], "--input-shape 3,8,8 applies to --model only"),
    (["profile", "--model", f"{FIXTURE}:tiny", "--input-shape", "-1"], "'-1': every value must be a positive"),
    (["profile", "--models", "plain20", "--blocks", "layer("], "'layer\\(' is not a valid regular expression"),
    (["profile", "--models", "plain20,plain20", "--bn", "on"], "run name\\(s\\) plain20-bn-s0, plain20-bn-s1, plain20-bn-s2 would repeat"),
    (["profile", "--model", f"{FIXTURE}:tiny", "--input-shape", "3,8,8", "--seeds", "1,1"], "tiny-s1 would repeat"),
    (["profile", "--steps", "many"], "argument --steps: invalid int value: 'many' \\(see gradscope profile --help\\)"),
    (["profile", "--model", f"{FIXTURE.parent / 'exits_at_import.py'}:make"], "called sys.exit\\(7\\)"),
    (["report"], "the following arguments are required: folder \\(see gradscope report --help\\)"),
    # an abbreviation is a typo, not --steps (it would compare other steps than asked, or none)
    (["compare", "a", "b", "--step", "last"], "unrecognized arguments: --step last \\(see gradscope compare --help\\)"),
    # an unknown option names the subcommand's help, not the top level's (whose --help lists no profile option)
    (["profile", "--bogus"], "unrecognized arguments: --bogus \\(see gradscope profile --help\\)"),
    (["--bogus"], "unrecognized arguments: --bogus \\(see gradscope --help\\)"),
])
def test_bad_input_gives_one_line_and_status_2(argv, message, capsys, tmp_path):
    code = main(argv + ["--out", str(tmp_path / "o")] if argv[0] == "profile" else argv)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gradscope: error: "), err
    import re
    assert re.search(message, lines[0]), lines[0]


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["profile", "--out", str(blocker / "sub")] + FAST)
    assert code == EXIT_USAGE
    assert "cannot write to output folder" in capsys.readouterr().err


def test_models_command_lists_the_zoo(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "resnet110" in out and "0.27M" in out and "1.73M" in out
    rows = {line.split("│")[1].strip(): line.split("│")[3].strip() for line in out.splitlines() if line.count("│") >= 4}
    assert rows["resnet56"] == "27" and rows["plain"] == "3n"  # depth 6n+2 is 3n blocks of two layers (n=9: 27)


def test_report_rerenders_a_saved_run(tmp_path, capsys):
    assert main(["profile", "--model", f"{FIXTURE}:tiny", "--input-shape", "3,8,8", "--format", "records",
                 "--out", str(tmp_path)] + FAST) == 0
    assert not (tmp_path / "report.html").exists()
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").exists()


def _profile_until_parts(tmp_path, phase: str, *options: str) -> subprocess.Popen:
    """Start a profile far longer than any test (it can only end by the signal) and wait for its first part."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "gradscope", "profile", "--model", f"{FIXTURE}:tiny",
                             "--input-shape", "3,8,8", "--train-size", "64", "--batch-size", "8", "--quiet",
                             "--out", str(tmp_path), *options], env=env, stderr=subprocess.PIPE, text=True)
    parts = tmp_path / "records" / "tiny-s0" / phase
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(parts.glob("part-*.parquet")):
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1]
    return proc


def _rows_in_parts(folder: Path) -> int:
    return sum(len(pd.read_parquet(p)) for p in sorted(folder.glob("part-*.parquet")))


@pytest.mark.parametrize("phase, options", [("train", ["--steps", "1000000", "--init-batches", "1"]),
                                            ("init", ["--steps", "1", "--init-batches", "1000000"])])
def test_ctrl_c_keeps_records_and_exits_130(tmp_path, phase, options):
    """A real SIGINT in training or in the initialisation measurement: the CLI reports what it has, exits 130."""
    proc = _profile_until_parts(tmp_path, phase, *options)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err and "nothing was recorded" not in err
    frame = pd.read_parquet(tmp_path / "records.parquet")
    on_disk = _rows_in_parts(tmp_path / "records" / "tiny-s0" / phase)
    assert on_disk >= 10 * 3 and len(frame) >= on_disk  # the report holds every row streamed (and the tail)
    assert (tmp_path / "report.html").exists()


def test_sigterm_writes_the_report_and_dies_of_sigterm(tmp_path):
    """docker/Kubernetes/Slurm stop with SIGTERM: rows flushed, report written, then killed by the signal."""
    proc = _profile_until_parts(tmp_path, "train", "--steps", "1000000", "--init-batches", "1")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGTERM, err  # a shell reports 143
    assert "Traceback" not in err
    frame = pd.read_parquet(tmp_path / "records.parquet")
    parts = tmp_path / "records" / "tiny-s0" / "train"
    steps_on_disk = pd.concat([pd.read_parquet(p) for p in parts.glob("part-*.parquet")]).step.nunique()
    assert frame.step.nunique() == steps_on_disk >= 10  # every recorded step is on disk, in parts and report
    assert (tmp_path / "report.html").exists()


def test_a_package_in_the_current_folder_imports_as_under_python_m(tmp_path):
    """The console script's sys.path holds its bin folder, not the current one; gradscope adds the latter."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    shutil.copy(FIXTURE, tmp_path / "mypkg" / "nets.py")
    code = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
            "from gradscope.cli import main_entry; main_entry()")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-c", code, "profile", "--model", "mypkg.nets:tiny", "--input-shape",
                           "3,8,8", "--format", "records", "--out", str(tmp_path / "out")] + FAST,
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert set(pd.read_parquet(tmp_path / "out" / "records.parquet").block) == {"1", "3", "5"}


def test_a_model_that_crashes_mid_run_keeps_its_records(tmp_path, capsys):
    code = main(["profile", "--model", f"{FIXTURE}:crash_later", "--input-shape", "3,8,8", "--steps", "10",
                 "--every", "1", "--seeds", "0", "--train-size", "64", "--batch-size", "16", "--init-batches", "1", "--quiet", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "run crash_later-s0 failed: RuntimeError: CUDA error" in err and "Traceback" not in err
    frame = pd.read_parquet(tmp_path / "records.parquet")
    assert sorted(frame.step.unique()) == [0, 1, 2]  # 1 init batch, then 3 training steps before the 5th forward


def _full_disk_for(monkeypatch, name: str) -> None:
    """Writing ``name`` fails as on a full disk (ENOSPC); everything else is written."""
    import errno

    from gradscope import store

    real = store.atomic_write

    def full(tmp):  # as a write() on a full disk raises: no file name in the error
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def atomic_write(path, write):
        return real(path, full if Path(path).name == name else write)

    monkeypatch.setattr(store, "atomic_write", atomic_write)


@pytest.mark.parametrize("command", ["profile", "report"])
def test_a_full_disk_exits_2_with_one_line_naming_the_folder_and_file(tmp_path, capsys, monkeypatch, command):
    args = ["--model", f"{FIXTURE}:tiny", "--input-shape", "3,8,8", "--out", str(tmp_path)] + FAST
    if command == "report":
        assert main(["profile", "--format", "records"] + args) == 0
        capsys.readouterr()
    _full_disk_for(monkeypatch, "records.parquet")
    code = main(["profile"] + args if command == "profile" else ["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "Traceback" not in err and "internal error" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0] == (f"gradscope: error: cannot write the report to {str(tmp_path)!r}: No space left on device "
                        f"(writing {tmp_path / 'records.parquet'})")
    assert not list(tmp_path.glob(".tmp-*"))  # the half-written temporary file is gone


def test_a_loss_that_is_nan_from_the_start_still_gets_its_report_and_the_fail_on_status(tmp_path):
    """Every gradient NaN from step 0 left the depth-profile figure with no finite value at all: the report stage
    stopped on an internal error (exit 1, no report.html, the diverged status lost). Now the report is written, the
    backward signal is the one that diverged, and --fail-on diverged exits 3."""
    model = Path(__file__).parent / "fixtures" / "nan_loss.py"
    out = tmp_path / "out"
    code = main(["profile", "--model", f"{model}:make", "--seeds", "0", "--steps", "4", "--every", "2",
                 "--init-batches", "2", "--batch-size", "8", "--train-size", "32", "--input-shape", "8", "--quiet",
                 "--out", str(out), "--fail-on", "diverged"])
    assert code == EXIT_FAIL_ON and (out / "report.html").stat().st_size > 0
    verdicts = pd.read_csv(out / "verdicts.csv")
    init = verdicts[verdicts.phase == "init"]  # before any update: activations finite, gradients NaN
    assert set(init[init.signal == "backward"].verdict) == {"diverged"}
    assert "diverged" not in set(init[init.signal == "forward"].verdict)
    later = verdicts[(verdicts.phase == "train") & (verdicts.step == 2)]  # NaN weights after a NaN update
    assert set(later.verdict) == {"diverged"}


USER_NETS = '''
import torch
from torch import nn


def _mlp():
    torch.manual_seed(0)
    layers = [nn.Flatten()]
    for i in range(4):
        lin = nn.Linear(3 * 8 * 8 if i == 0 else 32, 32)
        nn.init.constant_(lin.bias, 0.5)
        layers += [lin, nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(32, 10))


def mlp_custom():
    return _mlp()


def resnet20():
    return _mlp()
'''


@pytest.mark.parametrize("factory", ["mlp_custom", "resnet20"])
def test_a_users_model_named_like_a_builtin_net_gets_no_builtin_theory(tmp_path, capsys, factory):
    """The theory's family came from the model's name: a factory called ``mlp_custom`` crashed the profile with an
    internal error (its init unknown), and one called ``resnet20`` was judged against the built-in ResNet's theory.
    A user's model now gets "no theory", whatever its factory is called."""
    path = tmp_path / "nets.py"
    path.write_text(USER_NETS)
    code = main(["profile", "--model", f"{path}:{factory}", "--input-shape", "3,8,8", "--init-only", "--seeds", "0",
                 "--batch-size", "16", "--train-size", "64", "--quiet", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    verdicts = pd.read_csv(tmp_path / "out" / "init_verdicts.csv")
    assert set(verdicts["theory_note"]) == {f"no theory for model {factory!r}"}
    assert verdicts["agreement"].isna().all()


def test_report_of_a_profile_folder_keeps_its_initialisation_runs(tmp_path, capsys):
    """records.parquet holds a profile's training phase only; the no-BN twins are measured at initialisation only
    (records/<run>/init/). `gradscope report DIR` and `gradscope.load(DIR)` read them all (before: the two
    trained runs, both no-BN twins and every run's initialisation phase gone, without a word)."""
    import gradscope

    out = tmp_path / "run"
    assert main(["profile", "--models", "plain20", "--bn", "both", "--seeds", "0", "--steps", "2", "--every", "1",
                 "--image-size", "8", "--train-size", "64", "--batch-size", "16", "--init-batches", "1",
                 "--workers", "1", "--quiet", "--out", str(out)]) == 0
    profiled = set(pd.read_csv(out / "init_verdicts.csv").run)
    assert profiled == {"plain20-bn-s0", "plain20-nobn-s0"}
    frame = gradscope.load(out)
    assert set(frame.run) == profiled and set(frame.phase) == {"init", "train"}
    assert {"config", "model", "bn", "seed"} <= set(frame.columns) and not frame[["bn", "seed"]].isna().any().any()
    train = frame[frame.phase == "train"].drop(columns="phase")
    pd.testing.assert_frame_equal(train.reset_index(drop=True), gradscope.store.read_records(out / "records.parquet"),
                                  check_like=True)  # the training rows are records.parquet's, run facts and all
    with pytest.raises(gradscope.GradscopeError, match="holds the phases init, train"):
        gradscope.verdicts(frame)  # initialisation and training share step 0: one phase at a time
    assert main(["report", str(out), "--out", str(tmp_path / "again")]) == 0
    assert set(pd.read_csv(tmp_path / "again" / "verdicts.csv").run) == profiled
