"""Issue 21 §8: the BN backward theory leaves out zero padding; circular padding removes the gap, and a zero-padded
net's comparison says so and never reads "agrees"."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope
from gradscope import analysis as A
from gradscope.models import build


def backward(seed: int, circular: bool, batch: int = 32, size: int = 16):
    model = build("plain56", bn=True, seed=seed)
    if circular:
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                m.padding_mode = "circular"
    g = torch.Generator().manual_seed(seed)
    with gradscope.attach(model, metrics=["act_var", "grad_norm", "batch_size"]) as scope:
        for _ in range(1):
            x, y = torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)
            nn.functional.cross_entropy(model(x), y).backward()
            scope.step()
            model.zero_grad()
    cfg = {**model.gradscope_config, "image_size": size, **({"padding": "circular"} if circular else {})}
    return gradscope.verdicts(scope.frame(), configs={"run": cfg}).set_index(A.SIGNAL).loc[A.BACKWARD]


def test_zero_padding_lowers_the_bn_rate_and_the_comparison_says_so():
    zero = [backward(s, False) for s in (0, 1)]
    circ = [backward(s, True) for s in (0, 1)]
    predicted = zero[0][A.PREDICTED_FACTOR]
    assert predicted == pytest.approx(1.468, abs=0.005)
    for z, c in zip(zero, circ):
        assert z[A.MEASURED_FACTOR] < c[A.MEASURED_FACTOR] - 0.02  # padding costs ~x0.95 per block
        assert abs(c[A.MEASURED_FACTOR] / predicted - 1) < 0.03  # circular: the theory's assumption holds
        assert z[A.AGREEMENT] != "agrees" and "zero padding is not in the BN theory" in z[A.THEORY_NOTE]
        assert "zero padding" not in c[A.THEORY_NOTE]
