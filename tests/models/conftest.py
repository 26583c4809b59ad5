"""Run the model tests on one intra-op thread.

Their tensors are small (batches of 4 to 64 CIFAR images through 16-channel convs), where one thread is as fast
as two on an idle machine and many times faster on a busy 2-core CI runner, where the threads spin against
each other. The previous setting is restored after each module, so tests elsewhere are unaffected.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
