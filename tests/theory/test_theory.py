"""Each formula of gradscope.theory against an independent computation (closed forms, limits, Monte Carlo)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gradscope import theory as T
from gradscope.theory import nets as N


def standardised_batches(rng, n: int, b: int) -> np.ndarray:
    """n independent batch vectors of size b after batch normalisation (zero mean, unit population variance)."""
    z = rng.standard_normal((n, b))
    z -= z.mean(axis=1, keepdims=True)
    return z / np.sqrt((z ** 2).mean(axis=1, keepdims=True))


# --- plain nets without normalisation ---------------------------------------------------------------------------

@pytest.mark.parametrize("init,fan_in,fan_out", [("kaiming", 300, 300), ("xavier", 300, 300), ("xavier", 200, 400),
                                                 ("orthogonal", 300, 300)])
def test_relu_layer_factor_matches_monte_carlo(init, fan_in, fan_out):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, fan_in)) + 0.5  # any input law: only its second moment matters
    ratios, back = [], []
    for _ in range(100):
        if init == "kaiming":
            w = rng.standard_normal((fan_out, fan_in)) * math.sqrt(2 / fan_in)
        elif init == "xavier":
            w = rng.standard_normal((fan_out, fan_in)) * math.sqrt(2 / (fan_in + fan_out))
        else:
            q, r = np.linalg.qr(rng.standard_normal((fan_in, fan_out)))
            w = math.sqrt(2) * (q * np.sign(np.diag(r))).T  # Haar-distributed (Mezzadri 2007)
        z = x @ w.T
        ratios.append((np.maximum(z, 0) ** 2).mean() / (x ** 2).mean())
        g = rng.standard_normal(z.shape)
        back.append(((g * (z > 0)) @ w).__pow__(2).sum() / (g ** 2).sum())
    expect = T.relu_layer_factor(init, fan_in, fan_out)
    assert np.mean(ratios) == pytest.approx(expect, rel=0.02)
    assert np.mean(back) == pytest.approx(expect, rel=0.02)
    assert T.relu_layer_factor("kaiming", 10, 10) == 1.0 and T.relu_layer_factor("xavier", 10, 10) == 0.5


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="lecun"):
        T.weight_gain2("lecun", 3, 3)


def test_gauss_expect_known_moments():
    assert T.gauss_expect(lambda z: z * z, 2.5) == pytest.approx(2.5, rel=1e-9)
    assert T.gauss_expect(lambda z: z ** 4, 1.0) == pytest.approx(3.0, rel=1e-9)
    assert T.gauss_expect(lambda z: max(z, 0.0), 1.0) == pytest.approx(1 / math.sqrt(2 * math.pi), rel=1e-6)


def test_tanh_profiles_match_a_wide_tanh_mlp():
    rng = np.random.default_rng(1)
    n, depth, gain2 = 1000, 8, 1.0  # Xavier: the variance decays slowly
    h = np.tanh(rng.standard_normal((256, n)) * 0.8)
    acts, ws = [], []
    for _ in range(depth):
        w = rng.standard_normal((n, n)) / math.sqrt(n) * math.sqrt(gain2)
        ws.append(w)
        h = np.tanh(h @ w.T)
        acts.append(h)
    fwd, back = T.tanh_profiles(depth, float(acts[0].var()), gain2)
    np.testing.assert_allclose([a.var() for a in acts], fwd, rtol=0.02)
    g = rng.standard_normal(acts[-1].shape)
    norms = [(g ** 2).sum()]
    for k in range(depth - 1, 0, -1):  # from block k's output back to block k-1's output
        g = (g * (1 - acts[k] ** 2)) @ ws[k]
        norms.insert(0, (g ** 2).sum())
    np.testing.assert_allclose(np.array(norms) / norms[-1], back, rtol=0.03)
    assert back[0] < 0.9  # the test has teeth: gradients do shrink toward the input here


# --- batch normalisation ----------------------------------------------------------------------------------------

def test_bn_relu_rate_limits_and_domain():
    assert T.bn_relu_rate() == pytest.approx(math.pi / (math.pi - 1), rel=1e-12)
    assert T.bn_relu_rate(10 ** 8) == pytest.approx(math.pi / (math.pi - 1), rel=1e-6)
    rates = [T.bn_relu_rate(b) for b in (4, 8, 16, 64, 256, 4096)]
    assert all(a > b for a, b in zip(rates, rates[1:]))  # smaller batches explode faster
    with pytest.raises(ValueError, match="4 samples"):
        T.bn_relu_rate(3)


@pytest.mark.parametrize("b", [5, 8, 32])
def test_batch_terms_are_exact_laws_of_a_normalised_batch(b):
    rng = np.random.default_rng(b)
    y = standardised_batches(rng, 400_000, b)
    r = np.maximum(y, 0)
    rho = -1 / (b - 1)
    kappa = (math.sqrt(1 - rho * rho) + rho * (math.pi - math.acos(rho))) / (2 * math.pi)
    assert np.mean(r[:, 0] * r[:, 1]) == pytest.approx(kappa, abs=2e-3)
    assert np.mean((y[:, 0] > 0) & (y[:, 1] > 0)) == pytest.approx(0.25 + math.asin(rho) / (2 * math.pi), abs=2e-3)
    assert r.var() == pytest.approx(T.bn_relu_variance(b), abs=2e-3)  # all elements, as act_var measures it


@pytest.mark.parametrize("b", [8, 16, 64])
def test_bn_relu_rate_matches_a_deep_bn_relu_net(b):
    """Squared gradient norm per BN-ReLU layer in a wide random net, fitted over the middle layers."""
    rng = np.random.default_rng(b)
    n, depth, rates = 512, 24, []
    for _ in range(3):
        h, xs, ws, ys = rng.standard_normal((b, n)), [], [], []
        for _ in range(depth):
            w = rng.standard_normal((n, n)) * math.sqrt(2 / n)
            z = h @ w.T
            mu, sd = z.mean(0), z.std(0)
            y = (z - mu) / sd
            ws.append(w), ys.append((y, sd)), xs.append(h)
            h = np.maximum(y, 0)
        g, norms = rng.standard_normal((b, n)), []
        for w, (y, sd) in zip(reversed(ws), reversed(ys)):
            gy = g * (y > 0)
            gz = (gy - gy.mean(0) - y * (gy * y).mean(0)) / sd  # BN's backward, population variance
            g = gz @ w
            norms.append((g ** 2).sum())
        logs = np.log(norms[4:-3])
        rates.append(math.exp(np.polyfit(np.arange(len(logs)), logs, 1)[0]))
    assert np.mean(rates) == pytest.approx(T.bn_relu_rate(b), rel=0.03)


# --- residual nets ----------------------------------------------------------------------------------------------

def test_residual_factor_and_linear_growth():
    rng = np.random.default_rng(2)
    n, alpha = 800, 0.5
    x = rng.standard_normal((128, n))
    w = rng.standard_normal((n, n)) / math.sqrt(n)  # a variance-preserving linear branch, gain 1
    out = x + alpha * x @ w.T
    assert (out ** 2).mean() / (x ** 2).mean() == pytest.approx(T.residual_factor(alpha), rel=0.02)
    assert T.residual_factor(0.0) == 1.0 and T.residual_factor(1.0) == 2.0
    assert T.linear_growth(1.0, 0.5, 4) == [1.0, 1.5, 2.0, 2.5]


def spitzer_moments(n_max: int) -> tuple[list[float], list[float]]:
    """E[M_n], E[M_n²] of a reflected Gaussian random walk M_n = max(M_{n-1} + ξ, 0), from Spitzer's identity:
    sum_n s^n E[M_n] = a(s)/(1-s), sum_n s^n E[M_n²] = (a(s)² + b(s))/(1-s), a_k = E[S_k⁺]/k, b_k = E[(S_k⁺)²]/k."""
    a = [0.0] + [1 / math.sqrt(2 * math.pi * k) for k in range(1, n_max + 1)]
    m1, m2 = [0.0], [0.0]
    for n in range(1, n_max + 1):
        m1.append(m1[-1] + a[n])
        m2.append(m2[-1] + 0.5 + sum(a[i] * a[n - i] for i in range(1, n)))
    return m1, m2


def test_grid_law_of_a_bn_residual_stream_matches_spitzer():
    m1, m2 = spitzer_moments(40)
    law = N.relu_noise(1.0, [], [], 1.0)
    for n in range(1, 41):
        mean, sec = N.moments(*law)
        assert mean == pytest.approx(m1[n], rel=0.01) and sec == pytest.approx(m2[n], rel=0.015)
        law = N.relu_noise(*law, 1.0)
    assert (m2[40] - m1[40] ** 2) / 40 == pytest.approx(1 - 2 / math.pi, rel=0.05)  # linear growth, slope 1-2/π


def test_grid_rate_of_an_unnormalised_post_relu_residual_stream_matches_monte_carlo():
    rng = np.random.default_rng(3)
    x = np.maximum(rng.standard_normal(400_000), 0)
    law = N.relu_noise(1.0, [], [], 1.0)
    for _ in range(12):
        m_mc, m_grid = (x ** 2).mean(), N.moments(*law)[1]
        x = np.maximum(x + math.sqrt(2 * m_mc) * rng.standard_normal(x.size), 0)
        law = N.relu_noise(*law, 2 * m_grid)
    rate_mc = (x ** 2).mean() / m_mc
    assert N.moments(*law)[1] / m_grid == pytest.approx(rate_mc, rel=0.01)
    assert 2.3 < rate_mc < 2.5  # between the symmetric closure 1.5 and the unclipped 1 + r = 3


# --- zero padding -----------------------------------------------------------------------------------------------

def test_conv1d_and_its_adjoint():
    rng = np.random.default_rng(4)
    for n, s in ((8, 1), (16, 2), (7, 2)):
        u, v = rng.random(n).tolist(), rng.random((n - 1) // s + 1).tolist()
        assert np.dot(N.conv1d(u, s), v) == pytest.approx(np.dot(u, N.conv1d_t(v, s, n)))
        dense = np.zeros(((n - 1) // s + 1, n))
        for p in range(dense.shape[0]):
            for t in (-1, 0, 1):
                if 0 <= s * p + t < n:
                    dense[p, s * p + t] = 1
        np.testing.assert_allclose(N.conv1d(u, s), dense @ np.array(u))


def test_pad_fraction_and_settled_profile_against_a_real_convolution():
    torch = pytest.importorskip("torch")
    for size in (32, 8):
        ones = torch.ones(1, 1, size, size)
        valid = torch.nn.functional.conv2d(ones.double(), torch.ones(1, 1, 3, 3, dtype=torch.float64), padding=1) / 9
        assert N.pad_fraction(size) == pytest.approx(valid.mean().item(), rel=1e-9)
        u = [1.0] * size
        for _ in range(400):  # power iteration: the settled per-layer factor is the Perron eigenvalue
            new = [x / 3 for x in N.conv1d(u)]
            ratio, u = sum(new) / sum(u), [x / max(new) for x in new]
        assert ratio ** 2 == pytest.approx(((1 + 2 * math.cos(math.pi / (size + 1))) / 3) ** 2, rel=1e-6)


# --- predict and fits -------------------------------------------------------------------------------------------

def test_predict_knows_the_zoo_and_refuses_the_rest():
    assert T.predict({"model": "vit_tiny"}) is None
    assert T.predict({"name": "mlp", "activation": "tanh", "depth": 5}) is None  # needs the first block's size
    assert T.predict({"name": "mlp", "bn": True, "activation": "tanh", "depth": 5}) is None
    p = T.predict({"model": "resnet56", "bn": True, "residual": True, "shortcut": "A", "init": "kaiming"})
    assert len(p.forward) == 27 and p.backward is None and "ReLU masks" in p.why_none
    assert p.stages == tuple([0] * 9 + [1] * 9 + [2] * 9)
    plain = T.predict({"name": "plain20", "family": "cifar", "bn": True, "residual": False, "depth": 20})
    assert plain.backward[0] == pytest.approx(T.bn_relu_rate() ** 8, rel=1e-9)  # two BN-ReLU layers per block
    mlp = T.predict({"name": "mlp", "depth": 6, "width": 64, "init": "xavier"})
    assert mlp.forward == tuple(0.5 ** k for k in range(6))


def test_complete_config_from_frame_columns():
    c = T.complete_config({"model": "plain56", "bn": False, "residual": False, "shortcut": None, "init": "xavier"})
    assert (c["family"], c["num_blocks"], c["blocks_per_stage"], c["width"]) == ("cifar", 27, 9, 16)
    assert T.complete_config({"model": "mlp"}, n_blocks=12)["num_blocks"] == 12
    assert T.complete_config({"model": "mlp"}) is None  # depth unknown and nothing measured


def test_fit_factor_within_stages_ignores_the_jumps_between_them():
    values = [2.0 ** k for k in range(4)] + [0.1 * 2.0 ** k for k in range(4)] + [7 * 2.0 ** k for k in range(3)]
    stages = [0] * 4 + [1] * 4 + [2] * 3
    assert T.fit_factor(values, stages) == pytest.approx(2.0, rel=1e-12)
    assert T.fit_factor(values[::-1], stages[::-1], backward=True) == pytest.approx(2.0, rel=1e-12)
    assert T.fit_factor(values) < 2.0  # across the jumps the single-line fit is lower


# --- agreement on the zoo: measured with plain torch hooks, compared through gradscope.verdicts --------------------

def zoo_frame(name: str, seeds, batch: int, **options):
    """One run whose "steps" are independent seeds: act_var and grad_norm of every block, by hand."""
    torch = pytest.importorskip("torch")
    import pandas as pd

    from gradscope import schema as S
    from gradscope.models import build

    rows, config = [], None
    for step, seed in enumerate(seeds):
        model = build(name, seed=seed, **options)
        config = model.gradscope_config
        gen = torch.Generator().manual_seed(1000 + seed)
        shape = (batch, 3, 32, 32) if config["family"] == "cifar" else (batch, config["in_features"])
        x, y = torch.randn(shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
        blocks = [(n, m) for n, m in model.named_modules() if getattr(m, "gradscope_block", False)]
        handles = []

        def hook(depth, block):
            def fwd(module, inputs, out):
                rows.append((step, block, depth, S.ACT_VAR, out.detach().double().var(unbiased=False).item()))
                out.register_hook(lambda g: rows.append((step, block, depth, S.GRAD_NORM, g.double().norm().item())))
            return fwd

        for depth, (block, module) in enumerate(blocks):
            handles.append(module.register_forward_hook(hook(depth, block)))
        try:
            torch.nn.functional.cross_entropy(model(x), y).backward()
        finally:
            for h in handles:
                h.remove()
    f = pd.DataFrame(rows, columns=[S.STEP, S.BLOCK, S.DEPTH, S.METRIC, S.VALUE])
    f = f.assign(**{S.KIND: "Block", S.CALL: 0, S.RUN: name})
    return f, {**config, "batch_size": batch}


def check_agreement(name, seeds, batch, signals=("forward", "backward"), narrow=False, **options):
    """Theory and measurement agree; a narrow net measured as one run can at best be "inconclusive" (its seed
    spread is not estimated), never "disagrees"."""
    from gradscope import agreement as G, analysis as A

    frame, config = zoo_frame(name, seeds, batch, **options)
    v = G.verdicts(frame, configs={name: config}).set_index(A.SIGNAL)
    for sig in signals:
        r = v.loc[sig]
        expected = {"inconclusive"} if narrow else {"agrees"}
        assert r[A.AGREEMENT] in expected, (sig, r[A.THEORY_NOTE])
    return v


MLP = dict(depth=12, width=512)


@pytest.mark.parametrize("options,fwd,bwd", [
    ({}, 1.0, 1.0),
    ({"init": "xavier"}, 0.5, math.sqrt(0.5)),
    ({"bn": True}, 1.0, math.sqrt(T.bn_relu_rate(64))),
    ({"bn": True, "residual": True}, None, None),
    ({"residual": True, "depth": 8}, None, math.sqrt(2.0)),
    ({"activation": "tanh", "init": "xavier"}, None, None),
])
def test_wide_mlps_agree_with_theory(options, fwd, bwd):
    from gradscope import agreement as G, analysis as A

    v = check_agreement("mlp", (0, 1, 2), 64, **{**MLP, **options})
    for sig, closed in (("forward", fwd), ("backward", bwd)):
        r = v.loc[sig]
        assert abs(math.log(r[A.MEASURED_FACTOR] / r[A.PREDICTED_FACTOR])) < 0.03  # within 3% per block
        if closed is not None:
            assert r[A.PREDICTED_FACTOR] == pytest.approx(closed, rel=1e-9)


def test_deep_residual_mlp_without_bn_parts_from_theory_and_says_so():
    from gradscope import agreement as G, analysis as A

    frame, config = zoo_frame("mlp", (0, 1), 64, depth=24, width=512, residual=True)
    r = G.verdicts(frame, configs={"mlp": config}).set_index(A.SIGNAL).loc["backward"]
    assert r[A.AGREES] == False and r[A.MEASURED_FACTOR] > r[A.PREDICTED_FACTOR] * 1.05  # noqa: E712
    assert "disagrees" in r[A.THEORY_NOTE] and "gradient independence fails" in r[A.THEORY_NOTE]


@pytest.mark.parametrize("name,options,signals", [
    ("plain20", {"bn": True}, ("forward", "backward")),
    ("plain20", {"bn": False, "init": "xavier"}, ("forward", "backward")),
    ("resnet20", {"bn": True}, ("forward",)),
    ("resnet20", {"bn": False}, ("forward",)),
    ("resnet20", {"bn": True, "zero_init_last": True}, ("forward", "backward")),
    ("resnet20", {"bn": True, "shortcut": "B"}, ("forward",)),
])
def test_cifar_nets_agree_with_theory_where_it_applies(name, options, signals):
    from gradscope import agreement as G, analysis as A

    v = check_agreement(name, (0, 1), 16, signals=signals, narrow=True, **options)
    for sig in signals:  # and closer than the (noise-widened) tolerance needs: within 7% per block
        assert abs(math.log(v.loc[sig][A.MEASURED_FACTOR] / v.loc[sig][A.PREDICTED_FACTOR])) < 0.07
    if "backward" not in signals:
        assert pd_isna(v.loc["backward"][A.PREDICTED_FACTOR]) and "no backward theory" in v.loc["backward"][A.THEORY_NOTE]


def pd_isna(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def test_a_wrong_config_is_caught():
    """Negative control: a Kaiming MLP described as Xavier must not 'agree' with the Xavier prediction."""
    from gradscope import agreement as G, analysis as A

    frame, config = zoo_frame("mlp", (0, 1), 64, depth=10, width=256)
    v = G.verdicts(frame, configs={"mlp": {**config, "init": "xavier"}}).set_index(A.SIGNAL)
    assert v.loc["forward"][A.AGREES] == False and v.loc["backward"][A.AGREES] == False  # noqa: E712
    assert "disagrees" in v.loc["forward"][A.THEORY_NOTE]
