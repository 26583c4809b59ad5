"""Metric functions on hand-set tensors with closed-form answers, and their numerics against float64."""
from __future__ import annotations

import math

import pytest
import torch

from gradscope.metrics import activation_stats, grad_norm, group_norms


def test_closed_form_moments():
    x = torch.tensor([[0.0, 2.0], [4.0, 0.0]])
    mean, var, rms, zero_frac, nonfinite, max_abs = activation_stats(x)
    assert mean == 1.5
    assert var == pytest.approx(((1.5) ** 2 * 2 + 0.5 ** 2 + 2.5 ** 2) / 4)
    assert rms == pytest.approx(math.sqrt((4 + 16) / 4))
    assert zero_frac == 0.5 and nonfinite == 0 and max_abs == 4.0


@pytest.mark.parametrize("size", [9, 70_000])
def test_zero_and_nonfinite_counts_are_exact(size):
    x = torch.ones(size)
    x[:7] = torch.tensor([0.0, 2.0, float("inf"), 0.0, 1e-42, -float("inf"), 3.0])  # 1e-42: a denormal, nonzero
    x[-3:] = 0.0
    mean, var, rms, zero_frac, nonfinite, max_abs = activation_stats(x)
    assert nonfinite == 2
    assert zero_frac * size == pytest.approx(5)
    assert math.isnan(mean) and max_abs == float("inf")
    x[1] = float("nan")
    mean, var, rms, zero_frac, nonfinite, max_abs = activation_stats(x)
    assert nonfinite == 3
    assert math.isnan(zero_frac)  # undefined with a NaN present, not guessed


def test_large_mean_small_spread_keeps_1e4_relative_accuracy():
    torch.manual_seed(0)
    x64 = 1.0e4 + torch.randn(256, 1024, dtype=torch.float64)
    mean, var, rms = activation_stats(x64.float(), zeros=False, nonfinite=False, max_abs=False)
    ref = x64.float().double()
    assert var == pytest.approx(torch.var(ref, unbiased=False).item(), rel=1e-4)
    assert mean == pytest.approx(ref.mean().item(), rel=1e-6)
    # the naive one-pass formula in float32 would be off by orders of magnitude: show the test can fail
    naive = (x64.float().pow(2).mean() - x64.float().mean() ** 2).item()
    assert abs(naive - torch.var(ref, unbiased=False).item()) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_reduced_in_float32(dtype):
    torch.manual_seed(0)
    x = (torch.randn(512, 512) * 300).to(dtype)  # sum of squares ~ 2.4e10: beyond fp16
    ref = x.double()
    mean, var, rms = activation_stats(x, zeros=False, nonfinite=False, max_abs=False)
    assert var == pytest.approx(torch.var(ref, unbiased=False).item(), rel=1e-4)
    assert rms == pytest.approx(ref.pow(2).mean().sqrt().item(), rel=1e-4)
    assert grad_norm(x).item() == pytest.approx(ref.norm().item(), rel=1e-4)


def test_group_norms_sum_squares_per_group():
    a, b, c = torch.full((3,), 2.0), torch.full((4,), 1.0), torch.tensor([3.0, 4.0])
    got = group_norms([a, b, c], [0, 0, 2], 3).tolist()
    assert got == pytest.approx([math.sqrt(12 + 4), 0.0, 5.0])


def test_empty_tensor_gives_nan_not_an_error():
    assert all(math.isnan(v) for v in activation_stats(torch.empty(0, 3)))


def test_an_atypical_first_element_does_not_spoil_the_variance():
    torch.manual_seed(0)
    x = torch.randn(1_000_000)
    x[0] = 1e5
    ref = x.double()
    var = activation_stats(x, zeros=False, nonfinite=False, max_abs=False)[1]
    assert var == pytest.approx(torch.var(ref, unbiased=False).item(), rel=1e-4)
    y = 1 + 1e-3 * torch.randn(100_000)
    y[0] = 0.0
    var = activation_stats(y, zeros=False, nonfinite=False, max_abs=False)[1]
    assert var == pytest.approx(torch.var(y.double(), unbiased=False).item(), rel=1e-3)


def test_counts_stay_exact_beyond_float32_integers():
    x = torch.ones(2**24 + 3)
    x[5] = float("nan")
    x[7] = 0.0
    mean, var, rms, zero_frac, nonfinite, _ = activation_stats(x)
    assert nonfinite == 1
    assert math.isnan(zero_frac)
    x[5] = 2.0
    assert activation_stats(x)[3] * x.numel() == pytest.approx(1.0)
    assert activation_stats(x)[4] == 0


def test_long_norms_keep_float32_accuracy():
    """torch.linalg.vector_norm loses ~4e-4 relative on 2**20 values on CPU; gradscope's norms must not."""
    from gradscope.metrics import l2_norm

    torch.manual_seed(0)
    x = torch.relu(torch.randn(64, 16, 32, 32)).reshape(-1)
    ref = x.double().norm().item()
    assert l2_norm(x).item() == pytest.approx(ref, rel=2e-6)
    assert grad_norm(x[:-5]).item() == pytest.approx(x[:-5].double().norm().item(), rel=2e-6)
    var = activation_stats(x, zeros=False, nonfinite=False, max_abs=False)[1]
    assert var == pytest.approx(torch.var(x.double(), unbiased=False).item(), rel=2e-6)
    big = torch.randn(1000, 300)
    assert group_norms([big, torch.ones(3)], [0, 0], 1).item() == pytest.approx(
        (big.double().norm() ** 2 + 3).sqrt().item(), rel=2e-6)
