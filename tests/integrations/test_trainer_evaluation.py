"""Trainers evaluate between training steps (Lightning's sanity check and validation epochs, the Hugging Face
Trainer's ``eval_strategy="steps"``): every recorded step still holds exactly the training forward's calls, the
same rows as a run without evaluation."""
from __future__ import annotations

import lightning as L
import pandas as pd
import pytest
import torch
import transformers
from torch import nn

from gradscope.integrations.lightning import GradscopeCallback as LightningCallback
from gradscope.integrations.transformers import GradscopeCallback as HFCallback

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = ["step", "block", "call", "metric"]


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(KEY).reset_index(drop=True)


# ---- Lightning -----------------------------------------------------------------------------------------------------
class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def training_step(self, batch, index):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, index):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(8, 6, generator=g) * scale, torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]
    return torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)


def _lightning(tmp_path, validate: bool, inference_mode: bool = True) -> pd.DataFrame:
    callback = LightningCallback(every=1)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[callback],
                        limit_val_batches=2 if validate else 0, num_sanity_val_steps=2 if validate else 0,
                        val_check_interval=2, inference_mode=inference_mode, default_root_dir=str(tmp_path))
    trainer.fit(Classifier(), _loader(6, 3), _loader(2, 4, scale=5.0) if validate else None)
    return _sorted(callback.frame())


@pytest.mark.parametrize("inference_mode", [True, False])
def test_lightning_sanity_check_and_validation_epochs_stay_out_of_the_record(tmp_path, inference_mode):
    want = _lightning(tmp_path / "plain", validate=False)
    got = _lightning(tmp_path / "val", validate=True, inference_mode=inference_mode)
    assert sorted(set(got.step)) == list(range(6)) and set(got.call) == {0}
    pd.testing.assert_frame_equal(got, want)


# ---- Hugging Face Trainer ------------------------------------------------------------------------------------------
def _gpt2() -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _rows(n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, 12), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def _hf(tmp_path, evaluate: bool) -> pd.DataFrame:
    callback = HFCallback()
    extra = dict(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4) if evaluate else {}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=0.05,
        train_sampling_strategy="sequential", report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, **extra)
    trainer = transformers.Trainer(model=_gpt2(), args=args, train_dataset=_rows(12, 5),
                                   eval_dataset=_rows(8, 6) if evaluate else None, callbacks=[callback])
    trainer.train()
    if evaluate:
        assert sum("eval_loss" in h for h in trainer.state.log_history) == 3  # it did evaluate after every step
    return _sorted(callback.frame())


def test_hf_trainer_evaluation_steps_stay_out_of_the_record(tmp_path):
    want = _hf(tmp_path / "plain", evaluate=False)
    got = _hf(tmp_path / "eval", evaluate=True)
    assert sorted(set(got.step)) == [0, 1, 2] and set(got.call) == {0}
    pd.testing.assert_frame_equal(got, want)
