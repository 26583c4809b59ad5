"""GradscopeCallback in a real lightning.Trainer (CPU) records what attach() records in a plain loop."""
from __future__ import annotations

import csv
import json
import warnings

import pandas as pd
import pytest
import lightning as L
import torch
from torch import nn

import gradscope
from gradscope.integrations.lightning import GradscopeCallback

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, LR = 5, 0.1


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(STEPS)]


class Module(L.LightningModule):
    def __init__(self, fail_at: int = -1) -> None:
        super().__init__()
        self.net = _net()
        self.fail_at = fail_at

    def training_step(self, batch, index):
        if index == self.fail_at:
            raise RuntimeError("boom at batch 3")
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def _fit(callback, tmp_path, module=None) -> Module:
    module = module or Module()
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=L.pytorch.loggers.CSVLogger(
        str(tmp_path), name="csv", version=0), enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, callbacks=[callback])
    loader = torch.utils.data.DataLoader(_batches(), batch_size=None, shuffle=False)
    trainer.fit(module, loader)
    return module


def _plain() -> pd.DataFrame:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with gradscope.attach(model, optimizer=opt) as scope:
        for x, y in _batches():
            nn.functional.cross_entropy(model(x), y).backward()
            scope.step()
            opt.step()
            opt.zero_grad()
    return scope.frame()


def _key(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["step", "block", "call", "metric"]).reset_index(drop=True)


def test_the_callback_records_what_a_plain_loop_records(tmp_path):
    sent = []
    callback = GradscopeCallback(out=tmp_path / "gs", log=True, sinks=[sent.append])
    _fit(callback, tmp_path)
    got, want = _key(callback.frame()), _key(_plain())
    pd.testing.assert_frame_equal(_key(pd.concat(sent, ignore_index=True)), got)  # the sink saw every row
    assert len(got) > 0 and callback.scope is None  # detached at fit end
    got = got.assign(block=got.block.str.removeprefix("net."))
    pd.testing.assert_frame_equal(got.drop(columns="value"), want.drop(columns="value"))
    assert got.value.to_numpy() == pytest.approx(want.value.to_numpy(), rel=1e-6, abs=1e-12)
    assert set(got[got.metric == "update_ratio"].step) == set(range(STEPS))
    # the report and the provenance record are in out; the streamed parts load back equal
    out = tmp_path / "gs"
    assert (out / "report.html").exists()
    pd.testing.assert_frame_equal(_key(gradscope.load(out / "records")), _key(callback.frame()))
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["made_by"] == "lightning" and prov["status"] == "finished" and prov["steps"] == STEPS
    assert prov["config"]["trainer"]["max_steps"] == STEPS and prov["versions"]["lightning"] == L.__version__
    # log=True: the compact scalars reached the trainer's CSV logger
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    logged = {int(r["step"]): float(r["gradscope/grad_norm_max"]) for r in rows if r.get("gradscope/grad_norm_max")}
    want_max = want[(want.metric == "grad_norm")].groupby("step").value.max()
    assert logged == pytest.approx(want_max.to_dict(), rel=1e-6)


def test_an_exception_keeps_the_rows_and_says_how_the_run_ended(tmp_path):
    callback, module = GradscopeCallback(out=tmp_path / "gs"), Module(fail_at=3)
    with pytest.raises(RuntimeError, match="boom"):
        _fit(callback, tmp_path, module)
    frame = callback.frame()
    assert sorted(set(frame.step)) == [0, 1, 2]  # batch 3 failed before its forward
    assert callback.scope is None and (tmp_path / "gs" / "report.html").exists()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())
    prov = json.loads((tmp_path / "gs" / "provenance.json").read_text())
    assert prov["status"] == "failed: RuntimeError: boom at batch 3"
    pd.testing.assert_frame_equal(_key(gradscope.load(tmp_path / "gs" / "records")), _key(frame))


def test_under_fp16_amp_with_a_grad_scaler_every_gradient_is_unscaled(tmp_path):
    """fp16 autocast with a GradScaler (scale 4096) on CPU: the callback's gradients equal fp32 ones to fp16
    precision, so the loss scale was divided out of activation gradients and parameter gradients alike."""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    callback = GradscopeCallback()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[callback],
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    trainer.fit(Module(), torch.utils.data.DataLoader(_batches(), batch_size=None, shuffle=False))
    assert scaler.get_scale() == 2.0 ** 12  # no overflow: every step used this scale
    got = callback.frame()
    got = got[got.step < 2].assign(block=got.block.str.removeprefix("net.")).set_index(["step", "block", "metric"])
    want = _plain()
    want = want[want.step < 2].set_index(["step", "block", "metric"])
    for metric in ("grad_norm", "grad_in_norm", "param_grad_norm", "update_ratio"):
        g = got.xs(metric, level="metric").value
        w = want.xs(metric, level="metric").value.loc[g.index]
        assert g.to_numpy() == pytest.approx(w.to_numpy(), rel=5e-3), metric


class Gan(L.LightningModule):
    """Manual optimization with two optimizers: the generator steps first, then the discriminator (its backward
    through D adds the G loss's gradient to D's .grad before D's own backward, unless toggle_optimizer freezes D).
    Keeps, per batch, the gradient norm each optimizer stepped with (read by a step pre-hook of the optimizer itself:
    after Lightning's AMP unscaled them) and the update ratio of D.0 (by hand)."""

    def __init__(self, toggle: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.G = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8))
        self.D = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.toggle, self.want, self.batch = toggle, {}, 0

    def _norms(self, names):
        for name in names:
            grads = [p.grad.double().reshape(-1) for p in self.get_submodule(name).parameters()]
            self.want[(self.batch, name, "param_grad_norm")] = torch.cat(grads).norm().item()

    def training_step(self, batch, index):
        self.batch = index
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], 4, generator=torch.Generator().manual_seed(index))
        if self.toggle:
            self.toggle_optimizer(opt_g)
        self.manual_backward(-self.D(self.G(z)).mean())
        opt_g.step()
        opt_g.zero_grad()
        if self.toggle:
            self.untoggle_optimizer(opt_g)
            self.toggle_optimizer(opt_d)
        opt_d.zero_grad()
        self.manual_backward(self.D(self.G(z).detach()).mean() - self.D(real).mean())
        opt_d.step()
        opt_d.zero_grad()
        if self.toggle:
            self.untoggle_optimizer(opt_d)

    def configure_optimizers(self):
        opt_g = torch.optim.SGD(self.G.parameters(), lr=0.05)
        opt_d = torch.optim.SGD(self.D.parameters(), lr=0.05)
        opt_g.register_step_pre_hook(lambda *a: self._norms(["G.0", "G.2"]))
        opt_d.register_step_pre_hook(lambda *a: self._norms(["D.0", "D.2"]))
        kept = []
        opt_d.register_step_pre_hook(lambda *a: kept.__setitem__(slice(None), [
            p.detach().clone() for p in self.D[0].parameters()]))
        opt_d.register_step_post_hook(lambda *a: self.want.__setitem__((self.batch, "D.0", "update_ratio"), (
            torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(self.D[0].parameters(), kept)]).norm()
            / torch.cat([b.reshape(-1) for b in kept]).norm()).item()))
        return [opt_g, opt_d]


@pytest.mark.parametrize("toggle, amp", [(False, False), (True, False), (False, True)])
def test_manual_optimization_reads_each_optimizers_gradient_at_its_own_step(tmp_path, toggle, amp):
    """A GAN under manual optimization: a step was closed inside the first optimizer's step, so D's forwards of
    one batch fell into the next step, D's update_ratio came one step late, and D's param_grad_norm was the G loss's
    gradient sitting in D's .grad (without toggle_optimizer: 1.1-3.1x off) or missing (with it). Now a step is a
    batch, and each optimizer's gradient is read at its own step. Under 16-bit AMP, where Lightning updates the
    scaler after each optimizer's step, D's gradient was divided by the loss scale a second time (x1/4096)."""
    from lightning.pytorch.plugins import MixedPrecision

    module, callback = Gan(toggle), GradscopeCallback(blocks=["G.0", "G.2", "D.0", "D.2"])
    plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))] if amp else []
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[callback],
                        plugins=plugins)
    data = torch.utils.data.TensorDataset(torch.randn(32, 8, generator=torch.Generator().manual_seed(1)))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    frame = callback.frame()
    assert sorted(set(frame.step)) == [0, 1, 2, 3]
    assert frame.query("block == 'D.0' and metric == 'act_var'").groupby("step").call.max().tolist() == [2] * 4
    got = {(s, b, m): v for s, b, m, v in zip(frame.step, frame.block, frame.metric, frame.value)
           if m in ("param_grad_norm", "update_ratio")}
    assert len(module.want) == 4 * 5
    for key, value in module.want.items():
        assert got[key] == pytest.approx(value, rel=1e-4 if amp else 1e-5), key


def test_a_second_fit_with_the_same_callback_is_refused_with_out_and_warned_about_without(tmp_path):
    """A callback records one fit: with out= a second fit used to stop on the store's "already holds the records
    of another run"; without out= frame() silently lost the first fit's rows. Both now say what happened."""
    from gradscope.errors import GradscopeError

    callback = GradscopeCallback(out=tmp_path / "gs")
    module = _fit(callback, tmp_path)
    first = callback.frame()
    with pytest.raises(GradscopeError, match="already recorded a run into out=.*needs a new callback"):
        _fit(callback, tmp_path, module)
    assert (tmp_path / "gs" / "report.html").is_file() and len(callback.frame()) == len(first)
    callback = GradscopeCallback()
    _fit(callback, tmp_path)
    with pytest.warns(RuntimeWarning, match="frame\\(\\) now holds the new run only, from step 0 again"):
        _fit(callback, tmp_path)
    assert set(callback.frame().step) == set(first.step)


def test_stochastic_weight_averagings_batchnorm_epoch_is_not_a_training_step(tmp_path):
    """With BatchNorm, StochasticWeightAveraging adds a last epoch of forwards without backward (it refreshes the
    BN statistics of the averaged weights). Before: recorded as a step of its own, with the last step's parameter
    gradients read again and a warning blaming the loop order; now the record ends with the last trained step."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    class BNModule(Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    callback = GradscopeCallback(out=tmp_path / "run")
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[callback, StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(BNModule(), torch.utils.data.DataLoader(_batches(), batch_size=None, shuffle=False))
    frame = callback.frame()
    trained = sorted(frame[frame.metric == "grad_norm"].step.unique())
    assert trained == list(range(2 * STEPS)) and sorted(frame.step.unique()) == trained  # no step without backward
    assert not any("before any backward" in str(w.message) for w in caught)
    assert (tmp_path / "run" / "report.html").exists()
