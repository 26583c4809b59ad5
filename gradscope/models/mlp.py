"""Deep fully connected networks, plain or residual: the textbook subject of signal-propagation theory.

Layout: a stem ``Linear(in_features, width)`` (+BN) + activation that flattens image-shaped input, then
``depth`` hidden blocks of ``Linear(width, width)`` (+BN) + activation, then a classifier ``head.fc``. Only the
hidden blocks are gradscope blocks; all of them map ``width -> width``, so each can carry an identity shortcut.
A plain block computes ``act(BN(W x))``; the residual block adds its input, ``x + act(BN(W x))``.

Without batch norm and with zero biases this is the setting of Glorot & Bengio 2010 and He et al. 2015 (§2.2):
under ``init="kaiming"`` with ReLU the second moment of every block output equals the previous one's, under
``init="xavier"`` it halves at each ReLU block.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from gradscope.errors import ModelError
from gradscope.models.blocks import PlainBlock, ResidualBlock
from gradscope.models.init import ACTIVATIONS, SCHEMES, init_weights
from gradscope.models.options import check_bool, check_choice, check_positive

_ACTIVATION_MODULES = {"relu": nn.ReLU, "tanh": nn.Tanh, "linear": nn.Identity}


def make_layer(in_features: int, out_features: int, bn: bool, activation: str) -> nn.Sequential:
    """``fc`` (+ ``bn``) + ``act``: the body of a hidden block and of the stem. ``bn`` is Identity without BN."""
    return nn.Sequential(OrderedDict([
        # A bias would duplicate the batch norm's beta.
        ("fc", nn.Linear(in_features, out_features, bias=not bn)),
        ("bn", nn.BatchNorm1d(out_features) if bn else nn.Identity()),
        ("act", _ACTIVATION_MODULES[activation]()),
    ]))


class MLP(nn.Module):
    """A plain or residual MLP; build it with :func:`mlp` (or the registry), which initialises it."""

    def __init__(self, depth: int, width: int, in_features: int, num_classes: int, *, bn: bool,
                 residual: bool, activation: str) -> None:
        super().__init__()
        self.in_features = in_features
        stem = make_layer(in_features, width, bn, activation)
        self.stem = nn.Sequential(OrderedDict([("flatten", nn.Flatten()), *stem.named_children()]))
        blocks = []
        for _ in range(depth):
            branch = make_layer(width, width, bn, activation)
            blocks.append(ResidualBlock(branch, nn.Identity()) if residual else PlainBlock(branch))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(OrderedDict([("fc", nn.Linear(width, num_classes))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_features)`` or any ``(N, ...)`` with ``in_features`` values per sample -> ``(N, classes)``."""
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.in_features:
            raise ModelError(
                f"expected inputs with {self.in_features} values per sample, got shape {tuple(x.shape)}; "
                f"pass in_features= to build() (e.g. 3*32*32 = 3072 for CIFAR images)"
            )
        return self.head(self.blocks(self.stem(x)))



def mlp(depth: int = 20, width: int = 256, in_features: int = 3 * 32 * 32, num_classes: int = 10, *,
        bn: bool = False, residual: bool = False, activation: str = "relu", init: str = "kaiming") -> MLP:
    """Build, initialise and describe (``gradscope_config``) an MLP with ``depth`` hidden blocks.

    Defaults: 20 blocks of width 256 on flattened CIFAR-sized images, no batch norm, no shortcuts, ReLU and
    Kaiming init: the deep-MLP setting of He et al. 2015. Draws from torch's global RNG; the registry's
    ``build(..., seed=...)`` fixes it.
    """
    for option, value in (("depth", depth), ("width", width), ("in_features", in_features),
                          ("num_classes", num_classes)):
        check_positive(option, value)
    check_bool("bn", bn)
    check_bool("residual", residual)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("init", init, SCHEMES)
    model = MLP(depth, width, in_features, num_classes, bn=bn, residual=residual,
                activation=activation)
    init_weights(model, init, activation, classifier=model.head.fc)
    model.gradscope_config = {
        "name": "mlp",
        "family": "mlp",
        "residual": bool(residual),
        "bn": bool(bn),
        "shortcut": None,
        "preact": False,
        "init": init,
        "zero_init_last": False,
        "activation": activation,
        "width": width,
        "depth": depth,
        "num_blocks": depth,
        "num_classes": num_classes,
        "in_features": in_features,
    }
    return model
