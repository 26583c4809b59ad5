"""Verdicts on synthetic frames with known per-block factors, and the edge cases (one block, zeros, NaN, one step)."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from gradscope import analysis as A
from gradscope import schema as S
from gradscope.errors import DataError


def frame_with(fwd: float, bwd: float, *, n_blocks: int = 10, steps=(0, 1, 2), run: str | None = None,
               scales=None, names=None) -> pd.DataFrame:
    """act_var = c_s * fwd**k and grad_norm = c_s * bwd**(n-1-k) at block k (k = 0 at the input)."""
    rows = []
    names = names or [f"layer.{k}" for k in range(n_blocks)]
    for i, step in enumerate(steps):
        c = (scales or [1.0, 3.0, 0.25, 7.0])[i % 4]
        for k in range(n_blocks):
            for metric, v in ((S.ACT_VAR, c * fwd ** k), (S.GRAD_NORM, c * bwd ** (n_blocks - 1 - k))):
                rows.append({S.STEP: step, S.BLOCK: names[k], S.DEPTH: k, S.KIND: "Block", S.METRIC: metric,
                             S.VALUE: v, S.CALL: 0})
    f = pd.DataFrame(rows).astype({S.STEP: "int64", S.DEPTH: "int64", S.CALL: "int64", S.VALUE: "float64"})
    if run is not None:
        f[S.RUN] = run
    return f


def row(v: pd.DataFrame, signal: str, run: str | None = None) -> pd.Series:
    sel = v[v[A.SIGNAL] == signal]
    if run is not None:
        sel = sel[sel[S.RUN] == run]
    assert len(sel) == 1
    return sel.iloc[0]


@pytest.mark.parametrize("fwd,bwd,fclass,bclass", [
    (0.5, 0.5, "vanishing", "vanishing"),
    (1.0, 1.0, "healthy", "healthy"),
    (2.0, 2.0, "exploding", "exploding"),
    (0.5, 2.0, "vanishing", "exploding"),
])
def test_known_factors_give_exact_rates_and_classes(fwd, bwd, fclass, bclass):
    n = 10
    v = A.verdicts(frame_with(fwd, bwd, n_blocks=n))
    f, b = row(v, A.FORWARD), row(v, A.BACKWARD)
    assert f[A.VERDICT] == fclass and b[A.VERDICT] == bclass
    assert abs(f[A.FACTOR] - fwd) < 1e-6 and abs(b[A.FACTOR] - bwd) < 1e-6
    assert f[A.END_TO_END] == pytest.approx(fwd ** (n - 1), rel=1e-9)
    assert b[A.END_TO_END] == pytest.approx(bwd ** (n - 1), rel=1e-9)
    assert f[A.R2] == pytest.approx(1.0) and b[A.R2] == pytest.approx(1.0)
    assert f[A.N_BLOCKS] == n and f[A.N_STEPS] == 3 and pd.isna(f[S.STEP])
    if fwd != 1.0:  # the extremes sit at the two ends
        lo, hi = ("layer.9", "layer.0") if fwd < 1 else ("layer.0", "layer.9")
        assert (f[A.MIN_BLOCK], f[A.MAX_BLOCK]) == (lo, hi)
        lo, hi = ("layer.0", "layer.9") if bwd < 1 else ("layer.9", "layer.0")
        assert (b[A.MIN_BLOCK], b[A.MAX_BLOCK]) == (lo, hi)


def test_geometric_mean_over_steps_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    f = frame_with(1.3, 0.8, n_blocks=6, steps=(0, 5, 10, 15))
    f[S.VALUE] = f[S.VALUE] * np.exp(rng.normal(0, 0.3, len(f)))
    p = A.profile(f, S.GRAD_NORM)
    g = f[f[S.METRIC] == S.GRAD_NORM]
    for k in range(6):
        vals = g.loc[g[S.DEPTH] == k, S.VALUE].to_numpy()
        assert p.loc[p[S.DEPTH] == k, S.VALUE].item() == pytest.approx(float(np.prod(vals) ** (1 / len(vals))))
    # and the rate is the slope that numpy fits through the log of those means
    slope = np.polyfit(np.arange(6), np.log(p[S.VALUE].to_numpy()), 1)[0]
    assert row(A.verdicts(f), A.BACKWARD)[A.FACTOR] == pytest.approx(math.exp(-slope), rel=1e-10)


def test_fit_matches_numpy_polyfit_and_r2():
    rng = np.random.default_rng(1)
    x = np.arange(20.0)
    y = np.exp(0.1 * x + rng.normal(0, 0.2, 20))
    fit = A.fit_log_slope(x, y)
    slope, icpt = np.polyfit(x, np.log(y), 1)
    assert fit.slope == pytest.approx(slope, rel=1e-10)
    assert fit.r2 == pytest.approx(np.corrcoef(x, np.log(y))[0, 1] ** 2, rel=1e-10)
    assert 0 < fit.r2 < 1


def test_thresholds_are_parameters():
    # x1.08 per block in variance = x1.039 in amplitude: below the default 10**(1/54) = x1.044
    f = frame_with(1.08, 1.0, n_blocks=10)
    assert row(A.verdicts(f), A.FORWARD)[A.VERDICT] == "healthy"
    assert row(A.verdicts(f, explode=5), A.FORWARD)[A.VERDICT] == "exploding"  # 5**(1/54) = x1.030
    g = frame_with(1 / 1.08, 1.0, n_blocks=10)
    assert row(A.verdicts(g), A.FORWARD)[A.VERDICT] == "healthy"
    assert row(A.verdicts(g, vanish=0.3), A.FORWARD)[A.VERDICT] == "vanishing"  # 0.3**(1/54) = x0.978
    with pytest.raises(DataError, match="vanish"):
        A.verdicts(f, vanish=2.0)


@pytest.mark.parametrize("rate,cls", [(1.43, "exploding"), (0.77, "vanishing"), (1.03, "healthy"), (0.97, "healthy")])
def test_the_same_rate_gives_the_same_class_at_20_and_56_layers(rate, cls):
    """Issue 14 §4: x1.43 was healthy over 9 blocks and exploding over 27; by rate it is one class at both."""
    for n in (9, 27):
        v = A.verdicts(frame_with(rate, rate, n_blocks=n))
        assert row(v, A.FORWARD)[A.VERDICT] == cls and row(v, A.BACKWARD)[A.VERDICT] == cls
        assert row(v, A.FORWARD)[A.END_TO_END] == pytest.approx(rate ** (n - 1), rel=1e-9)


def test_end_to_end_comes_from_the_fit_not_from_a_moving_end_block():
    f = frame_with(1.0, 1.0, n_blocks=30, steps=(0,))
    f.loc[(f[S.METRIC] == S.ACT_VAR) & (f[S.DEPTH] == 0), S.VALUE] = 0.02  # the first block alone moved
    r = row(A.verdicts(f), A.FORWARD)
    assert r[A.NEAR_VALUE] == pytest.approx(0.02) and r[A.FAR_VALUE] == pytest.approx(1.0)  # two points: 50x
    assert r[A.VERDICT] == "healthy" and 1.0 < r[A.FACTOR] < A.rate_thresholds(signal=A.FORWARD)[1]
    assert r[A.END_TO_END] == pytest.approx(r[A.FACTOR] ** 29, rel=1e-9) and r[A.END_TO_END] < 10


def test_several_runs_keep_their_order_and_config():
    f = pd.concat([frame_with(2.0, 1.0, run="plain20"), frame_with(1.0, 0.5, run="resnet20")])
    f[S.BN] = f[S.RUN] == "plain20"
    v = A.verdicts(f)
    assert list(v[S.RUN]) == ["plain20", "plain20", "resnet20", "resnet20"]
    assert list(v[A.SIGNAL]) == [A.FORWARD, A.BACKWARD] * 2
    assert list(v[A.VERDICT]) == ["exploding", "healthy", "healthy", "vanishing"]
    assert list(v[S.BN]) == [True, True, False, False]


def test_step_all_int_first_last():
    f = frame_with(2.0, 0.5, steps=(0, 10, 20))
    v = A.verdicts(f, step="all")
    assert list(v[S.STEP]) == [0, 0, 10, 10, 20, 20]
    assert (v[A.FACTOR].where(v[A.SIGNAL] == A.FORWARD, 2.0) - 2.0).abs().max() < 1e-9
    one = A.verdicts(f, step=10)
    assert list(one[S.STEP]) == [10, 10] and list(one[A.N_STEPS]) == [1, 1]
    assert list(A.verdicts(f, step="last")[S.STEP]) == [20, 20]
    with pytest.raises(DataError, match="step=7"):
        A.verdicts(f, step=7)
    with pytest.raises(DataError, match="not understood"):
        A.verdicts(f, step="middle")


def test_single_step():
    v = A.verdicts(frame_with(0.5, 2.0, steps=(42,)))
    assert row(v, A.FORWARD)[A.FACTOR] == pytest.approx(0.5, abs=1e-6)
    assert row(v, A.BACKWARD)[A.VERDICT] == "exploding" and row(v, A.BACKWARD)[A.N_STEPS] == 1


def test_one_block_is_unknown_not_healthy():
    v = A.verdicts(frame_with(2.0, 2.0, n_blocks=1))
    for sig in (A.FORWARD, A.BACKWARD):
        r = row(v, sig)
        assert r[A.VERDICT] == "unknown" and math.isnan(r[A.FACTOR]) and r[A.N_BLOCKS] == 1
        assert "cannot be judged" in A.sentence(r)


def test_zeros():
    f = frame_with(1.0, 1.0, n_blocks=5)
    # forward signal dies at the last block; backward gradient is zero at the output end
    f.loc[(f[S.METRIC] == S.ACT_VAR) & (f[S.DEPTH] == 4), S.VALUE] = 0.0
    f.loc[(f[S.METRIC] == S.GRAD_NORM) & (f[S.DEPTH] == 4), S.VALUE] = 0.0
    v = A.verdicts(f)
    fw, bw = row(v, A.FORWARD), row(v, A.BACKWARD)
    assert fw[A.VERDICT] == "vanishing" and fw[A.END_TO_END] == 0.0 and fw[A.MIN_BLOCK] == "layer.4"
    assert fw[A.FACTOR] == pytest.approx(1.0)  # the fit sees the four positive blocks only ...
    assert "zero at layer.4" in A.sentence(fw)  # ... and the sentence says where it died
    # zero at the near end (the output end, backward) and positive further on: not an infinite growth but a block
    # the signal does not reach (before: "exploding", end to end inf); the sentence names the zero block
    assert bw[A.VERDICT] == "vanishing" and "zero at layer.4" in A.sentence(bw)
    assert bw[A.END_TO_END] == pytest.approx(1.0)  # read from the fit over the positive blocks
    dead = frame_with(1.0, 1.0, n_blocks=5)
    dead[S.VALUE] = 0.0
    r = row(A.verdicts(dead), A.FORWARD)
    assert r[A.VERDICT] == "vanishing" and "zero at every" in A.sentence(r)


def test_a_zero_inside_the_profile_is_never_healthy_and_the_sentence_says_where():
    """act_var or grad_norm exactly zero at a middle block was dropped from the fit over the positive blocks, and
    the verdict read "stays healthy ... over 6 blocks" without a word about it. The signal is gone at that block:
    vanishing, with the zero named first; and a zero end is not reported as a number "from the fit"."""
    for metric, signal in ((S.ACT_VAR, A.FORWARD), (S.GRAD_NORM, A.BACKWARD)):
        f = frame_with(1.0, 1.0, n_blocks=6)
        f.loc[(f[S.METRIC] == metric) & (f[S.DEPTH] == 2), S.VALUE] = 0.0
        r = row(A.verdicts(f), signal)
        assert r[A.VERDICT] == "vanishing" and r[A.MIN_BLOCK] == "layer.2", (metric, r[A.VERDICT])
        text = A.sentence(r)
        assert ": zero at layer.2; the fit over the positive ones of its 6 blocks: x1.00 per block" in text, text
        assert "from the fit" not in text
        other = row(A.verdicts(f), A.BACKWARD if signal == A.FORWARD else A.FORWARD)
        assert other[A.VERDICT] == "healthy"  # the other signal is untouched
    end = frame_with(1.0, 1.0, n_blocks=6)
    end.loc[(end[S.METRIC] == S.GRAD_NORM) & (end[S.DEPTH] == 0), S.VALUE] = 0.0  # the far end of the gradient
    text = A.sentence(row(A.verdicts(end), A.BACKWARD))
    assert "0x over 6 blocks (from the fit)" not in text and "vanish: zero at layer.0" in text


def test_missing_rows_keep_positions():
    f = frame_with(2.0, 0.5, n_blocks=8)
    f = f[~((f[S.DEPTH] == 5) & (f[S.STEP] == 1))]  # one block missing at one step
    v = A.verdicts(f)
    assert row(v, A.FORWARD)[A.FACTOR] == pytest.approx(2.0, abs=1e-6)
    assert row(v, A.BACKWARD)[A.FACTOR] == pytest.approx(0.5, abs=1e-6)
    assert row(v, A.FORWARD)[A.N_BLOCKS] == 8


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_block_is_diverged_never_healthy(bad):
    """Issue 15: NaN/Inf activations used to be dropped and the rest called healthy."""
    f = frame_with(1.0, 1.0, n_blocks=6)
    f.loc[(f[S.METRIC] == S.ACT_VAR) & (f[S.DEPTH] >= 2) & (f[S.STEP] == 1), S.VALUE] = bad
    v = A.verdicts(f)
    r = row(v, A.FORWARD)
    assert r[A.VERDICT] == "diverged" and r[A.NONFINITE_BLOCK] == "layer.2"
    assert "diverged" in A.sentence(r) and "layer.2" in A.sentence(r)
    per = A.verdicts(f, step="all")
    fwd = per[per[A.SIGNAL] == A.FORWARD]
    assert list(fwd[A.VERDICT]) == ["healthy", "diverged", "healthy"]


def test_a_nonfinite_count_alone_makes_the_forward_signal_diverged():
    """act_nonfinite > 0 at block 3 with finite gradients everywhere: the forward signal diverged there; the
    backward one, finite at every block, keeps its class."""
    f = frame_with(1.0, 1.0, n_blocks=4, steps=(0,))
    extra = f[f[S.METRIC] == S.ACT_VAR].assign(**{S.METRIC: S.ACT_NONFINITE, S.VALUE: 0.0})
    extra.loc[extra[S.DEPTH] == 3, S.VALUE] = 5.0
    v = A.verdicts(pd.concat([f, extra], ignore_index=True))
    assert row(v, A.FORWARD)[A.VERDICT] == "diverged" and row(v, A.FORWARD)[A.NONFINITE_BLOCK] == "layer.3"
    assert row(v, A.BACKWARD)[A.VERDICT] == "healthy" and pd.isna(row(v, A.BACKWARD)[A.NONFINITE_BLOCK])


def test_a_nan_loss_makes_the_backward_signal_diverged_from_the_deepest_block_and_not_the_forward_one():
    """A NaN loss (finite activations, every gradient NaN) was called a forward divergence at the first block: the
    forward signal is finite, and backward runs from the deepest block, which holds the first NaN."""
    f = frame_with(1.0, 1.0, n_blocks=5, steps=(0, 1))
    f.loc[(f[S.METRIC] == S.GRAD_NORM) & (f[S.STEP] == 1), S.VALUE] = np.nan
    per = A.verdicts(f, step="all")
    at = lambda signal, step: per[(per[A.SIGNAL] == signal) & (per[S.STEP] == step)].iloc[0]
    assert at(A.FORWARD, 1)[A.VERDICT] == "healthy" and pd.isna(at(A.FORWARD, 1)[A.NONFINITE_BLOCK])
    assert at(A.BACKWARD, 1)[A.VERDICT] == "diverged" and at(A.BACKWARD, 1)[A.NONFINITE_BLOCK] == "layer.4"
    assert at(A.BACKWARD, 0)[A.VERDICT] == "healthy"
    pooled = A.verdicts(f)  # over steps: the backward signal diverged at step 1, the forward one never
    assert row(pooled, A.BACKWARD)[A.VERDICT] == "diverged" and row(pooled, A.FORWARD)[A.VERDICT] == "healthy"


def test_only_call_zero_rows_count():
    f = frame_with(2.0, 2.0, n_blocks=5)
    extra = f.assign(**{S.CALL: 1, S.VALUE: 1e9})
    v = A.verdicts(pd.concat([f, extra], ignore_index=True))
    assert row(v, A.FORWARD)[A.FACTOR] == pytest.approx(2.0, abs=1e-6)


def test_positions_follow_depth_not_names():
    names = ["b10", "b2", "b30", "b4"]  # lexicographic order differs from depth order
    v = A.verdicts(frame_with(2.0, 1.0, n_blocks=4, names=names))
    r = row(v, A.FORWARD)
    assert (r[A.FIRST_BLOCK], r[A.LAST_BLOCK], r[A.MAX_BLOCK]) == ("b10", "b4", "b4")
    assert r[A.FACTOR] == pytest.approx(2.0)


def test_missing_metric_gives_no_row_and_bad_frame_raises():
    f = frame_with(2.0, 1.0)
    v = A.verdicts(f[f[S.METRIC] == S.GRAD_NORM])
    assert list(v[A.SIGNAL]) == [A.BACKWARD]
    assert A.verdicts(f[f[S.METRIC] == "param_norm"]).empty
    with pytest.raises(DataError, match="lacks columns"):
        A.verdicts(f.drop(columns=[S.DEPTH]))


def test_sentence_states_the_measured_rate():
    f = frame_with(1.0, 2.0, n_blocks=10, run="resnet56-bn")
    text = A.sentence(row(A.verdicts(f), A.BACKWARD))
    assert text.startswith("resnet56-bn: backward gradients explode toward the input: x2.00 per block (R² 1.00)")
    assert "512x over 10 blocks" in text
    fw = A.sentence(row(A.verdicts(f), A.FORWARD))
    assert "forward activation variance stays healthy" in fw and "x1.00 per block" in fw


def test_combine_steps_is_the_geometric_mean_and_survives_gaps():
    rng = np.random.default_rng(5)
    levels = np.exp(rng.normal(0, 1, (6, 1)))  # each step has its own overall scale
    shape = np.array([1.0, 2.0, 4.0, 8.0])
    m = levels * shape
    np.testing.assert_allclose(A.combine_steps(m), np.exp(np.log(m).mean(axis=0)), rtol=1e-12)
    gappy = m.copy()
    gappy[0, 3] = gappy[4, 1] = np.nan  # a plain per-column mean would now be biased by the missing levels
    got = A.combine_steps(gappy)
    np.testing.assert_allclose(got[1:] / got[:-1], [2.0, 2.0, 2.0], rtol=1e-9)
    zero = m.copy()
    zero[2, 0] = 0.0
    assert A.combine_steps(zero)[0] == 0.0 and np.isnan(A.combine_steps(np.full((3, 2), np.nan))).all()


def test_analysis_imports_no_torch_or_plotting():
    code = ("import sys, importlib.util, types; import pathlib;"
            "sys.modules.setdefault('gradscope', types.ModuleType('gradscope'));"
            "sys.modules['gradscope'].__path__ = [str(pathlib.Path('gradscope').resolve())];"
            "import gradscope.analysis, gradscope.theory, gradscope.theory.nets, gradscope.agreement;"
            "bad = [m for m in ('torch', 'matplotlib', 'seaborn', 'rich') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(A.__file__).parents[2]))


def test_forward_variance_and_backward_norm_are_cut_in_one_unit():
    """Issue 21 §6: a variance ratio is the square of an amplitude ratio, so x1.06 per layer in variance (x1.03 in
    amplitude) is healthy while x1.06 per layer in gradient norm is exploding."""
    v = A.verdicts(frame_with(1.06, 1.06, n_blocks=12))
    assert row(v, A.FORWARD)[A.VERDICT] == "healthy" and row(v, A.BACKWARD)[A.VERDICT] == "exploding"
    assert row(v, A.FORWARD)[A.LAYER_FACTOR] == pytest.approx(1.06 ** 0.5)
    assert row(v, A.BACKWARD)[A.LAYER_FACTOR] == pytest.approx(1.06)
    lo, hi = A.layer_thresholds()
    assert lo == pytest.approx(0.1 ** (1 / 54)) and hi == pytest.approx(10 ** (1 / 54))
    assert A.rate_thresholds(signal=A.FORWARD, layers=2)[1] == pytest.approx(hi ** 4)


def test_layers_per_block_come_from_kinds_configs_or_the_caller():
    """A two-layer block at x1.07 per block is x1.034 per layer: healthy, where per block it would explode."""
    f = frame_with(1.0, 1.07, n_blocks=12, run="plain56-bn")
    f[S.KIND] = "PlainBlock"
    unknown = row(A.verdicts(f.drop(columns=S.RUN)), A.BACKWARD)
    assert unknown[A.VERDICT] == "exploding" and unknown[A.UNIT].startswith("per block (layers per block unknown")
    f[S.MODEL] = "plain56"  # the built-in CIFAR family: two conv layers per block
    known = row(A.verdicts(f), A.BACKWARD)
    assert known[A.VERDICT] == "healthy" and known[A.LAYERS] == 2 and known[A.UNIT] == "per layer"
    assert known[A.LAYER_FACTOR] == pytest.approx(1.07 ** 0.5)
    given = row(A.verdicts(f.drop(columns=[S.MODEL]), layers_per_block={"plain56-bn": 2}), A.BACKWARD)
    assert given[A.VERDICT] == "healthy"
    mlp = row(A.verdicts(f.drop(columns=[S.MODEL]), configs={"plain56-bn": {"name": "mlp", "family": "mlp"}}),
              A.BACKWARD)
    assert mlp[A.VERDICT] == "exploding" and mlp[A.LAYERS] == 1
    f[S.KIND] = "BatchNorm2d"
    assert row(A.verdicts(f.drop(columns=[S.MODEL])), A.BACKWARD)[A.LAYERS] == 1


def test_the_public_verdicts_take_layers_per_block_and_refuse_what_is_not_a_layer_count():
    """The unit text tells the user to pass layers_per_block=, and gradscope.verdicts raised TypeError for it; -1
    turned x0.5 per block into x2.0 per layer (exploding), and a string or True was silently ignored."""
    import gradscope
    from gradscope.errors import DataError

    f = frame_with(1.0, 1.07, n_blocks=12, run="mine")
    f[S.KIND] = "MyBlock"
    told = row(gradscope.verdicts(f), A.BACKWARD)
    assert told[A.VERDICT] == "exploding" and "pass layers_per_block=" in told[A.UNIT]
    given = row(gradscope.verdicts(f, layers_per_block=2), A.BACKWARD)
    assert given[A.VERDICT] == "healthy" and given[A.LAYER_FACTOR] == pytest.approx(1.07 ** 0.5)
    assert row(gradscope.verdicts(f, layers_per_block=0.5), A.BACKWARD)[A.LAYER_FACTOR] == pytest.approx(1.07 ** 2)
    for bad in (-1, 0, math.nan, math.inf, "2", True, {"mine": -2}):
        with pytest.raises(DataError, match="layers_per_block"):
            A.verdicts(f, layers_per_block=bad)


def test_a_negative_variance_or_norm_is_refused_not_judged():
    """A hand-made frame with act_var -1 at one block was judged healthy; no measurement can be negative."""
    from gradscope.errors import DataError

    f = frame_with(1.0, 1.0, n_blocks=5)
    f.loc[(f[S.METRIC] == S.ACT_VAR) & (f[S.DEPTH] == 2) & (f[S.STEP] == 1), S.VALUE] = -1.0
    with pytest.raises(DataError, match=r"act_var is -1.0 at run .*block 'layer.2', step 1"):
        A.verdicts(f)


def test_zeros_at_both_ends_vanish_and_name_the_far_end():
    """act_var zero at the first and the last of six blocks read "stays healthy: zero at layer.0" (the near-end
    rule needed a positive near end and the interior rule skips the ends). A zero far end is vanishing, named."""
    f = frame_with(1.0, 1.0, n_blocks=6)
    f.loc[(f[S.METRIC] == S.ACT_VAR) & f[S.DEPTH].isin([0, 5]), S.VALUE] = 0.0
    r = row(A.verdicts(f), A.FORWARD)
    assert r[A.VERDICT] == "vanishing" and r[A.MIN_BLOCK] == "layer.5"
    assert "vanishes: zero at layer.5" in A.sentence(r)



def _profile(forward, backward, noise=0.0, seed=0):
    """One step's frame: act_var at block k is ``forward[k]``, grad_norm at the k-th block from the output end
    ``backward[k]`` (the near end first in both), each times a log-normal noise of sd ``noise``."""
    rng = np.random.default_rng(seed)
    f = frame_with(1.0, 1.0, n_blocks=len(forward), steps=(0,))
    for metric, values in ((S.ACT_VAR, forward), (S.GRAD_NORM, backward[::-1])):
        sel = f[S.METRIC] == metric
        f.loc[sel, S.VALUE] = np.asarray(values, dtype=float) * np.exp(noise * rng.standard_normal(len(values)))
    return f


@pytest.mark.parametrize("scale,expected", [(1e-4, "vanishing"), (1e4, "exploding"), (1.0, "healthy")])
def test_a_cliff_at_one_block_among_many_flat_ones_is_judged_by_its_ends(scale, expected):
    """The second of 80 near-identity blocks scales the signal by ``scale`` (its variance by ``scale**2``; noise sd
    0.05 in ln): the line through 79 flat blocks is near x1 per block with R² near 0, and before this rule the class
    read from it was "healthy" for a 1e8-fold drop of the variance, while the measured ends lie beyond the whole
    band, far beyond the noise."""
    v = A.verdicts(_profile([1.0] + [scale ** 2] * 79, [1.0] + [scale] * 79, noise=0.05))
    for signal in (A.FORWARD, A.BACKWARD):
        r = row(v, signal)
        assert r[A.VERDICT] == expected, signal
        if expected != "healthy":
            assert r[A.END_TO_END] == pytest.approx(r[A.FAR_VALUE] / r[A.NEAR_VALUE])  # the measured ratio
            assert "does not describe the profile" in r[A.REASON] and "measured x" in A.sentence(r)
        else:
            assert not isinstance(r[A.REASON], str)


def test_a_head_that_scales_the_signal_a_few_times_is_left_to_the_fit():
    """A flat profile whose last block (a logits layer) holds x0.05 of the variance: beyond the cut compounded over
    20 blocks but within the band (x0.01 of a variance), so the ends do not decide and the fit's class stands."""
    fw = row(A.verdicts(_profile([1.0] * 20 + [0.05], [1.0] * 21, noise=0.02)), A.FORWARD)
    assert fw[A.VERDICT] != "vanishing" and "measured x" not in str(fw[A.REASON])
