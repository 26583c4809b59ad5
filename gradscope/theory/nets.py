"""Per-architecture predictions for the built-in MLPs and CIFAR nets, from the formulas in :mod:`gradscope.theory.formulas`.

Pure python. Each function returns a :class:`gradscope.theory.formulas.Prediction` (or None) whose profiles cover every
block of the net as built by :mod:`gradscope.models` (layouts documented there). Mean-field tools used here:

* **zero padding** (CIFAR nets without BN): a 3x3 convolution with padding 1 sees fewer taps at the border, so
  the per-pixel second moment ``m(p, q) = s u(p) u(q)`` is tracked through the exact separable linear map
  ``u <- A u`` (A sums the valid taps); ``A`` is symmetric for stride 1 and its adjoint carries gradients.
  Exact in expectation over the weights; on an 8x8 map a conv layer keeps only ~0.84 of a uniform input's
  second moment, ~0.92 once the profile has settled (Perron eigenvalue ((1 + 2cos(π/9))/3)²).
* **post-activation residual blocks** ``relu(x + F(x))`` (He et al. 2016): x >= 0 and F(x) is, over the
  weights, a zero-mean Gaussian given x, so the law of a typical element evolves as ``x <- relu(x + σ ξ)``;
  we propagate it on a grid (an atom at 0 plus a histogram), with σ² = 1 for a BN branch (a reflected
  random walk: linear growth, De & Smith 2020) or σ² = r E[x²] without BN (exponential growth, ~2.40 per block
  for r = 2, against 1 + r = 3 if the ReLU after the sum were absent). Option-A shortcuts at a stage boundary
  zero half the channels (an atom at 0 of weight 1/2); option B/C shortcuts replace x by a Gaussian.
  No backward theory: the ReLU mask after the sum correlates with the skip path, which mean-field does not
  close in a few lines; these nets get ``backward=None``.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

from gradscope.theory import formulas as T

_SQRT2 = math.sqrt(2.0)


# --- MLPs -------------------------------------------------------------------------------------------------------

def _back_from_factors(per_block_sq: list[float]) -> tuple[float, ...]:
    """grad_norm relative to the last block from squared factors (factor[k]: from block k to block k-1)."""
    n = len(per_block_sq)
    g = [1.0] * n
    for k in range(n - 1, 0, -1):
        g[k - 1] = g[k] * per_block_sq[k]
    return tuple(math.sqrt(x) for x in g)


def mlp_prediction(c: dict[str, Any], batch: Optional[float], start: Optional[float]) -> Optional[T.Prediction]:
    """Plain/residual MLP with or without BN (see :mod:`gradscope.models.mlp`); None where no theory applies."""
    n, w, act, init = int(c["num_blocks"]), int(c["width"]), c["activation"], c["init"]
    name = str(c.get("name") or c.get("model") or "mlp")
    stages = (0,) * n
    big_b = "large-batch limit (batch size unknown)" if batch is None else f"batch {int(batch)}"
    if not c["bn"] and not c["residual"]:
        if act == "tanh":
            if start is None:
                return None
            fwd, back_sq = T.tanh_profiles(n, start, T.weight_gain2(init, w, w, "tanh"))
            return T.Prediction(name, f"{T.GLOROT2010}; Poole et al. 2016", "mean field, width → ∞",
                                tuple(v / fwd[0] for v in fwd), tuple(math.sqrt(b) for b in back_sq),
                                stages=stages, notes=("tanh saturates: profile depends on the first block's size",))
        g2 = T.weight_gain2(init, w, w, act)
        f = g2 / 2 if act == "relu" else g2
        ref = T.HE2015 if init == "kaiming" else f"{T.GLOROT2010}; {T.HE2015}"
        return T.Prediction(name, ref, f"zero biases, {act}, {init}: exact in expectation",
                            tuple(f ** k for k in range(n)), tuple(math.sqrt(f) ** (n - 1 - k) for k in range(n)),
                            f, math.sqrt(f), stages,
                            (f"finite width {w}: the log-space rate sits ~{2.5 / w:.3f} below per layer",))
    if act != "relu":
        return None
    unknown_b = () if batch is not None else \
        ("batch size unknown (the frame has no batch_size row): predicted at the large-batch limit, which BN at a "
         "small batch departs from; record batch_size (a default metric) or pass batch_size=",)
    if c["bn"] and not c["residual"]:
        lam = T.bn_relu_rate(batch)
        return T.Prediction(name, T.YANG2019, f"BN-ReLU, {big_b}, gradient independence",
                            (1.0,) * n, tuple(math.sqrt(lam) ** (n - 1 - k) for k in range(n)), 1.0,
                            math.sqrt(lam), stages, unknown_b)
    if c["bn"]:  # x + relu(BN(W x)): De & Smith linear growth; the branch gain falls as 1/variance
        cb = T._batch_terms(batch)[1]
        a = T.bn_relu_variance(batch)
        v = T.linear_growth(2 * a, a, n)  # stem relu(BN) has variance a; every block adds a branch of variance a
        sq = [1.0] + [1.0 + cb / v[k - 1] for k in range(1, n)]
        return T.Prediction(name, T.DESMITH2020, f"branch variance {a:.3f} added per block, {big_b}",
                            tuple(x / v[0] for x in v), _back_from_factors(sq), None, None, stages,
                            ("linear growth: the per-block factor falls with depth, a geometric fit averages it",)
                            + unknown_b)
    g2 = T.weight_gain2(init, w, w, "relu")  # x + relu(W x) without BN: mean and variance recursions
    var, mean = 0.5 - 1 / (2 * T.PI), 1 / math.sqrt(2 * T.PI)  # stem output relu(N(0, 1))
    vs = []
    for _ in range(n):
        m = var + mean * mean
        var, mean = var + g2 / 2 * (1 - 1 / T.PI) * m, mean + math.sqrt(g2 * m / (2 * T.PI))
        vs.append(var)
    sq = T.residual_factor(1.0, g2 / 2)
    return T.Prediction(name, f"{T.YANG2017}; {T.HE2015}", "branch uncorrelated with the skip path",
                        tuple(x / vs[0] for x in vs), tuple(math.sqrt(sq) ** (n - 1 - k) for k in range(n)),
                        vs[-1] / vs[-2] if n > 1 else None, math.sqrt(sq), stages,
                        ("backward: the stream's common mean grows with depth, so each branch's ReLU mask follows "
                         "the sign of its weights' row sums and gradient independence fails; measured rates rise "
                         "above the prediction with depth (x1.44 at 8 blocks, x1.55 at 24, width 512)",))


# --- CIFAR nets: layout and zero padding ------------------------------------------------------------------------

#: The BN backward theory (Yang et al. 2019) assumes every pixel sees a full 3x3 neighbourhood. With zero padding,
#: border pixels get fewer taps; to first order BN's division by the pooled std cancels that, but not entirely: on
#: 16x16 images at 16 channels plain-56 with BN measures x1.36-1.41 per block against the predicted x1.47, and
#: x1.44-1.47 once its 3x3 convolutions pad circularly (tests/theory/test_padding.py). Not modelled here.
ZERO_PADDING_BN = ("zero padding is not in the BN theory: border pixels see fewer taps, and the measured rate "
                   "sits below the prediction (x1.39 against x1.47 per block at 16 channels on 16x16 images; x1.46 "
                   "with circular padding), more so on small maps; so this prediction can show a disagreement "
                   "beyond that effect but cannot confirm agreement (pass padding='circular' in the config for "
                   "nets that pad circularly)")

def _layers(c: dict[str, Any]) -> list[list[tuple[int, int, int, int]]]:
    """Per block, its two convs as (c_in, c_out, stride, input size)."""
    n, w, size = int(c["blocks_per_stage"]), int(c["width"]), int(c.get("image_size", 32))
    blocks, ch = [], w
    for s, cw in enumerate((w, 2 * w, 4 * w)):
        for i in range(n):
            stride = 2 if s > 0 and i == 0 else 1
            blocks.append([(ch, cw, stride, size), (cw, cw, 1, (size - 1) // stride + 1)])
            size, ch = (size - 1) // stride + 1, cw
    return blocks


def conv1d(u: list[float], stride: int = 1) -> list[float]:
    """Sum of the valid taps of a size-3, padding-1 convolution along one dimension."""
    n = len(u)
    return [sum(u[stride * p + t] for t in (-1, 0, 1) if 0 <= stride * p + t < n) for p in range((n - 1) // stride + 1)]


def conv1d_t(v: list[float], stride: int, n_in: int) -> list[float]:
    """Adjoint of :func:`conv1d`: where each output's taps came from."""
    out = [0.0] * n_in
    for p, x in enumerate(v):
        for t in (-1, 0, 1):
            if 0 <= stride * p + t < n_in:
                out[stride * p + t] += x
    return out


def pad_fraction(size_out: int, stride: int = 1) -> float:
    """Mean fraction of valid taps of a 3x3, padding-1 conv on a uniform map (2-D, so squared)."""
    ones = conv1d([1.0] * (size_out * stride if stride > 1 else size_out), stride)
    return (sum(ones) / (3.0 * len(ones))) ** 2


def _plain_nobn(c: dict[str, Any]) -> tuple[list[float], list[float]]:
    """act_var and squared grad norm per block of a plain CIFAR net without BN (mean field with padding)."""
    init, size = c["init"], int(c.get("image_size", 32))
    u, s = conv1d([1.0] * size), 1.0  # stem output profile (uniform data, padded 3x3 conv)
    fwd, blocks = [], _layers(c)
    for blk in blocks:
        for c_in, c_out, st, _ in blk:
            u, s = conv1d(u, st), s * T.weight_gain2(init, 9 * c_in, 9 * c_out, receptive=9) / 9 / 2
        mu, mr = sum(u) / len(u), sum(math.sqrt(x) for x in u) / len(u)
        fwd.append(s * (mu * mu - mr ** 4 / T.PI))
    w, t = [1.0] * len(u), 1.0  # gradient at the last block's output: uniform (global average pooling)
    back = [0.0] * len(blocks)
    for k in range(len(blocks) - 1, -1, -1):
        back[k] = blocks[k][-1][1] * t * sum(w) ** 2
        for c_in, c_out, st, n_in in reversed(blocks[k]):
            w, t = conv1d_t(w, st, n_in), t * 0.5 * T.weight_gain2(init, 9 * c_in, 9 * c_out, receptive=9) * c_out / (9 * c_in)
    return fwd, back


# --- post-activation residual blocks: the law of one element on a grid ------------------------------------------

def _phi(z: float) -> float:
    return 0.5 * math.erfc(-z / _SQRT2)


def relu_noise(p0: float, xs: list[float], ws: list[float], var: float, bins: int = 120):
    """Law of ``relu(x + N(0, var))`` for x = an atom p0 at 0 plus points xs with weights ws (all >= 0)."""
    if var <= 0:
        return p0, xs, ws
    sd = math.sqrt(var)
    src = [(x, w) for x, w in [(0.0, p0)] + list(zip(xs, ws)) if w > 0]
    m1 = m2 = 0.0  # exact moments of the new law, to size the grid
    for x, wt in src:
        cdf, pdf = _phi(x / sd), math.exp(-0.5 * (x / sd) ** 2) / math.sqrt(2 * math.pi)
        m1 += wt * (x * cdf + sd * pdf)
        m2 += wt * ((x * x + var) * cdf + x * sd * pdf)
    top = m1 + 10.0 * math.sqrt(max(m2 - m1 * m1, 0.0)) + sd
    h = top / bins
    edges = [j * h for j in range(bins + 1)]
    atom, hist = 0.0, [0.0] * bins
    for x, wt in src:
        cdf = [_phi((e - x) / sd) for e in edges]
        atom += wt * cdf[0]
        for j in range(bins):
            hist[j] += wt * (cdf[j + 1] - cdf[j])
        hist[-1] += wt * (1.0 - cdf[-1])
    return atom, [(j + 0.5) * h for j in range(bins)], hist


def moments(p0: float, xs: list[float], ws: list[float]) -> tuple[float, float]:
    """(mean, second moment) of an atom-plus-histogram law (histogram bins of equal width)."""
    h2 = (xs[1] - xs[0]) ** 2 / 12 if len(xs) > 1 else 0.0
    return sum(x * w for x, w in zip(xs, ws)), sum((x * x + h2) * w for x, w in zip(xs, ws))


def _post_act_forward(c: dict[str, Any]) -> tuple[list[float], float]:
    key = tuple(sorted((k, c.get(k)) for k in ("bn", "zero_init_last", "shortcut", "init", "blocks_per_stage",
                                                 "width", "image_size")))
    return _post_act_cached(key)


@functools.lru_cache(maxsize=64)
def _post_act_cached(key: tuple) -> tuple[list[float], float]:
    """act_var per block of a post-activation CIFAR ResNet (He et al. 2016 block), BN or not, and the fraction
    of positive elements in the last block's output (cached: ~0.1 s per stage of 9 blocks)."""
    c = dict(key)
    bn, zero, short, init = c["bn"], c["zero_init_last"], c.get("shortcut") or "A", c["init"]
    law = relu_noise(1.0, [], [], 1.0)  # stem: relu of a zero-mean Gaussian (any scale: the net is homogeneous)
    out = []
    for k, blk in enumerate(_layers(c)):
        (c_in, c_out, st, _), (_, _, _, size2) = blk
        mean, m2 = moments(*law)
        if bn:
            var_f = 0.0 if zero else 1.0
        else:
            r = T.weight_gain2(init, 9 * c_in, 9 * c_out, receptive=9) * T.weight_gain2(init, 9 * c_out, 9 * c_out, receptive=9) / 2
            var_f = 0.0 if zero else r * pad_fraction(size2, st) * pad_fraction(size2) * m2
        proj = short == "C" or (short == "B" and st == 2)
        if proj:  # 1x1 conv (+BN) shortcut: a fresh Gaussian of variance 1 (BN) or gain2 * E[x²]
            law = relu_noise(1.0, [], [], (1.0 if bn else T.weight_gain2(init, c_in, c_out) * m2) + var_f)
        else:
            if st == 2:  # option A: identity on the first half of the channels, zeros appended
                law = (0.5 + 0.5 * law[0], law[1], [0.5 * w for w in law[2]])
            law = relu_noise(*law, var_f)
        mean, m2 = moments(*law)
        out.append(m2 - mean * mean)
    return tuple(out), 1.0 - law[0]


def _preact_forward(c: dict[str, Any], start: Optional[float]) -> Optional[list[float]]:
    """act_var per block of a pre-activation ResNet: x + F(x), variance added per block (BN) or multiplied."""
    if start is None:
        return None
    v, out = float(start), []
    for k, ((c_in, c_out, st, _), (_, _, _, size2)) in enumerate(_layers(c)):
        g1, g2 = T.weight_gain2(c["init"], 9 * c_in, 9 * c_out, receptive=9), T.weight_gain2(c["init"], 9 * c_out, 9 * c_out, receptive=9)
        p1, p2 = pad_fraction(size2, st), pad_fraction(size2)
        branch = 0.0 if c["zero_init_last"] else (g2 * 0.5 * p2 if c["bn"] else g1 * g2 * p1 * p2 / 4 * v)
        if k > 0:
            short = c.get("shortcut") or "A"
            if short == "C" or (short == "B" and st == 2):
                v = 1.0 if c["bn"] else T.weight_gain2(c["init"], c_in, c_out) * v
            elif st == 2:
                v = v / 2
            v += branch
        out.append(v)
    return out


def cifar_prediction(c: dict[str, Any], batch: Optional[float], start: Optional[float] = None
                     ) -> Optional[T.Prediction]:
    """CIFAR plain/residual nets of :mod:`gradscope.models.cifar` (ReLU); None where no theory applies."""
    if c["activation"] != "relu":
        return None
    name = str(c.get("name") or c.get("model"))
    n = int(c["blocks_per_stage"])
    stages = tuple(s for s in range(3) for _ in range(n))
    notes = []
    if not c["residual"]:
        if c["bn"]:
            blocks = _layers(c)
            lam = [math.prod(T.bn_relu_rate(None if batch is None else batch * ((sz - 1) // st + 1) ** 2)
                             for _, _, st, sz in blk) for blk in blocks]
            notes.append("BN pools batch x height x width values per channel; "
                         + ("large-batch limit" if batch is None else f"batch {int(batch)} x map size") + " used")
            limit = "" if c.get("padding") == "circular" else ZERO_PADDING_BN
            return T.Prediction(name, T.YANG2019, "BN-ReLU conv layers, gradient independence", (1.0,) * len(blocks),
                                _back_from_factors(lam),
                                1.0, math.sqrt(lam[-1]), stages, tuple(notes), backward_limit=limit)
        fwd, back = _plain_nobn(c)
        notes.append("zero padding and the widening convs are modelled (exact in expectation)")
        notes.append(f"narrow layers ({c['width']} channels): the theory gives the mean; a log-space fit sees the "
                     "typical rate, lower by half the per-block variance of the log factor (Hanin & Rolnick 2018)")
        return T.Prediction(name, T.HE2015 if c["init"] == "kaiming" else f"{T.GLOROT2010}; {T.HE2015}",
                            "ReLU convs, zero biases, mean field with zero padding", tuple(x / fwd[0] for x in fwd),
                            tuple(math.sqrt(b / back[-1]) for b in back),
                            T.relu_layer_factor(c["init"], 9 * c["width"], 9 * c["width"]) ** 2, None, stages,
                            tuple(notes))
    ref = f"{T.DESMITH2020}; {T.FIXUP}" if c["zero_init_last"] else (T.DESMITH2020 if c["bn"] else T.YANG2017)
    back, short = None, c.get("shortcut") or "A"
    why = "no backward theory for residual CIFAR nets here: the ReLU masks correlate with the skip path"
    if c["preact"]:
        fwd = _preact_forward(c, start)
        if fwd is None:
            return None
        notes.append("pre-activation: the first block is anchored at its measured act_var")
    else:
        fwd, positive = _post_act_forward(c)
        if not c["bn"]:
            notes.append("zero padding treated as uniform over the map in the branch")
        if c["zero_init_last"] and short == "A":
            # F = 0: every block is relu(x) = x, so the gradient keeps its norm except at the last block, where
            # the head's gradient first meets the ReLU mask and keeps the positive elements only.
            nb = len(fwd)
            back = tuple([math.sqrt(positive)] * (nb - 1) + [1.0])
            why = ""
    if short == "A":
        notes.append("option-A shortcuts zero half the channels at each stage boundary (modelled)")
    return T.Prediction(name, ref, "mean field; branch uncorrelated with the skip path", tuple(x / fwd[0] for x in fwd),
                        back, None, 1.0 if back else None, stages, tuple(notes), why)
