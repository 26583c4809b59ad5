"""Issue 21 §9: the data order varies with the seed, and runs paired by seed share it."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from gradscope.study.runs import Settings, batches_of, data_order_seed
from gradscope.study.specs import zoo_spec


def first_labels(seed: int, settings: Settings = Settings(batch_size=8), model: str = "plain20") -> list:
    data = TensorDataset(torch.zeros(64, 1), torch.arange(64))
    batches = batches_of(zoo_spec(model, seed=seed), data, settings)
    return [next(batches)[1].tolist() for _ in range(3)]


def test_runs_of_one_seed_share_their_batches_and_seeds_differ():
    assert first_labels(1, model="plain20") == first_labels(1, model="plain56")  # paired by seed: the same batches
    assert first_labels(0) != first_labels(1) != first_labels(2)  # the intervals cover the data order too
    assert data_order_seed(Settings(data_seed=0), 1) != data_order_seed(Settings(data_seed=1), 1)
    assert first_labels(1, Settings(batch_size=8, data_seed=3)) != first_labels(1)
