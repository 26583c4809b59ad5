"""GradscopeCallback in a real transformers.Trainer (CPU, a tiny random GPT-2, no downloads) records what
attach() records in a plain loop that clips where the Trainer clips."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import transformers

import gradscope
from gradscope.integrations.transformers import GradscopeCallback

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, LR, CLIP, BATCH = 3, 0.05, 0.05, 4


def _model() -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _data() -> list[dict]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (STEPS * BATCH, 12), generator=g)
    # the first label is never a target (the loss shifts labels): marked so, every way of counting the Trainer
    # may use for its loss normaliser (labels or shifted labels) gives the model's own mean
    labels = ids.clone()
    labels[:, 0] = -100
    return [{"input_ids": row, "labels": lab} for row, lab in zip(ids, labels)]


def _plain() -> pd.DataFrame:
    model = _model()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    data = _data()
    with gradscope.attach(model, optimizer=opt) as scope:
        for i in range(STEPS):
            batch = {k: torch.stack([d[k] for d in data[i * BATCH:(i + 1) * BATCH]]) for k in data[0]}
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)  # the Trainer clips before its callback
            scope.step()
            opt.step()
            opt.zero_grad()
    return scope.frame()


def _key(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["step", "block", "call", "metric"]).reset_index(drop=True)


def test_the_callback_records_what_a_plain_loop_records(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    callback = GradscopeCallback(out=tmp_path / "gs", log=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=STEPS, per_device_train_batch_size=BATCH, max_grad_norm=CLIP,
        train_sampling_strategy="sequential", report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(), optimizers=(opt, sched),
                                   callbacks=[callback])
    trainer.train()
    got, want = _key(callback.frame()), _key(_plain())
    assert sorted(set(got.block)) == ["transformer.h.0", "transformer.h.1"]
    pd.testing.assert_frame_equal(got.drop(columns="value"), want.drop(columns="value"))
    assert got.value.to_numpy() == pytest.approx(want.value.to_numpy(), rel=1e-6, abs=1e-12)
    assert callback.scope is None and (tmp_path / "gs" / "report.html").exists()
    prov = json.loads((tmp_path / "gs" / "provenance.json").read_text())
    assert prov["made_by"] == "transformers" and prov["status"] == "finished"
    assert prov["config"]["trainer"]["max_grad_norm"] == CLIP and prov["seeds"]["args.seed"] == args.seed
    # the Trainer clipped: its logged pre-clip norm exceeds CLIP, so the recorded parameter gradients are clipped
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    assert all(h["grad_norm"] > CLIP for h in logs)
    # log=True: the compact scalars went into the Trainer's log entries
    maxima = [h["gradscope/grad_norm_max"] for h in trainer.state.log_history if "gradscope/grad_norm_max" in h]
    assert maxima == pytest.approx(list(want[want.metric == "grad_norm"].groupby("step").value.max()), rel=1e-6)


_SIGTERM_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import torch, transformers
from gradscope.integrations.transformers import GradscopeCallback
from tests.integrations.test_transformers import _model

class Progress(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        print(state.global_step, flush=True)

g = torch.Generator().manual_seed(5)
ids = torch.randint(0, 64, (4000, 12), generator=g)
data = [{{"input_ids": row, "labels": row}} for row in ids]
args = transformers.TrainingArguments(output_dir={hf!r}, max_steps=1000, per_device_train_batch_size=4,
                                      report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
trainer = transformers.Trainer(model=_model(), args=args, train_dataset=data,
                               callbacks=[GradscopeCallback(out={out!r}, flush_every=2), Progress()])
trainer.train()
"""


def test_a_sigterm_marks_the_callbacks_own_provenance_interrupted(tmp_path):
    """The callback's ``out/provenance.json`` said ``running`` forever after a SIGTERM (docker, Slurm): only the
    records folder's own record was marked. Both now say ``interrupted`` by SIGTERM, and the rows are on disk."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    script = _SIGTERM_SCRIPT.format(root=root, hf=str(tmp_path / "hf"), out=str(tmp_path / "gs"))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    done, deadline = 0, time.time() + 240
    while done < 5 and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        done = int(line)
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    assert done >= 5 and proc.returncode == -signal.SIGTERM
    for folder in (tmp_path / "gs", tmp_path / "gs" / "records"):
        record = json.loads((folder / "provenance.json").read_text())
        assert record["status"] == "interrupted" and record["signal"] == "SIGTERM", (folder, record)
        assert record["steps"] >= done
    assert json.loads((tmp_path / "gs" / "provenance.json").read_text())["made_by"] == "transformers"
    assert sorted(gradscope.load(tmp_path / "gs" / "records").step.unique())[:done] == list(range(done))


def test_a_sigterm_while_the_callback_writes_its_report_marks_its_provenance_interrupted(tmp_path):
    """The callback detaches, then writes its report (seconds of figures), then completes out/provenance.json: a
    SIGTERM in between found no attached scope and left the record saying "running"."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    script = _SIGTERM_SCRIPT.format(root=root, hf=str(tmp_path / "hf"), out=str(tmp_path / "gs")).replace(
        "max_steps=1000", "max_steps=3").replace(
        "from gradscope.integrations.transformers import GradscopeCallback",
        "from gradscope.integrations.transformers import GradscopeCallback\n"
        "import time, gradscope.render.report as report\n"
        "def slow(*args, **kwargs):\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(120)\n"
        "report.write_report = slow")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line or line.strip() == "writing":
            break
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM
    record = json.loads((tmp_path / "gs" / "provenance.json").read_text())
    assert record["status"] == "interrupted" and record["signal"] == "SIGTERM" and record["steps"] == 3, record
