"""WHAT to measure: small tensor reductions for the hooks, and pure host-side arithmetic that finishes them.

Hooks call the ``*_sums`` functions, which return 1-D tensors of *raw sums* on the input's device and never read a
value back to the host (no ``.item()``, no ``bool(tensor)``): they cause no host-device synchronisation. The
arithmetic that turns raw sums into means and variances runs once per recorded step on the host, in Python floats
(:func:`finish_moments`), so a hook launches as few kernels as possible.

Numerics, and why they look the way they do:

* Reductions run in float32 whatever the input's dtype (bf16/fp16 inputs are upcast once), so sums of squares of
  values beyond the fp16 range do not overflow. float64 inputs stay float64.
* The variance is computed in two passes: the mean ``m`` first, then ``d = x - m``,
  ``var = mean(d^2) - mean(d)^2`` (the second term corrects the rounding of ``m``; finished in float64 on the host).
  The one-pass ``E[x^2] - E[x]^2`` loses every digit when the mean is large next to the spread (1e4 + N(0, 1) in
  float32), and shifting by one element fails when that element is atypical. This is also several times cheaper
  than ``torch.var_mean``, which takes a slow path on CPU.
* Exact counts avoid boolean reductions (``count_nonzero``, ``(x == 0).sum()``), which are slow on CPU: zeros are
  counted as ``n - sum(ceil(min(|x|, 1)))`` (so the zero fraction is NaN when the tensor holds a NaN: undefined,
  not guessed), reusing the centred buffer; non-finite values as
  ``n - nansum(x * 0 + 1)`` (``x * 0 + 1`` is 1 for finite values and NaN otherwise). Both are exact (float64
  accumulation above 2**24 elements).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch

_EXACT_FLOAT32_COUNT = 2**24


def _work(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    if flat.dtype in (torch.float32, torch.float64):
        return flat
    return flat.to(torch.float32)


_CHUNK = 1024
_FOREACH_MAX = 1 << 16


def l2_norm(flat: torch.Tensor, dtype: torch.dtype = None) -> torch.Tensor:
    """L2 norm of a 1-D tensor, accurate to float32 rounding at any length.

    ``torch.linalg.vector_norm`` on CPU accumulates long vectors in a way that loses digits: 4e-4 relative error
    on 2**20 float32 values, far above the 1e-5 gradscope promises. Norms of 1024-element rows, whose squares are
    then summed pairwise, stay at 1e-7 and are no slower.
    """
    n = flat.numel()
    if n <= 4 * _CHUNK:
        return torch.linalg.vector_norm(flat, dtype=dtype)
    m = n - n % _CHUNK
    rows = torch.linalg.vector_norm(flat[:m].view(-1, _CHUNK), dim=1, dtype=dtype)
    squared = rows.square().sum()
    if m < n:
        squared = squared + torch.linalg.vector_norm(flat[m:], dtype=dtype).square()
    return squared.sqrt()


def _sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dtype=torch.float64) if t.numel() > _EXACT_FLOAT32_COUNT else t.sum()


def _nansum(t: torch.Tensor) -> torch.Tensor:
    return torch.nansum(t, dtype=torch.float64) if t.numel() > _EXACT_FLOAT32_COUNT else torch.nansum(t)


class Scratch:
    """One reusable work buffer per (device, dtype), grown to the largest tensor seen.

    Why: on CPU a fresh multi-megabyte allocation per hook call is served by ``mmap`` and page-faulted in on first
    touch, which costs more than the reductions themselves. Reusing one buffer keeps a recorded step's extra memory
    at one activation's size and its extra time at the arithmetic. Hooks run one at a time, so one buffer per
    device and dtype is enough.
    """

    def __init__(self) -> None:
        self._buffers: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, n: int, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=like.dtype, device=like.device)
            self._buffers[key] = buf
        return buf[:n]


def raw_width(zeros: bool, nonfinite: bool, max_abs: bool) -> int:
    """Length of the raw vector :func:`activation_sums` returns for these options."""
    return 3 + int(zeros) + int(nonfinite) + 2 * int(max_abs)


def activation_sums(x: torch.Tensor, *, zeros: bool = True, nonfinite: bool = True, max_abs: bool = False,
                    scratch: "Scratch | None" = None) -> torch.Tensor:
    """Raw sums of all elements of ``x`` (1-D float32, on ``x``'s device; no host sync).

    Layout: ``[m, sum(x - m), ||x - m||_2]`` where ``m`` is the float32 mean (the shift that keeps the variance
    exact), then ``zero_count`` if ``zeros``, ``nonfinite_count`` if ``nonfinite``, ``min, max`` if ``max_abs``.
    Counts are complemented in float64 on the device before the float32 cast, so small counts stay exact in any
    tensor size. :func:`finish_moments` turns the vector into the metrics.
    """
    flat = _work(x)
    n = flat.numel()
    if n == 0:
        return torch.full((raw_width(zeros, nonfinite, max_abs),), float("nan"), dtype=torch.float32, device=x.device)
    shift = _sum(flat) / n
    if scratch is None:
        centred = flat - shift.to(flat.dtype)
    else:
        centred = torch.sub(flat, shift.to(flat.dtype), out=scratch.get(n, flat))
    parts: List[torch.Tensor] = [shift, centred.sum(), l2_norm(centred)]
    # the counts reuse the centred buffer (``out=``): no allocation beyond the one subtraction above
    if zeros:  # ceil(min(|x|, 1)) is 1 for any nonzero value (denormals, Inf), 0 for 0, NaN for NaN
        parts.append(n - _sum(torch.abs(flat, out=centred).clamp_max_(1.0).ceil_()))
    if nonfinite:  # x * 0 + 1 is 1 where x is finite, NaN where it is NaN or Inf
        parts.append(n - _nansum(torch.mul(flat, 0.0, out=centred).add_(1.0)))
    if max_abs:
        parts.extend(torch.aminmax(flat))
    return torch.stack([p.to(torch.float32) for p in parts])


def finish_moments(raw: Sequence[float], n: int, *, zeros: bool = True, nonfinite: bool = True,
                   max_abs: bool = False) -> List[float]:
    """``[mean, var, rms]`` (+ ``zero_frac``, ``nonfinite``, ``max_abs`` as asked) from :func:`activation_sums`.

    Pure host arithmetic in float64. ``var`` is the population variance (divides by N) over every element.
    """
    if n == 0:
        return [math.nan] * (3 + int(zeros) + int(nonfinite) + int(max_abs))
    shift, s1, norm = (float(v) for v in raw[:3])
    mean_c = s1 / n
    var = max(norm * norm / n - mean_c * mean_c, 0.0) if math.isfinite(norm) else norm * norm
    mean = mean_c + shift
    rms = math.sqrt(var + mean * mean) if math.isfinite(var) else var
    out = [mean, var, rms]
    i = 3
    if zeros:
        out.append(min(max(float(raw[i]), 0.0), n) / n)
        i += 1
    if nonfinite:
        out.append(float(raw[i]))
        i += 1
    if max_abs:
        lo, hi = float(raw[i]), float(raw[i + 1])
        out.append(max(hi, -lo))
    return out


def activation_stats(x: torch.Tensor, *, zeros: bool = True, nonfinite: bool = True, max_abs: bool = True) -> List[float]:
    """Convenience for tests and notebooks (reads values back): the finished metrics of ``x`` as Python floats."""
    raw = activation_sums(x, zeros=zeros, nonfinite=nonfinite, max_abs=max_abs).tolist()
    return finish_moments(raw, x.numel(), zeros=zeros, nonfinite=nonfinite, max_abs=max_abs)


def grad_norm(g: torch.Tensor) -> torch.Tensor:
    """L2 norm of a gradient tensor as a 1-element float32 tensor, reduced in float32 (float64 for float64)."""
    flat = g.detach().reshape(-1)
    dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    return l2_norm(flat, dtype=dtype).to(torch.float32).reshape(1)


class GroupIndex:
    """A cache of device index tensors for :func:`group_norms`, so a recorded step builds none of them again."""

    def __init__(self) -> None:
        self._index: Dict[Tuple[torch.device, Tuple[int, ...]], torch.Tensor] = {}

    def index(self, device: torch.device, groups: Sequence[int]) -> torch.Tensor:
        key = (device, tuple(groups))
        if key not in self._index:
            self._index[key] = torch.tensor(list(groups), device=device, dtype=torch.long)
        return self._index[key]


def group_norms(tensors: Sequence[torch.Tensor], groups: Sequence[int], n_groups: int,
                index: "GroupIndex" = None) -> torch.Tensor:
    """L2 norm over each group of tensors, as a float32 vector of length ``n_groups`` (0 for empty groups).

    ``groups[i]`` names the group of ``tensors[i]``. All tensors must sit on one device. The per-tensor norms come
    from one ``torch._foreach_norm`` call where possible, then squared norms are summed per group.
    """
    if not tensors:
        return torch.zeros(n_groups, dtype=torch.float32)
    device = tensors[0].device
    norms = _norms(tensors)
    idx = index.index(device, groups) if index is not None else torch.tensor(list(groups), device=device)
    squared = torch.zeros(n_groups, dtype=torch.float32, device=device)
    squared.index_add_(0, idx, norms.square())
    return squared.sqrt()


def _norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-tensor L2 norms: one ``_foreach_norm`` for the small float32 tensors, :func:`l2_norm` for the rest
    (``_foreach_norm`` shares ``vector_norm``'s loss of digits on long tensors)."""
    detached = [t.detach() for t in tensors]
    out: List[torch.Tensor] = [None] * len(detached)  # type: ignore[list-item]
    small = [i for i, t in enumerate(detached) if t.dtype == torch.float32 and t.numel() <= _FOREACH_MAX]
    if small and hasattr(torch, "_foreach_norm"):
        for i, norm in zip(small, torch._foreach_norm([detached[i] for i in small])):
            out[i] = norm
    for i, t in enumerate(detached):
        if out[i] is None:
            dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
            out[i] = l2_norm(t.reshape(-1), dtype=dtype).to(torch.float32)
    return torch.stack(out)
