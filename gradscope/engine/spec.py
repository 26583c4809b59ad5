"""One spec per metric: which raw sums its hook produces, how the host finishes them, how ranks combine them.

Every metric name of :mod:`gradscope.schema` has exactly one :class:`MetricSpec` in :data:`SPECS`, and each spec names
a cross-rank rule from :data:`COMBINE`; a name without one is an error when this module is imported, never a silent
default. Three layouts exist:

* ``moments`` (forward statistics of a block output): the hook's :func:`gradscope.engine.metrics.activation_sums`
  vector, a shared core ``[shift, sum(x - shift), sum((x - shift)^2)]`` followed by the extra raw slots the group's
  metrics name (:func:`raw_slots`), reduced over ``n`` elements;
* ``sqnorm`` (gradient norms): a squared L2 norm, finished by a square root (under ``torch.compile`` followed by
  the number of taps that ran: 0 means no gradient reached the tensor, and no row is made);
* ``value`` (parameter statistics): finished on the device already, one value per site.

Entries that measured nothing make no row: a ``moments`` or ``sqnorm`` entry over 0 elements (a mixture-of-experts
expert that received no token this step) finishes to no value at all, so a block that ran empty is absent from that
step's rows instead of holding NaN that would read as a divergence. An update ratio whose ``||theta||`` before the
step was exactly 0 (a zero-initialised branch) is undefined and makes no row either (layout :data:`RATIO`).

Adding a forward metric touches three files: its name in ``schema.FORWARD_METRICS``, its spec here, and the device
reduction of any new raw slot in :data:`gradscope.engine.metrics.SLOT_REDUCTIONS`.
"""
from __future__ import annotations

import functools

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from gradscope import schema as S
from gradscope.errors import GradscopeError

MOMENTS, SQNORM, VALUE = "moments", "sqnorm", "value"
LAYOUTS = (MOMENTS, SQNORM, VALUE)
#: entry layouts of parameter statistics of a sharded (FSDP2) model, whatever the metric: ``shard`` holds norms over
#: this rank's shards, ``shard_ratio`` ``[numerators..., denominators...]`` of such norms (the update ratio); ranks
#: combine them from the raw norms (:func:`combine_shards`), not by the metric's rule
SHARD, SHARD_RATIO = "shard", "shard_ratio"
SHARDED_LAYOUTS = (SHARD, SHARD_RATIO)
#: entry layout of the update ratio of an unsharded model: ``[numerators..., denominators...]`` (global norms, equal on
#: every rank), finished to ``numerator / denominator`` per site, with no value where the denominator is exactly 0
RATIO = "ratio"
#: the raw slots every ``moments`` vector starts with
CORE_SLOTS = ("shift", "sum", "sumsq")

Finish = Callable[[Mapping[str, float], int], float]
#: a cross-rank rule: (per-rank values, per-rank element counts, per-rank means or None, world size) -> global value
Combine = Callable[[List[float], List[float], "List[float] | None", int], float]


@dataclass(frozen=True)
class MetricSpec:
    """How one metric travels from a hook to a frame row.

    Attributes:
        name: the metric name (a :mod:`gradscope.schema` constant).
        layout: one of :data:`LAYOUTS`.
        raw: the raw slots it reads (``moments``: names in :data:`CORE_SLOTS` or in the metrics module's slot
            reductions; other layouts: ``("value",)``).
        finish: host arithmetic from the raw slots (a mapping slot -> float) and the element count.
        combine: the name of the cross-rank rule in :data:`COMBINE`.
    """

    name: str
    layout: str
    raw: Tuple[str, ...]
    finish: Finish
    combine: str


# ---- host finishing (float64 arithmetic on read-back raw sums) ------------------------------------------------
def _mean(r: Mapping[str, float], n: int) -> float:
    return r["sum"] / n + r["shift"]


def _var(r: Mapping[str, float], n: int) -> float:
    mean_c = r["sum"] / n
    s2 = r["sumsq"]
    return max(s2 / n - mean_c * mean_c, 0.0) if math.isfinite(s2) else s2


def _rms(r: Mapping[str, float], n: int) -> float:
    var, mean = _var(r, n), _mean(r, n)
    return math.sqrt(var + mean * mean) if math.isfinite(var) else var


def _zero_frac(r: Mapping[str, float], n: int) -> float:
    return min(max(r["zeros"], 0.0), n) / n


def _nonfinite(r: Mapping[str, float], n: int) -> float:
    return r["nonfinite"]


def _max_abs(r: Mapping[str, float], n: int) -> float:
    return max(r["max"], -r["min"])


def _sqrt(r: Mapping[str, float], n: int) -> float:
    v = r["value"]
    return math.sqrt(v) if v >= 0 else math.nan


def _as_is(r: Mapping[str, float], n: int) -> float:
    return r["value"]


# ---- cross-rank rules (see gradscope.engine.distributed) ------------------------------------------------------
def _pooled_mean(v: List[float], n: List[float], means: "List[float] | None", world: int) -> float:
    return sum(w * x for w, x in zip(n, v)) / sum(n)


def _pooled_var(v: List[float], n: List[float], means: "List[float] | None", world: int) -> float:
    """Exact variance of the union: sum_r n_r (var_r + (mean_r - mean)^2) / N."""
    assert means is not None
    total = sum(n)
    mean = sum(w * m for w, m in zip(n, means)) / total
    return sum(w * (x + (m - mean) ** 2) for w, x, m in zip(n, v, means)) / total


def _pooled_rms(v: List[float], n: List[float], means: "List[float] | None", world: int) -> float:
    total = sum(n)
    square = sum(w * x * x for w, x in zip(n, v)) / total
    return math.sqrt(square) if math.isfinite(square) else square


def _sum(v: List[float], n: List[float], means: "List[float] | None", world: int) -> float:
    return sum(v)


def _max(v: List[float], n: List[float], means: "List[float] | None", world: int) -> float:
    return max(v)


def _norm_of_mean_loss(v: List[float], n: List[float], means: "List[float] | None", world: int) -> float:
    """DDP averages the ranks' losses, so rank r's activation gradient is g_r / W: sqrt(sum_r |g_r|^2) / W."""
    return math.sqrt(sum(x * x for x in v)) / world


def _mean_over_ranks(v: List[float], n: List[float], means: "List[float] | None", world: int) -> float:
    """The loss of the global batch: DDP and FSDP2 train on the mean of the ranks' losses."""
    return sum(v) / world


def _first(v: List[float], n: List[float], means: "List[float] | None", world: int) -> float:
    """Already global (read after DDP's all-reduce, equal on all ranks): rank 0's value."""
    return v[0]


def _per_rank(v: List[float], n: List[float], means: "List[float] | None", world: int) -> float:
    """A quantity of one rank's own forward, deliberately not combined: rank 0's value (the batch size each rank's
    BatchNorm normalises over; ranks fed by a ``DistributedSampler`` see equal batches)."""
    return v[0]


COMBINE: Dict[str, Combine] = {
    "pooled_mean": _pooled_mean, "pooled_var": _pooled_var, "pooled_rms": _pooled_rms, "sum": _sum, "max": _max,
    "norm_of_mean_loss": _norm_of_mean_loss, "first": _first, "mean_over_ranks": _mean_over_ranks,
    "per_rank": _per_rank,
}


def _moments(name: str, raw: Tuple[str, ...], finish: Finish, combine: str) -> MetricSpec:
    return MetricSpec(name, MOMENTS, raw, finish, combine)


SPECS: Dict[str, MetricSpec] = {s.name: s for s in (
    _moments(S.ACT_MEAN, CORE_SLOTS, _mean, "pooled_mean"),
    _moments(S.ACT_VAR, CORE_SLOTS, _var, "pooled_var"),
    _moments(S.ACT_RMS, CORE_SLOTS, _rms, "pooled_rms"),
    _moments(S.ACT_ZERO_FRAC, ("zeros",), _zero_frac, "pooled_mean"),
    _moments(S.ACT_NONFINITE, ("nonfinite",), _nonfinite, "sum"),
    _moments(S.ACT_MAX_ABS, ("min", "max"), _max_abs, "max"),
    _moments(S.BRANCH_VAR, CORE_SLOTS, _var, "pooled_var"),
    _moments(S.SHORTCUT_VAR, CORE_SLOTS, _var, "pooled_var"),
    MetricSpec(S.GRAD_NORM, SQNORM, ("value",), _sqrt, "norm_of_mean_loss"),
    MetricSpec(S.GRAD_IN_NORM, SQNORM, ("value",), _sqrt, "norm_of_mean_loss"),
    MetricSpec(S.PARAM_NORM, VALUE, ("value",), _as_is, "first"),
    MetricSpec(S.PARAM_GRAD_NORM, VALUE, ("value",), _as_is, "first"),
    MetricSpec(S.UPDATE_RATIO, VALUE, ("value",), _as_is, "first"),
    # optimizer state is the same on every DDP rank (it follows the all-reduced gradients): rank 0's value
    MetricSpec(S.ADAM_M_NORM, VALUE, ("value",), _as_is, "first"),
    MetricSpec(S.ADAM_V_NORM, VALUE, ("value",), _as_is, "first"),
    # the per-rank batch, not the global one: without SyncBatchNorm, BN normalises over each rank's own batch, and
    # that batch is what the finite-batch BN theory needs (the global batch is this times the world size)
    MetricSpec(S.BATCH_SIZE, VALUE, ("value",), _as_is, "per_rank"),
)}


def validate(specs: Mapping[str, MetricSpec], names: Sequence[str], rules: Mapping[str, Combine]) -> None:
    """Raise :class:`GradscopeError` unless every name has a spec of a known layout and a known cross-rank rule."""
    for name in names:
        spec = specs.get(name)
        if spec is None:
            raise GradscopeError(f"metric {name!r} has no spec in gradscope.engine.spec.SPECS (raw layout, finish, "
                                 f"cross-rank combine)")
        if spec.layout not in LAYOUTS:
            raise GradscopeError(f"metric {name!r}: layout {spec.layout!r} is not one of {LAYOUTS}")
        if spec.combine not in rules:
            raise GradscopeError(f"metric {name!r} has no cross-rank rule: combine={spec.combine!r} is not one of "
                                 f"{sorted(rules)}")


#: quantities of a whole step rather than of a block (``scope.step(loss=...)``): buffered and combined like metrics,
#: kept apart from the frame's rows
STEP_SPECS: Dict[str, MetricSpec] = {S.LOSS: MetricSpec(S.LOSS, VALUE, ("value",), _as_is, "mean_over_ranks")}

validate(SPECS, S.ALL_METRICS, COMBINE)  # at import: a metric without a rule never reaches a run
validate(STEP_SPECS, tuple(STEP_SPECS), COMBINE)


def spec_of(name: str) -> MetricSpec:
    """The spec of ``name``; internal slots (``"_act_mean"``: a moment kept only so ranks can combine) use the spec
    of the name without the underscore."""
    key = name[1:] if name.startswith("_") else name
    found = SPECS.get(key)
    return found if found is not None else STEP_SPECS[key]


def raw_slots(group: Sequence[str]) -> Tuple[str, ...]:
    """The raw vector a ``moments`` hook produces for ``group``: the core, then each metric's extra slots in order."""
    slots: List[str] = list(CORE_SLOTS)
    for name in group:
        for slot in spec_of(name).raw:
            if slot not in slots:
                slots.append(slot)
    return tuple(slots)


@functools.lru_cache(maxsize=512)
def _moments_plan(group: Tuple[str, ...]) -> Tuple[Tuple[str, ...], Tuple[Finish, ...]]:
    """The raw slots and the finishing functions of a ``moments`` group, worked out once per group (every
    recorded step finishes the same few groups, one entry per block)."""
    return raw_slots(group), tuple(spec_of(name).finish for name in group)


def finish(group: Sequence[str], raw: Sequence[float], n: int, layout: str) -> List[float]:
    """The finished values of ``group`` from its raw values (``layout`` of the buffer entry)."""
    if layout in (MOMENTS, SQNORM) and n == 0:  # nothing was measured (an empty output): no row, never NaN
        return []
    if layout == MOMENTS:
        names, finishers = _moments_plan(tuple(group))
        slots = dict(zip(names, map(float, raw)))
        return [fn(slots, n) for fn in finishers]
    if layout == SQNORM and len(raw) == 1:  # a gradient norm from an eager hook (the most common entry)
        return [spec_of(group[0]).finish({"value": float(raw[0])}, n)]
    if layout == SQNORM and len(raw) == 2:  # [||g||^2, taps that ran] from a traced hook: no tap ran, no row
        return [] if float(raw[1]) == 0 else [_sqrt({"value": float(raw[0])}, n)]
    if layout in SHARDED_LAYOUTS:  # one process holds every shard: its norms are the global ones
        return combine_shards([list(raw)], layout, 1)
    if layout == RATIO:
        half = len(raw) // 2
        return ratios([float(v) for v in raw[:half]], [float(v) for v in raw[half:]])
    fn = spec_of(group[0]).finish
    return [fn({"value": float(v)}, n) for v in raw]


def combine_shards(raw: List[List[float]], layout: str, replicas: int) -> List[float]:
    """Global norms from each rank's norms over its shards (one list per rank): ``sqrt(sum_r |theta_r|^2 / replicas)``
    (``replicas`` ranks hold each shard under HSDP); ``shard_ratio`` combines numerators and denominators so, then
    divides."""
    norms = [math.sqrt(sum(float(v[j]) ** 2 for v in raw) / replicas) for j in range(len(raw[0]))]
    if layout == SHARD:
        return norms
    half = len(norms) // 2
    return ratios(norms[:half], norms[half:])


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> List[Optional[float]]:
    """``n / d`` per site; ``None`` (no row) where ``d`` is exactly 0 and ``n`` finite.

    Why: the relative update ``||delta theta|| / ||theta||`` of parameters that were all zero before the step
    (zero-initialised residual branches, timm's ``zero_init_last``) is undefined; a clamped denominator would turn it
    into ~1e35 and fire ``update_band``. A non-finite numerator over a zero norm stays NaN/Inf: that is a divergence.
    """
    out: List[Optional[float]] = []
    for n, d in zip(numerators, denominators):
        if d == 0:
            out.append(None if math.isfinite(n) else n)
        else:
            out.append(n / d)
    return out


def combine(group: Sequence[str], values: List[List[float]], n: List[float], world: int,
            layout: str) -> List[float]:
    """Global values of one entry from each rank's finished ``values`` (one list per rank) and element counts."""
    kept = [(v, k) for v, k in zip(values, n) if v]  # a rank whose traced tap did not run has no value
    if not kept:
        return []
    values, n = [v for v, _ in kept], [k for _, k in kept]
    width = len(values[0])
    names = list(group) if layout == MOMENTS else [group[0]] * width
    means = [v[0] for v in values] if layout == MOMENTS else None
    return [COMBINE[spec_of(name).combine]([v[j] for v in values], n, means, world) for j, name in enumerate(names)]
