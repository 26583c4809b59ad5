"""The Lightning and Hugging Face callbacks give the scope each optimizer step's loss: the mean of its micro-batch
losses, as the framework reports it. So loss_spike and divergence can fire, scope.losses() holds them and they
reach out/records (losses-*.parquet) and the report."""
from __future__ import annotations

import json
import math
import warnings

import lightning as L
import pytest
import torch
import transformers
from torch import nn

import gradscope
from gradscope.integrations.lightning import GradscopeCallback as LightningCallback
from gradscope.integrations.transformers import GradscopeCallback as HFCallback

pytestmark = pytest.mark.usefixtures("one_thread")


class Module(L.LightningModule):
    """A classifier whose training_step keeps each micro-batch's loss; at batch ``spike_at`` it adds a constant
    (gradients unchanged: only the loss shows the fault), at ``nan_at`` a NaN."""

    def __init__(self, spike_at=-1, nan_at=-1):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        self.spike_at, self.nan_at, self.seen = spike_at, nan_at, []

    def training_step(self, batch, index):
        loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        loss = loss + 1000.0 if index == self.spike_at else loss
        loss = loss + math.nan if index == self.nan_at else loss
        self.seen.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(callback, module, batches, accumulate=1):
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(batches)]
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[callback],
                        accumulate_grad_batches=accumulate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))


def test_lightning_gives_each_steps_mean_micro_batch_loss(tmp_path):
    callback, module = LightningCallback(out=tmp_path / "run"), Module()
    _fit(callback, module, batches=12, accumulate=3)
    expected = {s: sum(module.seen[3 * s:3 * s + 3]) / 3 for s in range(4)}  # the mean of each step's three
    assert callback.session.frame().step.nunique() == 4
    losses = gradscope.store.read_losses(tmp_path / "run" / "records")
    assert dict(zip(losses.step, losses.loss)) == pytest.approx(expected, rel=1e-6)
    # the callback's own report: the final loss (mean of the last ten recorded, here all four) and the alerts checked
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_loss"] == {"run": pytest.approx(sum(expected.values()) / 4, rel=1e-6)}
    assert summary["alerts"] == [] and (tmp_path / "run" / "alerts.csv").exists()


def test_lightning_loss_spike_and_nan_loss_fire(tmp_path):
    found = []
    _fit(LightningCallback(on_anomaly=found.append), Module(spike_at=25, nan_at=32), batches=40)
    kinds = [(a.step, a.kind, a.metric) for a in found]
    assert (25, "loss_spike", "loss") in kinds and (32, "divergence", "loss") in kinds  # before: no loss, no alert


class ManualModule(L.LightningModule):
    """Manual optimization: one backward and step per batch; ``returns`` says what training_step returns (the loss
    tensor, a dict holding it, or nothing, as a GAN with two losses would)."""

    def __init__(self, returns, nan_at=-1):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        self.automatic_optimization = False
        self.returns, self.nan_at, self.seen = returns, nan_at, []

    def training_step(self, batch, index):
        optimizer = self.optimizers()
        loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        loss = loss + math.nan if index == self.nan_at else loss
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.seen.append(float(loss))
        return {"tensor": loss, "dict": {"loss": loss, "acc": 0.5}, "none": None}[self.returns]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("returns", ["tensor", "dict"])
def test_lightning_manual_optimization_gives_the_returned_loss(tmp_path, returns):
    callback, module = LightningCallback(out=tmp_path / "run"), ManualModule(returns)
    _fit(callback, module, batches=6)
    losses = gradscope.store.read_losses(tmp_path / "run" / "records")
    assert dict(zip(losses.step, losses.loss)) == pytest.approx(dict(enumerate(module.seen)), rel=1e-6)
    assert callback.losses() == pytest.approx(dict(enumerate(module.seen)), rel=1e-6)  # before: no loss at all


def test_lightning_manual_optimization_without_a_returned_loss_gives_none():
    callback, module = LightningCallback(), ManualModule("none")
    _fit(callback, module, batches=4)
    assert callback.session.frame().step.nunique() == 4 and callback.losses() == {}


def test_lightning_manual_optimization_nan_loss_is_a_divergence():
    found = []
    _fit(LightningCallback(on_anomaly=found.append), ManualModule("tensor", nan_at=5), batches=8)
    assert (5, "divergence", "loss") in [(a.step, a.kind, a.metric) for a in found]


def _gpt2():
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_hugging_face_gives_the_loss_the_trainer_logs(tmp_path, accumulate):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (24, 12), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]
    callback = HFCallback(out=tmp_path / "run")
    args = transformers.TrainingArguments(str(tmp_path / "hf"), max_steps=6 // accumulate, per_device_train_batch_size=4,
                                          gradient_accumulation_steps=accumulate, learning_rate=1e-3, report_to=[],
                                          logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0, save_strategy="no")
    trainer = transformers.Trainer(model=_gpt2(), args=args, train_dataset=data, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    logged = {e["step"] - 1: e["loss"] for e in trainer.state.log_history if "loss" in e}  # the Trainer counts from 1
    assert len(logged) == 6 // accumulate
    losses = gradscope.store.read_losses(tmp_path / "run" / "records")
    assert dict(zip(losses.step, losses.loss)) == pytest.approx(logged, rel=1e-4)


class WarmModule(L.LightningModule):
    """SGD with a torch LinearLR warm-up from 1/1000 of the base, stepped per ``interval``."""

    def __init__(self, interval):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        self.interval = interval

    def training_step(self, batch, index):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3,
                                                  total_iters=3 if self.interval == "epoch" else 2400)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.interval}}


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_a_lightning_warm_up_is_judged_at_its_base_when_it_rises_each_step(interval):
    # Lightning closes the step inside the optimizer's closure, between its pre- and post-hooks: what the step was
    # told must still reach the update_ratio rows that come a flush later (before: never, so every warm-up fired)
    found = []
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(8)]
    callback = LightningCallback(on_anomaly=found.append)
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(WarmModule(interval), torch.utils.data.DataLoader(data, batch_size=None))
    band = [a for a in found if a.kind == "update_band"]
    frame = callback.frame()
    assert (frame[frame.metric == "update_ratio"].value < 1e-5).sum() >= 3  # the warm-up's steps are below the band
    if interval == "step":  # a slow warm-up (over 2400 steps) that rises at every step: judged at its base
        assert band == []
    else:  # flat for a whole epoch at 1/1000 of the base: judged as it is, and the note says what it looks like
        assert len(band) == 1 and "stepped once per epoch" in band[0].note and "0.001 of the base" in band[0].note


@pytest.mark.parametrize("amp", [False, True])
def test_lightning_undoes_its_accumulation_division_and_the_amp_loss_scale(amp):
    # 7 batches at accumulate_grad_batches=3: the epoch's last step has one micro-batch, which Lightning still
    # divides by 3; under fp16 AMP the loss it hands over is also multiplied by the scaler's scale (1024)
    module = Module()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(7)]
    kwargs = {}
    if amp:
        from lightning.pytorch.plugins import MixedPrecision
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))]
    callback = LightningCallback()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[callback],
                        accumulate_grad_batches=3, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    assert sorted(callback.frame().step.unique()) == [0, 1, 2]
    seen = module.seen
    expected = {0: sum(seen[0:3]) / 3, 1: sum(seen[3:6]) / 3, 2: seen[6]}  # before: step 2 was a third of it
    assert callback.losses() == pytest.approx(expected, rel=1e-3 if amp else 1e-6)  # (before, under AMP: x1024)


def test_a_new_run_starts_with_no_loss_of_the_last_one_and_the_tape_stays_one_number():
    from gradscope.integrations.common import LossTape, Session

    tape = LossTape()
    for _ in range(1000):
        tape.add(torch.tensor(2.0), summed=False)
    assert tape.take().item() == pytest.approx(2.0) and tape.take() is None
    tape.add(torch.tensor(1.0), summed=True)
    tape.add(torch.tensor(3.0), summed=True)
    assert tape.take().item() == 4.0
    session = Session("test", blocks="auto", every=1, out=None, metrics=None, sinks=(), report=False, options={})
    session.losses.add(torch.tensor(5.0), summed=True)  # a micro-batch of a run that failed before its step closed
    session.start(nn.Sequential(nn.Linear(2, 2)))
    assert session.losses.take() is None
    session.finish()
