"""Signal-propagation formulas: per-layer gains, BatchNorm's gradient explosion, residual growth laws, and the
:class:`Prediction` they produce. Pure python (``math`` only); imports nothing of gradscope.

Signal-propagation theory for the built-in nets: predicted per-block factors, beside the measured ones.

Pure python (``math`` only). Every prediction is a mean-field statement about a freshly initialised net: wide
layers, weights independent of each other and of the data, and, backward, the usual *gradient independence*
assumption (the weights seen by the backward pass are treated as fresh copies). Quantities, matching the frame:

* forward: ``act_var``, the variance of all elements of a block's output; a factor is act_var(k+1) / act_var(k);
* backward: ``grad_norm``, the L2 norm (NOT squared) of dLoss/d(block output); a factor is
  grad_norm(k) / grad_norm(k+1), i.e. growth *toward the input*. Formulas for squared norms are square-rooted.

Per layer (one Linear/conv (+BN) + activation), and per block = per layer for an MLP, per layer squared for a
CIFAR block (two conv layers). ``gradscope.theory.predict(config)`` turns a model's ``gradscope_config`` into
a :class:`Prediction` (profiles over its blocks) or None where no theory applies; the exact derivations, their
assumptions and limits are in the docstrings below and in :mod:`gradscope.theory.nets`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

PI = math.pi
#: Large-batch limit of the BN-ReLU gradient explosion rate of the squared norm, per layer (Yang et al. 2019).
BN_RELU_LIMIT = PI / (PI - 1.0)
#: Squared gains of the activations (torch.nn.init.calculate_gain squared), exact as fractions.
GAIN2 = {"relu": 2.0, "linear": 1.0, "tanh": 25.0 / 9.0}

HE2015 = "He et al. 2015 (Delving Deep into Rectifiers, §2.2)"
GLOROT2010 = "Glorot & Bengio 2010"
YANG2019 = "Yang et al. 2019 (A Mean Field Theory of Batch Normalization)"
DESMITH2020 = "De & Smith 2020 (Batch Normalization Biases Residual Blocks Towards the Identity)"
FIXUP = "Zhang et al. 2019 (Fixup); De & Smith 2020 (SkipInit)"
YANG2017 = "Yang & Schoenholz 2017 (Mean Field Residual Networks)"


# --- plain nets without normalisation ---------------------------------------------------------------------------

def weight_gain2(init: str, fan_in: int, fan_out: int, activation: str = "relu", *, receptive: int = 1) -> float:
    """``fan_in * Var(w)``: the factor a layer applies to the second moment of its input, before the activation.

    kaiming (fan_in mode, gain g of the activation): g²; xavier (Glorot & Bengio 2010): 2 fan_in/(fan_in+fan_out);
    orthogonal (Saxe et al. 2014, gain g): the weight flattened to ``(rows, fan_in)`` with ``rows = out channels =
    fan_out / receptive`` (``receptive``: kernel elements, 9 for a 3x3 conv) is semi-orthogonal, so each row has
    squared norm ``g² min(1, fan_in/rows)``. Using ``fan_out`` (= rows x 9) in place of rows was off by 2x at the
    widening convolutions (16 -> 32 channels: fan_in 144, 32 rows: g², not g²/2).
    """
    g2 = GAIN2[activation]
    if init == "kaiming":
        return g2
    if init == "xavier":
        return 2.0 * fan_in / (fan_in + fan_out)
    if init == "orthogonal":
        return g2 * min(1.0, fan_in / (fan_out / receptive))
    raise ValueError(f"init={init!r} has no theory here; use 'kaiming', 'xavier' or 'orthogonal'")


def relu_layer_factor(init: str, fan_in: int, fan_out: int) -> float:
    """Per ReLU layer, factor of the forward second moment per element AND of the backward squared total norm.

    Forward, He et al. 2015 eq. (7): ``E[relu(z)²] = E[z²]/2`` for any z symmetric about 0, so
    ``m_out = fan_in Var(w) m_in / 2``: 1 for Kaiming, 1/2 for Xavier with fan_in = fan_out (the halving He et al.
    contrast). Backward, ``E||W^T (g ⊙ relu')||² = fan_in Var(w) ||g||² / 2`` (the ReLU passes half the
    coordinates): the same number. Exact in expectation at any width; the *geometric* mean factor a fit in log
    space sees is lower by about exp(-5/(2 n)) per layer at width n (Hanin & Rolnick 2018), a finite-width bias
    the agreement tolerance absorbs. For the variance (not the second moment) the factor is the same because a
    zero-mean Gaussian pre-activation gives var = (1 - 1/π) x second moment at every layer.
    """
    return weight_gain2(init, fan_in, fan_out, "relu") / 2.0


def gauss_expect(f, var: float, points: int = 401) -> float:
    """``E[f(sqrt(var) Z)]`` for a standard normal Z, by Simpson's rule on [-9, 9] (error < 1e-9 for smooth f)."""
    if var <= 0:
        return f(0.0)
    h = 18.0 / (points - 1)
    s = 0.0
    for i in range(points):
        z = -9.0 + i * h
        w = 1 if i in (0, points - 1) else (4 if i % 2 else 2)
        s += w * f(math.sqrt(var) * z) * math.exp(-0.5 * z * z)
    return s * h / 3.0 / math.sqrt(2 * PI)


def tanh_profiles(n_blocks: int, first_var: float, gain2: float) -> tuple[list[float], list[float]]:
    """Mean-field forward variance and backward squared-norm profiles of a plain tanh MLP (Poole et al. 2016).

    ``first_var``: act_var of the first block's output (E[tanh(z)²], the signal's absolute size matters for a
    saturating activation). Layer map: ``q_{l+1} = gain2 · E[tanh(sqrt(q_l) Z)²]``; backward per layer
    ``χ_l = gain2 · E[tanh'(sqrt(q_l) Z)²]`` (squared norm, toward the input). With Xavier (gain2 = 1) the
    variance decays slowly toward 0 (Glorot & Bengio 2010); with Kaiming's 5/3 gain it settles at a fixed point.
    Returns act_var per block and squared grad norm per block relative to the last block.
    """
    m = lambda q: gauss_expect(lambda z: math.tanh(z) ** 2, q)  # noqa: E731
    lo, hi = 0.0, 1e4  # invert m(q) = first_var for the first block's pre-activation variance (m is increasing)
    target = min(max(first_var, 1e-12), 1 - 1e-9)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if m(mid) < target else (lo, mid)
    qs = [0.5 * (lo + hi)]
    for _ in range(n_blocks - 1):
        qs.append(gain2 * m(qs[-1]))
    fwd = [m(q) for q in qs]
    chi = [gain2 * gauss_expect(lambda z: (1.0 - math.tanh(z) ** 2) ** 2, q) for q in qs]
    back = [1.0] * n_blocks
    for k in range(n_blocks - 2, -1, -1):
        back[k] = back[k + 1] * chi[k + 1]
    return fwd, back


# --- batch normalisation ----------------------------------------------------------------------------------------

def _batch_terms(batch: Optional[float]) -> tuple[float, float]:
    """``(a, c)`` for BN over ``batch`` samples followed by ReLU (None or inf: the large-batch limit).

    ``a = Var(relu(ŷ))`` within a batch, ``c = E[B/||Gy||²] · E||P(δ ⊙ relu'(ŷ))||²`` per unit and per
    unit of input variance, from the exact law of a batch-normalised vector (uniform on a sphere in the plane
    ``Σ ŷ = 0``), where pairs of coordinates have correlation ρ = -1/(B-1):
    ``E[relu ŷ1 · relu ŷ2] = κ(ρ) = (sqrt(1-ρ²) + ρ(π - arccos ρ))/(2π)`` (arc-cosine kernel), and
    ``P(ŷ1 > 0, ŷ2 > 0) = 1/4 + asin(ρ)/(2π)``.
    """
    if batch is None or math.isinf(batch):
        return 0.5 - 1.0 / (2 * PI), 0.5
    b = float(batch)
    if b < 4:
        raise ValueError(f"batch={batch}: a BN-ReLU gradient has infinite expected norm below 4 samples")
    rho = -1.0 / (b - 1.0)
    kappa = (math.sqrt(1 - rho * rho) + rho * (PI - math.acos(rho))) / (2 * PI)
    p_pp = 0.25 + math.asin(rho) / (2 * PI)
    e_k_bk = b * b / 2 - b / 2 - b * (b - 1) * p_pp       # E[k (B - k)], k = number of positive ŷ
    e_abs2 = 2 * b + 4 * b * (b - 1) * kappa                # E[(Σ|ŷ|)²]
    t = (b - 2) / 2 - e_k_bk / b ** 2 + e_abs2 / (4 * b * b)  # E||P (δ ⊙ r)||² / u for δ ~ N(0, u G)
    return 0.5 - kappa, b * t / ((b - 3) * (b - 1))


def bn_relu_rate(batch: Optional[float] = None) -> float:
    """Growth of the squared gradient norm per BN-ReLU layer toward the input, batch ``batch`` (None: limit).

    Large batch: π/(π-1) ≈ 1.467 (Yang et al. 2019): BN divides the backward signal by the batch std of the
    pre-activation, which for a ReLU input is the std of relu(ŷ), sqrt((π-1)/(2π)), while the weights and the
    ReLU mask keep the squared norm otherwise (2 · 1/2). Finite batch: Yang et al. 2019, Theorem 8 (the
    gradient explosion rate at batch size B under their mean-field assumptions: infinite width, gradient
    independence, permutation-symmetric batch kernel), computed here in closed form: with ŷ the
    normalised pre-activation and P the projection BN's backward applies (orthogonal to 1 and ŷ),
    ``λ(B) = c(B)/a(B)`` from :func:`_batch_terms`; λ(8) ≈ 1.79, λ(32) ≈ 1.52, λ(128) ≈ 1.48 → π/(π-1).
    Checked against Monte Carlo in the tests (within 2% for B ≥ 8 at width 512). Limits: B ≥ 4; widths below
    ~100 add O(1/width) corrections; for convolutions BN pools batch x height x width values, correlated in
    space, so the effective batch lies between B and B·H·W (both give ≈ the limit for B ≥ 32).
    """
    a, c = _batch_terms(batch)
    return c / a


def bn_relu_variance(batch: Optional[float] = None) -> float:
    """Variance of all elements of relu(BN(z)): 1/2 - E[relu(ŷ)]², (π-1)/(2π) ≈ 0.341 for a large batch.

    Finite batch, exactly: E|ŷ_1| = sqrt(B-1) Γ((B-1)/2) / (sqrt(π) Γ(B/2)) for ŷ uniform on its sphere.
    """
    if batch is None or math.isinf(batch):
        return 0.5 - 1.0 / (2 * PI)
    b = float(batch)
    e_abs = math.sqrt(b - 1) * math.exp(math.lgamma((b - 1) / 2) - math.lgamma(b / 2)) / math.sqrt(PI)
    return 0.5 - (e_abs / 2) ** 2


# --- residual nets ----------------------------------------------------------------------------------------------

def residual_factor(alpha: float = 1.0, branch_gain: float = 1.0) -> float:
    """Per-block factor of the second moment of ``x + alpha F(x)`` without normalisation: 1 + alpha² g.

    ``g = E[F(x)²]/E[x²]``, the branch's own gain (1 for a Kaiming branch), assuming F(x) uncorrelated with x
    (true in expectation over zero-mean weights). Exponential growth, 2 per block for alpha = 1; alpha = 0
    (Fixup / SkipInit, a zero-initialised last layer) gives 1: the block starts as the identity.
    """
    return 1.0 + alpha * alpha * branch_gain


def linear_growth(first: float, increment: float, n_blocks: int) -> list[float]:
    """Variance of block outputs when each block adds a normalised branch: ``first + k · increment``.

    De & Smith 2020: with a normalised branch of variance ``increment`` uncorrelated with the skip path, the
    variance grows linearly, not exponentially, so deep blocks are dominated by their skip path.
    """
    return [first + k * increment for k in range(n_blocks)]


# --- predictions ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    """A model's predicted profiles and headline per-block factors.

    ``forward``: predicted act_var per block relative to block 0 (None: no forward theory); ``backward``:
    predicted grad_norm (not squared) per block relative to the last block (None: no backward theory).
    ``forward_rate``/``backward_rate``: the headline per-block factor (within a stage, once settled), None when
    the growth is not geometric (linear growth). ``stages``: stage index per block, for within-stage fits.
    ``notes``: where the measurement is expected to part from the prediction, in words; ``why_none``: why a
    profile is None; ``backward_limit``: an effect the backward profile leaves out (see the field).
    """

    model: str
    reference: str
    assumptions: str
    forward: Optional[tuple[float, ...]] = None
    backward: Optional[tuple[float, ...]] = None
    forward_rate: Optional[float] = None
    backward_rate: Optional[float] = None
    stages: tuple[int, ...] = ()
    notes: tuple[str, ...] = field(default=())
    why_none: str = ""
    #: Where the backward profile leaves out an effect of known sign (e.g. zero padding under BN): shown beside
    #: every comparison, and such a prediction can catch a disagreement but never confirm agreement.
    backward_limit: str = ""


def fit_factor(values: Sequence[float], stages: Sequence[int] = (), *, backward: bool = False) -> float:
    """Per-block factor fitted in log space with one intercept per stage (common slope); see analysis.

    ``stages`` empty: one stage. Forward: exp(slope); backward: exp(-slope) (growth toward the input).
    """
    pts = [(k, math.log(v), stages[k] if stages else 0) for k, v in enumerate(values)
           if v is not None and v > 0 and math.isfinite(v)]
    groups: dict[int, list[tuple[int, float]]] = {}
    for k, y, s in pts:
        groups.setdefault(s, []).append((k, y))
    sxy = sxx = 0.0
    for g in groups.values():
        mx = sum(k for k, _ in g) / len(g)
        my = sum(y for _, y in g) / len(g)
        sxy += sum((k - mx) * (y - my) for k, y in g)
        sxx += sum((k - mx) ** 2 for k, _ in g)
    if sxx == 0:
        return math.nan
    slope = sxy / sxx
    return math.exp(-slope if backward else slope)
