"""gradscope.testing.assert_healthy: known answers (a vanishing deep tanh net fails, a Kaiming ReLU net passes), an
exploding and a diverged net fail with the class and block named, and the model is left as it was."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradscope
from gradscope.errors import GradscopeError
from gradscope.testing import assert_healthy, default_loss


ANY = ("vanishing", "exploding", "diverged")


def tanh_net(depth: int = 30, width: int = 64) -> nn.Sequential:
    """PyTorch's default Linear init (weight variance 1/(3 fan_in)) with tanh: the gradient shrinks ~x0.6 per layer
    toward the input (slope of tanh <= 1, weight gain 1/3: Glorot & Bengio 2010)."""
    layers: list = []
    for i in range(depth):
        layers += [nn.Linear(width if i else 16, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def relu_net(depth: int = 20, width: int = 256, gain: float = 2.0) -> nn.Sequential:
    """Kaiming (He et al. 2015) ReLU MLP: weight variance gain/fan_in, zero bias; gain 2 keeps the forward variance
    and the gradient norm constant across depth, a larger gain multiplies the variance by gain/2 per layer."""
    layers: list = []
    for i in range(depth):
        lin = nn.Linear(width if i else 16, width)
        nn.init.normal_(lin.weight, std=math.sqrt(gain / lin.in_features))
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def batch(n: int = 64) -> tuple:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_a_vanishing_30_layer_tanh_net_fails_naming_block_signal_class_and_rate():
    torch.manual_seed(0)
    with pytest.raises(AssertionError) as info:
        assert_healthy(tanh_net(), batch())
    msg = str(info.value)
    assert "backward signal vanishing" in msg
    assert "at block '0'" in msg  # the first Linear: the gradient is smallest where it arrives last
    assert "per block" in msg and "grad_norm" in msg
    # the rate in the message is the measured one: an independent reference from autograd
    torch.manual_seed(0)
    model = tanh_net()
    x, y = batch()
    outs = []
    h = x
    for layer in model:
        h = layer(h)
        if isinstance(layer, nn.Linear):
            h.retain_grad()
            outs.append(h)
    nn.functional.cross_entropy(h, y).backward()
    norms = torch.stack([o.grad.norm() for o in outs]).double().log()
    slope = torch.linalg.lstsq(torch.stack([torch.arange(len(outs)).double(), torch.ones(len(outs))], 1),
                               norms[:, None]).solution[0].item()
    assert f"x{math.exp(-slope):.2g}" in msg or f"x{math.exp(-slope):.3g}" in msg


def test_a_kaiming_relu_net_passes_with_both_signals_healthy():
    torch.manual_seed(0)
    table = assert_healthy(relu_net(width=512), batch())
    assert list(table["signal"]) == ["forward", "backward"]
    assert set(table["verdict"]) == {"healthy"}
    lo, hi = gradscope.analysis.layer_thresholds()
    for r in table.to_dict("records"):  # healthy: the whole 95% interval of the per-layer rate between the cuts
        power = 2.0 if r["signal"] == "forward" else 1.0
        assert lo <= r["factor_low"] ** (1 / power) and r["factor_high"] ** (1 / power) <= hi
    # a bare input tensor: the mean log-sum-exp of the output is the loss
    assert set(assert_healthy(relu_net(width=512), batch()[0])["verdict"]) == {"healthy"}


def test_a_narrower_kaiming_net_passes_but_its_rate_is_not_determined():
    """At width 256 this draw's forward variance wanders down over depth (finite-width fluctuations) and the
    logits layer drops it x0.04: the fitted x0.960 per layer lies next to the x0.958 cut and its 95% interval
    straddles it, so the class is unknown (which passes) rather than a point read as healthy."""
    torch.manual_seed(0)
    table = assert_healthy(relu_net(width=256), batch())
    fwd = table[table["signal"] == "forward"].iloc[0]
    assert fwd["verdict"] == "unknown"
    assert "does not determine the rate" in fwd["reason"] and "straddles x0.958" in fwd["reason"]


class SmallCNN(nn.Module):
    """A plain, well-initialised BN CNN: conv/BN/ReLU x3, pooling, logits (seven heterogeneous blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                               nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
                               nn.Conv2d(64, 128, 3, padding=1, stride=2), nn.BatchNorm2d(128), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.pool(self.f(x)).flatten(1))


def test_a_small_bn_cnn_is_not_called_vanishing_from_a_line_that_does_not_fit():
    torch.manual_seed(0)
    images = (torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
    table = assert_healthy(SmallCNN(), images)  # before the interval rule: "forward signal vanishing ... (R² 0.10)"
    assert list(table["verdict"]) == ["unknown", "unknown"]
    fwd = table.iloc[0]
    assert fwd["n_blocks"] == 7 and fwd["r2"] < 0.2 and fwd["factor"] < 1
    assert fwd["factor_low"] < 1 < fwd["factor_high"]
    assert f"R² {fwd['r2']:.2f} over 7 blocks" in fwd["reason"]


def test_a_failure_message_also_says_why_another_signal_is_unknown():
    torch.manual_seed(0)
    with pytest.raises(AssertionError) as info:  # cut at x0.97 per layer: the tanh net's forward x0.96-x0.989
        assert_healthy(tanh_net(), batch(), vanish=0.97 ** 54)
    msg = str(info.value)
    assert "backward signal vanishing" in msg
    assert "(forward signal unknown, not a failure: the fit does not determine the rate" in msg
    assert "straddles x0.970" in msg


def test_a_signal_whose_ends_fell_beyond_the_band_is_vanishing_whatever_the_fit():
    """At a cut of x0.98 per layer the tanh net's forward variance falls x0.0109 from its first block to its
    logits (amplitude x0.104 over 30 layers; the cut allows x0.335 over its 54 reference layers), mostly in its
    first four layers, then stays flat: the line's interval (R² 0.30) straddles the cut, but the ends decide."""
    torch.manual_seed(0)
    with pytest.raises(AssertionError) as info:
        assert_healthy(tanh_net(), batch(), vanish=0.98 ** 54)
    msg = str(info.value)  # before: "(forward signal unknown, not a failure: ...)"
    assert "forward signal vanishing at block '60'" in msg and "measured x0.0109 from the near to the far end" in msg
    assert "does not describe the profile" in msg


def test_an_exploding_net_fails_forward_and_allow_lets_it_pass():
    torch.manual_seed(0)
    model = relu_net(depth=12, gain=6.0)  # variance x3 per layer
    with pytest.raises(AssertionError, match=r"forward signal exploding at block '\d+'"):
        assert_healthy(model, batch(), signals=("forward",))
    table = assert_healthy(model, batch(), signals=("forward",), allow=("exploding",))
    assert list(table["verdict"]) == ["exploding"]


class LogBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return torch.log(self.lin(x))  # negative inputs: NaN


def test_a_nan_fails_as_diverged_at_the_block_that_made_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), LogBlock(), nn.Linear(16, 10))
    with pytest.raises(AssertionError, match=r"diverged.*block '1'"):
        assert_healthy(model, batch(), blocks=["0", "1", "2"])


def test_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = relu_net(depth=4)
    model.eval()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = [p.detach().clone() for p in model.parameters()]
    assert_healthy(model, batch(), allow=ANY)
    assert not model.training
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not model[0]._forward_hooks  # no hook left behind


def test_a_custom_loss_and_a_dict_batch():
    torch.manual_seed(0)
    model = relu_net(depth=4)
    seen = []

    def loss_fn(out, targets):
        seen.append(targets.shape)
        return nn.functional.mse_loss(out, targets)

    assert_healthy(model, (batch()[0], torch.randn(64, 10)), loss_fn, allow=ANY)
    assert seen == [torch.Size([64, 10])]

    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = relu_net(depth=4)

        def forward(self, x):
            return self.net(x)

    assert len(assert_healthy(Kw(), {"x": batch()[0]}, allow=ANY)) == 2


def test_bad_input_is_one_clear_error():
    model = relu_net(depth=3)
    with pytest.raises(GradscopeError, match="not class indices"):
        assert_healthy(model, (batch()[0], torch.randn(64)))
    with pytest.raises(GradscopeError, match="signals="):
        assert_healthy(model, batch(), signals=("sideways",))
    with pytest.raises(GradscopeError, match="allow="):
        assert_healthy(model, batch(), allow=("healthy",))
    with pytest.raises(GradscopeError, match="3 items"):
        assert_healthy(model, (1, 2, 3))
    assert default_loss(torch.zeros(4, 3), None).item() == pytest.approx(math.log(3))


def test_public_name():
    assert gradscope.testing.assert_healthy is assert_healthy
