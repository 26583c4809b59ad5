"""The MLP family: layout, the plain and residual block formulas, input handling, activations and init."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gradscope.errors import ModelError
from gradscope.models import PlainBlock, ResidualBlock, build


def blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "gradscope_block", False)]


def test_defaults():
    model = build("mlp", seed=0)
    config = model.gradscope_config
    assert (config["depth"], config["width"], config["in_features"], config["num_classes"]) == (20, 256, 3072, 10)
    assert (config["bn"], config["residual"], config["activation"], config["init"]) == (False, False, "relu",
                                                                                          "kaiming")
    assert len(blocks(model)) == 20
    assert [n for n, m in model.named_modules() if getattr(m, "gradscope_block", False)][:2] == ["blocks.0",
                                                                                                 "blocks.1"]
    # weighted layers: stem, 20 hidden, classifier
    assert len([m for m in model.modules() if isinstance(m, nn.Linear)]) == 22


def test_images_are_flattened():
    model = build("mlp", depth=3, seed=0)
    images = torch.randn(5, 3, 32, 32)
    assert torch.equal(model(images), model(images.flatten(1)))
    assert model(images).shape == (5, 10)


@pytest.mark.parametrize("shape", [(5, 3, 16, 16), (5, 3071), (3072,)])
def test_wrong_input_size_is_refused(shape):
    with pytest.raises(ModelError, match="3072 values per sample"):
        build("mlp", depth=2)(torch.randn(shape))


@pytest.mark.parametrize("bn", [False, True])
def test_plain_block_is_act_of_bn_of_linear(bn):
    model = build("mlp", depth=3, bn=bn, seed=0)
    block = model.blocks[1]
    assert isinstance(block, PlainBlock) and not hasattr(block, "shortcut")
    assert [n for n, _ in block.branch.named_children()] == ["fc", "bn", "act"]
    x = torch.randn(8, 256)
    fc = block.branch.fc
    linear = x @ fc.weight.T + (fc.bias if fc.bias is not None else 0)
    if bn:  # training-mode batch norm: batch statistics, biased variance
        linear = (linear - linear.mean(0)) / torch.sqrt(linear.var(0, unbiased=False) + 1e-5)
    assert torch.allclose(block(x), torch.relu(linear), atol=1e-5)


def test_residual_block_adds_its_input():
    model = build("mlp", depth=3, residual=True, bn=True, seed=0)
    block = model.blocks[2]
    assert isinstance(block, ResidualBlock) and isinstance(block.shortcut, nn.Identity)
    assert not hasattr(block, "act")
    x = torch.randn(8, 256)
    assert torch.allclose(block(x), x + block.branch(x))
    assert model.gradscope_config["residual"] is True


def test_linear_activation_makes_a_linear_map():
    model = build("mlp", depth=4, activation="linear", seed=0)
    a, b = torch.randn(3, 3072), torch.randn(3, 3072)
    zero = model(torch.zeros(1, 3072))
    assert torch.allclose(model(a + b) - zero, (model(a) - zero) + (model(b) - zero), atol=1e-4)
    assert not any(isinstance(m, (nn.ReLU, nn.Tanh)) for m in model.modules())


def test_tanh_activation():
    model = build("mlp", depth=2, activation="tanh", seed=0)
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 3  # stem + 2 blocks
    assert model.gradscope_config["activation"] == "tanh"


@pytest.mark.parametrize("init, activation, hidden_var", [
    ("kaiming", "relu", 2 / 256), ("kaiming", "tanh", (5 / 3) ** 2 / 256), ("kaiming", "linear", 1 / 256),
    ("xavier", "relu", 2 / 512), ("xavier", "tanh", 2 / 512),
])
def test_init_variance(init, activation, hidden_var):
    model = build("mlp", depth=3, init=init, activation=activation, seed=0)
    for block in model.blocks:
        assert block.branch.fc.weight.var().item() == pytest.approx(hidden_var, rel=0.03)
        assert not block.branch.fc.bias.any()
    stem_expected = {"kaiming": hidden_var * 256 / 3072, "xavier": 2 / (3072 + 256)}[init]
    assert model.stem.fc.weight.var().item() == pytest.approx(stem_expected, rel=0.03)
    classifier_expected = {"kaiming": 1 / 256, "xavier": 2 / (256 + 10)}[init]
    assert model.head.fc.weight.var().item() == pytest.approx(classifier_expected, rel=0.1)


def test_orthogonal_rows():
    model = build("mlp", depth=2, init="orthogonal", seed=0)
    w = model.blocks[0].branch.fc.weight.detach()
    assert torch.allclose(w @ w.T, 2 * torch.eye(256), atol=1e-4)
    stem = model.stem.fc.weight.detach()  # 256 x 3072: orthonormal rows, ReLU gain
    assert torch.allclose(stem @ stem.T, 2 * torch.eye(256), atol=1e-4)


def test_custom_sizes():
    model = build("mlp", depth=2, width=32, in_features=20, num_classes=3, seed=0)
    assert model(torch.randn(4, 20)).shape == (4, 3)
    assert model(torch.randn(4, 4, 5)).shape == (4, 3)
