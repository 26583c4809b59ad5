"""WHAT to measure: small pure tensor functions that reduce a tensor to a few float32 numbers.

Every function here returns 0-dim or 1-dim tensors on the input's device and never reads a value back to the host
(no ``.item()``, no ``bool(tensor)``), so hooks built on them cause no host-device synchronisation.

Numerics, and why they look the way they do:

* Reductions run in float32 whatever the input's dtype (bf16/fp16 inputs are upcast once), so sums of squares of
  values beyond the fp16 range do not overflow. float64 inputs stay float64 until the result is returned.
* The variance is computed from a *shifted* one-pass sum and sum of squares: ``d = x - x[0]``, then
  ``var = mean(d^2) - mean(d)^2``. Without the shift, ``E[x^2] - E[x]^2`` loses every digit when the mean is large
  next to the spread (1e4 + N(0, 1) in float32); with it the error stays near float32 rounding. It is also several
  times cheaper than ``torch.var_mean`` on CPU, which takes a slow path.
* Exact counts (zeros, NaN/Inf) avoid boolean reductions, which are slow on CPU: ``|sign(x)|`` is 0 for a zero and
  1 for any other finite or infinite value, ``x * 0 + 1`` is 1 for finite values and NaN otherwise, and
  ``nansum`` of either is an exact count (in float64 above 2**24 elements).
"""
from __future__ import annotations

from typing import List, Sequence

import torch

_EXACT_FLOAT32_COUNT = 2**24


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _count(ones_or_nan: torch.Tensor) -> torch.Tensor:
    """Exact count of the non-NaN entries of a tensor of 0/1/NaN values."""
    if ones_or_nan.numel() > _EXACT_FLOAT32_COUNT:
        return torch.nansum(ones_or_nan, dtype=torch.float64)
    return torch.nansum(ones_or_nan)


def activation_stats(x: torch.Tensor, *, zeros: bool = True, nonfinite: bool = True, max_abs: bool = True) -> torch.Tensor:
    """Moments of all elements of ``x`` as one float32 vector.

    Returns ``[mean, var, rms]`` followed, in this order and only where asked, by ``zero_frac`` (fraction of exact
    zeros, e.g. dead ReLU units), ``nonfinite`` (count of NaN/Inf elements) and ``max_abs``.
    ``var`` is the population variance (divides by N) over every element of the batch tensor.

    With NaN/Inf present the moments are NaN/Inf, ``nonfinite`` is exact, and ``zero_frac`` counts zeros among the
    elements that are neither NaN nor Inf (it is exact when the tensor has no Inf).
    """
    flat = x.detach().reshape(-1)
    n = flat.numel()
    width = 3 + int(zeros) + int(nonfinite) + int(max_abs)
    if n == 0:
        return torch.full((width,), float("nan"), dtype=torch.float32, device=x.device)
    work = flat if flat.dtype == _work_dtype(flat) else flat.to(_work_dtype(flat))
    shift = work[0].clone()
    centred = work - shift
    s1 = centred.sum()
    s2 = torch.linalg.vector_norm(centred).square()
    mean_c = s1 / n
    var = (s2 / n - mean_c * mean_c).clamp_min(0.0)
    mean = mean_c + shift
    rms = (var + mean * mean).sqrt()
    out: List[torch.Tensor] = [mean, var, rms]
    bad = None
    if nonfinite or zeros:
        bad = n - _count(work.mul(0.0).add_(1.0))  # NaN/Inf count: x*0+1 is NaN exactly there
    if zeros:
        nonzero = _count(work.sign().abs_())  # |sign| is 1 for nonzero finite and Inf, NaN for NaN
        out.append(((n - nonzero - bad).clamp_min(0.0)) / n)
    if nonfinite:
        out.append(bad)
    if max_abs:
        lo, hi = torch.aminmax(work)
        out.append(torch.maximum(hi, -lo))
    return torch.stack([v.to(torch.float32) for v in out])


def tensor_variance(x: torch.Tensor) -> torch.Tensor:
    """Population variance of all elements of ``x`` (0-dim float32), with the same shifted sums as above."""
    return activation_stats(x, zeros=False, nonfinite=False, max_abs=False)[1]


def grad_stats(g: torch.Tensor, *, nonfinite: bool = True) -> torch.Tensor:
    """``[l2_norm]`` or ``[l2_norm, nonfinite_count]`` of a gradient tensor, as float32, reduced in float32."""
    flat = g.detach().reshape(-1)
    norm = torch.linalg.vector_norm(flat, dtype=_work_dtype(flat))
    if not nonfinite:
        return norm.to(torch.float32).reshape(1)
    work = flat if flat.dtype == _work_dtype(flat) else flat.to(_work_dtype(flat))
    bad = flat.numel() - _count(work.mul(0.0).add_(1.0))
    return torch.stack([norm.to(torch.float32), bad.to(torch.float32)])


def group_norms(tensors: Sequence[torch.Tensor], groups: Sequence[int], n_groups: int) -> torch.Tensor:
    """L2 norm over each group of tensors, as a float32 vector of length ``n_groups`` (0 for empty groups).

    ``groups[i]`` names the group of ``tensors[i]``. All tensors must sit on one device. The per-tensor norms come
    from one ``torch._foreach_norm`` call where available, then squared norms are summed per group.
    """
    if not tensors:
        return torch.zeros(n_groups, dtype=torch.float32)
    device = tensors[0].device
    norms = _norms(tensors)
    index = torch.tensor(list(groups), device=device, dtype=torch.long)
    squared = torch.zeros(n_groups, dtype=torch.float32, device=device)
    squared.index_add_(0, index, norms.square())
    return squared.sqrt()


def _norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    detached = [t.detach() for t in tensors]
    if all(t.dtype == torch.float32 for t in detached) and hasattr(torch, "_foreach_norm"):
        return torch.stack(list(torch._foreach_norm(detached)))
    return torch.stack([torch.linalg.vector_norm(t, dtype=_work_dtype(t)).to(torch.float32) for t in detached])
