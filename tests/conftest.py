"""Shared fixtures."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one intra-op thread, then restore the previous setting.

    Small tensors gain nothing from two threads on an idle machine, and on a busy 2-core CI runner two threads
    spin against each other and run many times slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
