"""Metric functions on hand-set tensors with closed-form answers, and their numerics against float64."""
from __future__ import annotations

import math

import pytest
import torch

import gradscope.engine.metrics as M
from gradscope.engine.metrics import activation_stats as _stats, grad_norm, group_norms

@pytest.fixture(params=[True, False], ids=["checked", "centred"])
def activation_stats(request):
    """Every activation test runs on both paths: the CPU's checked one-pass path and the centred path GPUs take."""
    return lambda x, **kw: _stats(x, check_on_host=request.param, **kw)


def test_closed_form_moments(activation_stats):
    x = torch.tensor([[0.0, 2.0], [4.0, 0.0]])
    mean, var, rms, zero_frac, nonfinite, max_abs = activation_stats(x)
    assert mean == 1.5
    assert var == pytest.approx(((1.5) ** 2 * 2 + 0.5 ** 2 + 2.5 ** 2) / 4)
    assert rms == pytest.approx(math.sqrt((4 + 16) / 4))
    assert zero_frac == 0.5 and nonfinite == 0 and max_abs == 4.0


@pytest.mark.parametrize("size", [9, 70_000])
def test_zero_and_nonfinite_counts_are_exact(size, activation_stats):
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
    assert zero_frac * size == pytest.approx(5)  # a NaN is not a zero: counted apart
    x[4] = -0.0
    assert activation_stats(x)[3] * size == pytest.approx(6)  # -0.0 is a zero


@pytest.mark.parametrize("size", [9, 70_000, 2**24 + 5])
def test_zero_count_is_exact_beyond_what_a_float32_holds(size):
    """The zero count is an integer sum of a bool pass (the fastest candidate right after a block's forward, where a
    training step runs it: ``benchmarks/reductions.py``). 2**24 + 1 non-zero elements: no float32 holds that
    count."""
    x = torch.ones(size)
    x[:6] = torch.tensor([0.0, float("nan"), -0.0, 1e-42, float("inf"), 0.0])  # NaN, Inf, a denormal: non-zero
    x[-1] = 0.0
    assert M.nonzero_count(x).item() == size - 4


def test_large_mean_small_spread_keeps_1e4_relative_accuracy(activation_stats):
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
def test_half_inputs_reduced_in_float32(dtype, activation_stats):
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


def test_empty_tensor_gives_no_value_not_nan_or_an_error(activation_stats):
    assert activation_stats(torch.empty(0, 3)) == []  # an empty output makes no row (a NaN would read as divergence)


def test_an_atypical_first_element_does_not_spoil_the_variance(activation_stats):
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


def test_counts_stay_exact_beyond_float32_integers(activation_stats):
    x = torch.ones(2**24 + 3)
    x[5] = float("nan")
    x[7] = 0.0
    mean, var, rms, zero_frac, nonfinite, _ = activation_stats(x)
    assert nonfinite == 1
    assert zero_frac * x.numel() == pytest.approx(1.0)
    x[5] = 2.0
    assert activation_stats(x)[3] * x.numel() == pytest.approx(1.0)
    assert activation_stats(x)[4] == 0


def test_long_norms_keep_float32_accuracy(activation_stats):
    """torch.linalg.vector_norm loses ~4e-4 relative on 2**20 values on CPU; gradscope's norms must not."""
    from gradscope.engine.metrics import l2_norm

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


def _count_centred(monkeypatch):
    calls = []
    real = M._centred_sums
    monkeypatch.setattr(M, "_centred_sums", lambda *a: (calls.append(1), real(*a))[1])
    return calls


def test_cpu_takes_the_one_pass_path_and_falls_back_only_when_a_check_fails(monkeypatch):
    """The checked path must really be the one used for ordinary activations, and must defer to the centred path
    exactly when its one-pass answer could be wrong."""
    calls = _count_centred(monkeypatch)
    torch.manual_seed(0)
    for x in (torch.relu(torch.randn(64, 16, 32, 32)), torch.randn(64, 256), torch.randn(64, 256) + 2.0):
        M.activation_sums(x)
    assert calls == []
    big_mean = 1e4 + torch.randn(1000)
    with_inf = torch.randn(1000)
    with_inf[3] = float("inf")
    for x in (big_mean, with_inf):
        M.activation_sums(x)
    assert len(calls) == 2
    M.activation_sums(big_mean, check_on_host=False)
    assert len(calls) == 3


@pytest.mark.parametrize("n", [1, 1000, 2**15, 2**15 + 1, 2**20 + 17, 3 * 2**22])
def test_sum_of_squares_keeps_float32_accuracy_at_any_length(n):
    torch.manual_seed(n % 97)
    x = torch.randn(n) * 3 + 1
    ref = x.double().square().sum().item()
    assert M.sum_of_squares(x).item() == pytest.approx(ref, rel=1e-6)
    assert M.sum_of_squares(x.double()).item() == pytest.approx(ref, rel=1e-12)


def test_permuted_layouts_are_read_in_place_with_the_same_answer(activation_stats):
    torch.manual_seed(0)
    x = torch.randn(8, 16, 6, 6).relu().contiguous(memory_format=torch.channels_last)
    flat = M._flat_view(x)
    assert flat.data_ptr() == x.data_ptr() and flat.numel() == x.numel()  # no copy
    assert sorted(flat.tolist()) == sorted(x.reshape(-1).tolist())
    assert activation_stats(x) == pytest.approx(activation_stats(x.contiguous()), rel=1e-6)
    sliced = x[:, ::2]  # not dense: copied, still right
    assert activation_stats(sliced) == pytest.approx(activation_stats(sliced.contiguous()), rel=1e-6)


def test_both_paths_agree_with_float64_on_ordinary_activations():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(32, 8, 16, 16) * 2 + 0.5)
    ref = x.double()
    expected = [ref.mean().item(), ref.var(unbiased=False).item(), ref.square().mean().sqrt().item(),
                (ref == 0).double().mean().item(), 0.0, ref.abs().max().item()]
    for on_host in (True, False):
        assert _stats(x, check_on_host=on_host) == pytest.approx(expected, rel=2e-6, abs=1e-12)


def test_one_pass_variance_is_accurate_up_to_the_trust_bound(monkeypatch):
    """Just inside the bound (mean^2 = 15.2 var) the checked path answers alone, and still to 1e-5."""
    calls = _count_centred(monkeypatch)
    torch.manual_seed(1)
    x = 3.9 + torch.randn(2**20 + 5)
    ref = x.double()
    mean, var, rms = _stats(x, zeros=False, nonfinite=False, max_abs=False)
    assert calls == []
    assert var == pytest.approx(ref.var(unbiased=False).item(), rel=1e-5)
    assert mean == pytest.approx(ref.mean().item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_an_overflow_to_inf_gives_an_infinite_mean_not_nan_as_the_traced_sums_do(dtype):
    from gradscope.engine.metrics import activation_sums, finish_moments
    from gradscope.engine.traced import traced_sums

    x = torch.tensor([1.0, float("inf"), 2.0, 0.0], dtype=dtype)  # an fp16 activation that overflowed
    extras = (("zeros",), ("nonfinite",))
    for check in (True, False):  # the CPU's checked path (which falls back) and the GPU's no-read path
        raw = activation_sums(x, check_on_host=check)
        raw = list(raw) if isinstance(raw, tuple) else raw.tolist()
        mean, var, rms, zero_frac, nonfinite = finish_moments(raw, x.numel())
        assert mean == math.inf and rms == math.inf and nonfinite == 1.0 and zero_frac == 0.25
        assert finish_moments(traced_sums(x, extras).tolist(), x.numel())[0] == mean
    both = torch.tensor([1.0, float("inf"), -float("inf")], dtype=dtype)  # inf - inf: no mean
    raw = activation_sums(both, check_on_host=False).tolist()
    assert math.isnan(finish_moments(raw, both.numel())[0])
