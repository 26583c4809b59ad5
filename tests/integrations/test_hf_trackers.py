"""GradscopeCallback(log=True) in a real transformers.Trainer: the ``report_to`` trackers see its scalars (the
Trainer calls its trackers before user callbacks; the callback moves itself ahead of them). Read back from the
TensorBoard event files the Trainer's own TensorBoardCallback wrote."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradscope.integrations.transformers import GradscopeCallback

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, BATCH = 3, 4


def _model() -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _data() -> list:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (STEPS * BATCH, 8), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def _trainer(tmp_path: Path, callbacks: list) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=STEPS, per_device_train_batch_size=BATCH, report_to=["tensorboard"],
        use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0)
    return transformers.Trainer(model=_model(), args=args, train_dataset=_data(), callbacks=callbacks)


def _tensorboard(folder: Path) -> dict:
    """``{tag: [(step, value)]}`` of every scalar in the event files under ``folder``."""
    out: dict = {}
    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def _expected(callback: GradscopeCallback) -> list:
    frame = callback.frame()
    grad = frame[(frame.metric == "grad_norm") & (frame.call == 0)]
    return list(grad.groupby("step").value.max())


def _check(tmp_path: Path, trainer: transformers.Trainer, callback: GradscopeCallback) -> None:
    trainer.train()
    scalars = _tensorboard(tmp_path / "hf")
    assert "train/loss" in scalars  # the tracker ran
    logged = scalars.get("train/gradscope/grad_norm_max")
    assert logged is not None, sorted(scalars)
    assert [v for _, v in sorted(logged)] == pytest.approx(_expected(callback), rel=1e-5)
    assert {"train/gradscope/act_var_min", "train/gradscope/update_ratio_max"} <= set(scalars)


def test_report_to_trackers_see_the_log_keys_with_the_callback_passed_as_usual(tmp_path):
    callback = GradscopeCallback(log=True, report=False)
    trainer = _trainer(tmp_path, [callback])
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("GradscopeCallback") < names.index("TensorBoardCallback")
    _check(tmp_path, trainer, callback)


def test_a_callback_added_after_the_trainer_was_built_goes_first_when_training_starts(tmp_path):
    callback = GradscopeCallback(log=True, report=False)
    trainer = _trainer(tmp_path, [])
    trainer.add_callback(callback)
    _check(tmp_path, trainer, callback)


def test_attach_to_is_one_line(tmp_path):
    trainer = _trainer(tmp_path, [])
    callback = GradscopeCallback(log=True, report=False).attach_to(trainer)
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("GradscopeCallback") < names.index("TensorBoardCallback")
    assert names.count("GradscopeCallback") == 1
    _check(tmp_path, trainer, callback)
