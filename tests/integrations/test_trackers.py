"""The tracker sinks with the real libraries: what TensorBoard, W&B (offline) and MLflow (file store) hold, read
back from their own files, equals the frame."""
from __future__ import annotations

import glob
import json
import struct
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import gradscope
from gradscope.integrations.common import compact_scalars, metric_key

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 4


def _train(sinks, each=None) -> pd.DataFrame:
    """A small shared-layer MLP (one block runs twice: call 1 rows), four steps, every step recorded; ``each(step,
    loss)`` runs at the end of every step (the user's own logging)."""
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), shared, nn.Tanh(), shared, nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    with gradscope.attach(model, blocks=nn.Linear, optimizer=opt, sinks=sinks) as scope:
        for step in range(STEPS):
            x, y = torch.randn(16, 5, generator=g), torch.randint(0, 2, (16,), generator=g)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            scope.step()
            opt.step()
            opt.zero_grad()
            if each is not None:
                each(step, loss.item())
    return scope.frame()


def _expected(frame: pd.DataFrame) -> dict:
    return {(metric_key("gradscope", m, b, c), s): v
            for s, b, m, c, v in zip(frame.step, frame.block, frame.metric, frame.call, frame.value)}


def _same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-30, nan_ok=True), k


def test_tensorboard_event_files_hold_the_frame(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator
    from torch.utils.tensorboard import SummaryWriter

    from gradscope.integrations.tensorboard import TensorBoardSink

    writer = SummaryWriter(str(tmp_path / "tb"))
    frame = _train([TensorBoardSink(writer, image_every=2)])
    writer.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    got = {(t, e.step): e.value for t in tags["scalars"] for e in acc.Scalars(t)}
    _same(got, _expected(frame))
    assert "gradscope/grad_norm/2" in tags["scalars"] and "gradscope/grad_norm/2:call1" in tags["scalars"]
    # a heatmap every 2 recorded steps: after steps 0-1 and 2-3
    assert sorted(tags["images"]) == ["gradscope/heatmap/act_var", "gradscope/heatmap/grad_norm"]
    assert [e.step for e in acc.Images("gradscope/heatmap/grad_norm")] == [1, 3]
    assert acc.Images("gradscope/heatmap/grad_norm")[0].width > 100


def _wandb_history(run_dir: Path, timeout: float = 120.0) -> list[dict]:
    """History records of an offline run, read from its .wandb file once its exit record is there (wandb's
    service may still be writing after ``run.finish()`` returns on a busy machine)."""
    deadline = time.monotonic() + timeout
    while True:
        done, history = _wandb_records(run_dir)
        if done or time.monotonic() > deadline:
            assert done, f"no exit record in {run_dir} after {timeout} s"
            return history
        time.sleep(0.5)


def _wandb_records(run_dir: Path) -> tuple[bool, list[dict]]:
    """(whether the exit record is written, the history records) of a .wandb file: a LevelDB-style log of
    protobuf records in 32 KiB blocks, each record a 7-byte header (crc, length, FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(glob.glob(str(run_dir / "run-*.wandb"))[0]).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending, done = 7, 32768, [], b"", False
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(pending)
            kind_of = rec.WhichOneof("record_type")
            done = done or kind_of == "exit"
            if kind_of == "history":
                records.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                for i in rec.history.item})
    return done, records


def _wandb_scalars(history: list[dict]) -> dict:
    """``{(key, gradscope step): value}`` of the gradscope scalars in a run's history (heatmap images left out)."""
    return {(k, h["gradscope/step"]): float(v) for h in history for k, v in h.items()
            if k.startswith("gradscope/") and k != "gradscope/step" and "heatmap" not in k}


def test_wandb_offline_run_holds_the_frame(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    from gradscope.integrations.wandb import WandbSink

    run = wandb.init(project="gradscope-test", dir=str(tmp_path))
    run_dir = Path(run.dir).parent
    try:
        frame = _train([WandbSink(run, image_every=4)])
    finally:
        run.finish()
    history = _wandb_history(run_dir)
    _same(_wandb_scalars(history), _expected(frame))
    images = [h for h in history if "gradscope/heatmap/grad_norm/_type" in h]
    assert len(images) == 1 and images[0]["gradscope/step"] == STEPS - 1
    assert images[0]["gradscope/heatmap/grad_norm/_type"] == "image-file"
    assert (run_dir / "files" / images[0]["gradscope/heatmap/grad_norm/path"]).stat().st_size > 1000


@pytest.mark.parametrize("how", ["own step metric", "step="])
def test_wandb_keeps_the_users_own_metrics_logged_against_their_own_step_metric(tmp_path, monkeypatch, how):
    """What docs/integrations.md tells W&B users: the sink advances W&B's internal step (as Lightning's logger does),
    so the user's own metrics logged with a step metric of their own all arrive, while run.log(..., step=i) loses
    every value whose i lies behind that internal step (W&B drops it)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    from gradscope.integrations.wandb import WandbSink

    run = wandb.init(project="gradscope-test", dir=str(tmp_path))
    run_dir = Path(run.dir).parent
    run.define_metric("train/step")
    run.define_metric("loss", step_metric="train/step")
    logged = {}

    def log(step, loss):
        logged[step] = loss
        if how == "step=":
            run.log({"loss": loss}, step=step)
        else:
            run.log({"train/step": step, "loss": loss})

    try:
        frame = _train([WandbSink(run)], each=log)
    finally:
        run.finish()
    history = _wandb_history(run_dir)
    _same(_wandb_scalars(history), _expected(frame))  # gradscope's rows arrive either way
    losses = [h["loss"] for h in history if "loss" in h]
    if how == "step=":
        assert len(losses) < len(logged)
    else:
        assert {h["train/step"]: h["loss"] for h in history if "loss" in h} == pytest.approx(logged)


def test_mlflow_file_store_holds_the_frame(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow
    from mlflow.tracking import MlflowClient

    from gradscope.integrations.mlflow import MlflowSink

    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    try:
        with mlflow.start_run() as run:
            frame = _train([MlflowSink(image_every=STEPS)])
        client = MlflowClient()
        want = _expected(frame)
        got = {}
        for key in {k for k, _ in want}:
            for m in client.get_metric_history(run.info.run_id, key):
                got[(key, m.step)] = m.value
        _same(got, want)
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "gradscope")]
        assert sorted(artifacts) == [f"gradscope/heatmap-act_var-{STEPS - 1:06d}.png",
                                     f"gradscope/heatmap-grad_norm-{STEPS - 1:06d}.png"]
    finally:
        mlflow.set_tracking_uri(None)


def test_compact_scalars_are_min_and_max_over_blocks():
    frame = _train([])
    got = compact_scalars(frame)
    first = frame[(frame.call == 0) & (frame.step == 1)]
    gn = first[first.metric == "grad_norm"].value
    assert got[1]["gradscope/grad_norm_min"] == gn.min() and got[1]["gradscope/grad_norm_max"] == gn.max()
    assert got[1]["gradscope/nonfinite"] == 0.0
    assert set(got) == set(range(STEPS))


def test_sinks_without_a_run_or_with_a_bad_image_interval_say_what_to_do(monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow
    import wandb

    from gradscope.integrations.mlflow import MlflowSink
    from gradscope.integrations.tensorboard import TensorBoardSink
    from gradscope.integrations.wandb import WandbSink

    assert wandb.run is None and mlflow.active_run() is None
    with pytest.raises(gradscope.GradscopeError, match=r"wandb.init"):
        WandbSink()
    with pytest.raises(gradscope.GradscopeError, match=r"mlflow.start_run"):
        MlflowSink()
    with pytest.raises(gradscope.GradscopeError, match="image_every=-1"):
        TensorBoardSink(object(), image_every=-1)


def test_mlflow_keys_mlflow_refuses_are_made_valid_not_the_whole_batch_lost(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow
    from mlflow.tracking import MlflowClient

    from gradscope.integrations.mlflow import MlflowSink, mlflow_key

    assert mlflow_key("gradscope/grad_norm/proj(q):call1").startswith("gradscope/grad_norm/proj_q_:call1-")
    assert mlflow_key("gradscope/grad_norm/out") == "gradscope/grad_norm/out"  # a valid key is kept as it is
    model = nn.ModuleDict({"proj(q)": nn.Linear(4, 4), "proj[q]": nn.Linear(4, 4), "out": nn.Linear(4, 2)})
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    try:
        with mlflow.start_run() as run:
            with gradscope.attach(model, blocks=["proj(q)", "proj[q]", "out"], sinks=[MlflowSink()]) as scope:
                model["out"](model["proj[q]"](2 * model["proj(q)"](torch.randn(3, 4)))).sum().backward()
                scope.step()
        frame = scope.frame()
        for block in ("proj(q)", "proj[q]"):  # two blocks whose names differ only in refused characters
            key = mlflow_key(f"gradscope/grad_norm/{block}")
            history = MlflowClient().get_metric_history(run.info.run_id, key)
            row = frame[(frame.block == block) & (frame.metric == "grad_norm")]
            # before: MLflow held no metric at all; then both blocks wrote one key, proj_q_
            assert [m.value for m in history] == pytest.approx(list(row.value))
        assert MlflowClient().get_metric_history(run.info.run_id, "gradscope/grad_norm/out")
    finally:
        mlflow.set_tracking_uri(None)
