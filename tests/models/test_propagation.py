"""Forward signal propagation at initialisation, measured with plain forward hooks against theory.

Plain nets without batch norm and with zero biases (He et al. 2015, §2.2): a conv layer with weight variance
``v`` maps an input whose per-position second moment (over batch and channels) is ``m(q)`` to pre-activations
with ``E[y(p)^2] = v * C_in * sum_{q in 3x3(p)} m(q)``, zero padding included, and a ReLU halves that because
``y`` is symmetric given the input. The recursion is linear, so it holds exactly in expectation over the weights,
at any width. Kaiming (``v = 2/fan_in``) keeps the second moment of each layer; Xavier (``v = 2/(fan_in+fan_out)``)
halves it at each ReLU conv, so a block of two convs divides it by 4 (by 6 at a stage transition, where
``fan_out = 2 fan_in``).

One deviation from "constant" is real and included in the prediction: zero padding. On 8x8 maps a border pixel
sees only 4 or 6 of 9 taps, and the second moment then shrinks by about 8% per conv even under Kaiming init.

Single-seed gains of these 16-channel nets fluctuate a lot (a block's gain has a relative spread of about 50%),
so the tests average the ratio ``measured / predicted`` over blocks and seeds: its expectation is exactly 1 for
every block, whatever came before it.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradscope.models import build

SEEDS_20 = range(32)
SEEDS_56 = range(8)
BATCH = 64


def weight_variance(scheme: str, fan_in: int, fan_out: int) -> float:
    """The weight variance each scheme targets for a ReLU net, written from the papers' formulas."""
    return {"kaiming": 2.0 / fan_in, "xavier": 2.0 / (fan_in + fan_out)}[scheme]


def predicted_block_second_moment(block: nn.Module, block_input: torch.Tensor, scheme: str) -> float:
    """Expected mean of the block output squared, given its input: two (conv, ReLU) steps of the recursion."""
    m = block_input.pow(2).mean(dim=(0, 1))[None, None]  # (1, 1, H, W)
    for conv in (block.branch.conv1, block.branch.conv2):
        c_out, c_in, kh, kw = conv.weight.shape
        v = weight_variance(scheme, c_in * kh * kw, c_out * kh * kw)
        taps = F.avg_pool2d(m, 3, conv.stride[0], 1, count_include_pad=True) * 9  # sum over the 3x3 taps
        m = v * c_in * taps / 2
    return m.mean().item()


def block_records(model: nn.Module, x: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """(block, input, output) for every gradscope block in execution order, with hooks of our own."""
    records = []
    blocks = [m for m in model.modules() if getattr(m, "gradscope_block", False)]
    handles = [b.register_forward_hook(lambda m, args, out: records.append((m, args[0], out))) for b in blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return records


def measure(depth: int, scheme: str, seeds: range, reinit=None) -> dict[str, torch.Tensor]:
    """Per (seed, block): measured / predicted second moment, and the second-moment and variance gains."""
    x = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1234))
    ratio, gain, var_gain = [], [], []
    for seed in seeds:
        model = build(f"plain{depth}", bn=False, init=scheme, seed=seed)
        if reinit is not None:
            torch.manual_seed(seed)
            for module in model.modules():
                if isinstance(module, nn.Conv2d):
                    reinit(module.weight)
        records = block_records(model, x)
        ratio.append([o.pow(2).mean().item() / predicted_block_second_moment(b, i, scheme) for b, i, o in records])
        gain.append([o.pow(2).mean().item() / i.pow(2).mean().item() for _, i, o in records])
        var_gain.append([o.var().item() / i.var().item() for _, i, o in records])
    n = (depth - 2) // 6
    return {"ratio": torch.tensor(ratio), "gain": torch.tensor(gain), "var_gain": torch.tensor(var_gain),
            "stage1": torch.arange(n), "transitions": torch.tensor([n, 2 * n])}


@pytest.fixture(scope="module")
def plain20() -> dict[str, dict[str, torch.Tensor]]:
    return {scheme: measure(20, scheme, SEEDS_20) for scheme in ("kaiming", "xavier")}


def test_prediction_by_hand_for_a_uniform_input():
    """The helper itself: a constant input through one stage-1 block, worked out by hand.

    Kaiming: each conv + ReLU maps the field to the mean of its 3x3 neighbourhood with zeros outside. Per axis,
    one step gives [2/3, 1, ..., 1, 2/3] and a second [5/9, 8/9, 1, ..., 1, 8/9, 5/9], whose mean over 32 pixels
    is 278/288; the 2-D field is the outer product. Xavier on 16 -> 16 channels has half Kaiming's variance.
    """
    block = build("plain20", bn=False, seed=0).stage1[0]
    x = torch.ones(1, 16, 32, 32)
    assert predicted_block_second_moment(block, x, "kaiming") == pytest.approx((278 / 288) ** 2, rel=1e-6)
    assert predicted_block_second_moment(block, x, "xavier") == pytest.approx((278 / 288) ** 2 / 4, rel=1e-6)


def test_kaiming_keeps_the_second_moment_of_every_block(plain20):
    stats = plain20["kaiming"]
    assert stats["ratio"].mean().item() == pytest.approx(1.0, abs=0.12)
    assert stats["ratio"][:, stats["transitions"]].mean().item() == pytest.approx(1.0, abs=0.25)
    # Stage 1 runs on 32x32 maps where padding barely matters: the gain per block is 1 ("constant with depth").
    assert stats["gain"][:, stats["stage1"]].mean().item() == pytest.approx(1.0, abs=0.3)
    assert stats["var_gain"][:, stats["stage1"]].mean().item() == pytest.approx(1.0, abs=0.3)


def test_xavier_halves_the_second_moment_per_relu_conv(plain20):
    stats = plain20["xavier"]
    assert stats["ratio"].mean().item() == pytest.approx(1.0, abs=0.12)
    # Two ReLU convs per block: a quarter per block in stage 1 ...
    assert stats["gain"][:, stats["stage1"]].mean().item() == pytest.approx(0.25, rel=0.3)
    assert stats["var_gain"][:, stats["stage1"]].mean().item() == pytest.approx(0.25, rel=0.3)
    # ... and a sixth at the transitions, where the first conv has fan_out = 2 fan_in (fan_avg = 1.5 fan_in),
    # a little less because of padding on the smaller maps.
    transition_gain = stats["gain"][:, stats["transitions"]].mean().item()
    assert 1 / 6 * 0.65 < transition_gain < 1 / 6 * 1.25


def test_plain56_matches_the_prediction_at_every_depth():
    for scheme in ("kaiming", "xavier"):
        stats = measure(56, scheme, SEEDS_56)
        assert stats["ratio"].mean().item() == pytest.approx(1.0, abs=0.15)
        assert stats["ratio"][:, stats["transitions"]].mean().item() == pytest.approx(1.0, abs=0.4)
        assert torch.isfinite(stats["gain"]).all()


@pytest.mark.parametrize("scheme, wrong, where, bounds", [
    # Kaiming with fan_out halves the signal at each stage transition.
    ("kaiming", lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"), "transitions",
     (0.4, 0.65)),
    # Kaiming with gain 1 (the linear gain) halves it at every conv: a quarter per block.
    ("kaiming", lambda w: nn.init.kaiming_normal_(w, nonlinearity="linear"), "all", (0.18, 0.32)),
    # Xavier with the ReLU gain sqrt(2) doubles it at every conv: 4x per block.
    ("xavier", lambda w: nn.init.xavier_normal_(w, gain=math.sqrt(2)), "all", (3.2, 4.8)),
    # Xavier with fan_in alone (LeCun) is 1.5x too big at the transitions.
    ("xavier", lambda w: nn.init.normal_(w, std=(1 / (w[0].numel())) ** 0.5), "transitions", (1.3, 1.8)),
])
def test_the_checks_reject_a_wrong_init(scheme, wrong, where, bounds):
    """The tolerances above are tight enough to fail a wrong gain or a wrong fan mode."""
    stats = measure(20, scheme, range(16), reinit=wrong)
    ratios = stats["ratio"] if where == "all" else stats["ratio"][:, stats["transitions"]]
    low, high = bounds
    assert low < ratios.mean().item() < high
    tolerance = 0.12 if where == "all" else 0.25
    assert abs(ratios.mean().item() - 1.0) > tolerance


@pytest.mark.parametrize("init, activation, expected", [
    ("kaiming", "relu", 1.0), ("orthogonal", "relu", 1.0), ("xavier", "relu", 0.5), ("kaiming", "linear", 1.0),
])
def test_mlp_block_gain(init, activation, expected):
    """Square 256-wide layers: Kaiming/orthogonal keep the second moment, Xavier halves it per ReLU layer.

    Single blocks scatter by up to about 30% around the expectation, so the test pins the mean over blocks and
    seeds; a wrong gain (a factor 2) is far outside it.
    """
    x = torch.randn(512, 3 * 32 * 32, generator=torch.Generator().manual_seed(0))
    gains = []
    for seed in range(4):
        model = build("mlp", depth=10, init=init, activation=activation, seed=seed)
        gains += [o.pow(2).mean().item() / i.pow(2).mean().item() for _, i, o in block_records(model, x)]
    assert torch.tensor(gains).mean().item() == pytest.approx(expected, rel=0.08)
