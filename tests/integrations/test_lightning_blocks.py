"""GradscopeCallback(log="blocks") in a real lightning.Trainer: one series per block and metric in the trainer's
loggers (a CSVLogger's metrics.csv and a TensorBoardLogger's event files, read back), equal to the records."""
from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradscope.errors import GradscopeError
from gradscope.integrations.common import metric_key
from gradscope.integrations.lightning import GradscopeCallback
from tests.integrations.test_lightning import STEPS, Module, _batches

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(callback, logger) -> None:
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[callback],
                        log_every_n_steps=1)
    trainer.fit(Module(), torch.utils.data.DataLoader(_batches(), batch_size=None, shuffle=False))


def _want(callback, metrics=None) -> dict:
    frame = callback.frame()
    if metrics:
        frame = frame[frame.metric.isin(metrics)]
    return {(metric_key("gradscope", m, b, c), int(s)): v
            for s, b, m, c, v in zip(frame.step, frame.block, frame.metric, frame.call, frame.value)}


def test_log_blocks_puts_every_block_series_into_a_csv_logger(tmp_path):
    callback = GradscopeCallback(log="blocks", report=False)
    _fit(callback, L.pytorch.loggers.CSVLogger(str(tmp_path), name="csv", version=0))
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    got = {(key, int(r["step"])): float(v) for r in rows for key, v in r.items()
           if key.startswith("gradscope/") and v != ""}
    want = _want(callback)
    assert {k for k, _ in want} >= {"gradscope/grad_norm/net.0", "gradscope/act_var/net.4",
                                    "gradscope/update_ratio/net.2"}
    assert got.keys() == want.keys()
    assert [got[k] for k in want] == pytest.approx(list(want.values()), rel=1e-6, nan_ok=True)
    assert not any(k.endswith(("_min", "_max")) for k, _ in got)  # the compact scalars are log=True's


def test_log_a_list_of_metrics_sends_those_series_to_tensorboard(tmp_path):
    callback = GradscopeCallback(log=["grad_norm", "act_var"], report=False)
    _fit(callback, L.pytorch.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0))
    got = {}
    for events in (tmp_path / "tb").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            got.update({(tag, e.step): e.value for e in acc.Scalars(tag) if tag.startswith("gradscope/")})
    want = _want(callback, ["grad_norm", "act_var"])
    assert got.keys() == want.keys() and len(want) == STEPS * 3 * 2
    assert [got[k] for k in want] == pytest.approx(list(want.values()), rel=1e-5)


@pytest.mark.parametrize("bad", ["all_blocks", ["grad_nrom"], [], 3])
def test_an_unknown_log_option_is_one_clear_error(bad):
    with pytest.raises(GradscopeError, match="pass True .*'blocks'"):
        GradscopeCallback(log=bad)
