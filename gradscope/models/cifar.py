"""The CIFAR-10 plain and residual networks of He et al. 2016 (Deep Residual Learning), §4.2.

Architecture, for depth ``6n + 2`` weighted layers: a 3x3 convolution with ``width`` (16) filters, then three
stages of ``n`` blocks of two 3x3 convolutions with ``width``, ``2 width``, ``4 width`` filters on 32x32, 16x16
and 8x8 maps (stride 2 at the first convolution of stages 2 and 3), global average pooling and a fully
connected layer. With option-A shortcuts the parameter counts are those of Table 6: 0.27M, 0.46M, 0.66M,
0.85M and 1.7M for depths 20, 32, 44, 56 and 110.

Shortcuts (§3.3): ``"A"`` identity, with zero channels and stride-2 subsampling where the shape changes (no
parameters); ``"B"`` a 1x1 projection (+BN) only where the shape changes; ``"C"`` projections everywhere.
``preact=True`` builds the full pre-activation unit of He et al. 2016 (Identity Mappings, §4.1, Fig. 4e):
BN-ReLU-conv-BN-ReLU-conv with nothing after the addition, a bare convolution as the stem, and the extra
BN-ReLU after the last block (their appendix) at the start of the head.

Module names: ``stem``, ``stage1`` .. ``stage3`` (blocks ``stage1.0`` ...), ``head`` (``head.fc``); inside a
block ``branch.conv1, branch.bn1, branch.act1, branch.conv2, branch.bn2`` (batch norms are ``nn.Identity``
when ``bn=False``, so names do not depend on it), ``shortcut`` and ``act``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from gradscope.errors import ModelError
from gradscope.models.blocks import PadShortcut, PlainBlock, ResidualBlock
from gradscope.models.init import SCHEMES, init_weights, zero_init_last
from gradscope.models.options import check_bool, check_choice, check_positive

SHORTCUTS = ("A", "B", "C")
#: Depths named in the paper (Table 6): n = 3, 5, 7, 9, 18.
PAPER_DEPTHS = (20, 32, 44, 56, 110)


def blocks_per_stage(depth: int) -> int:
    """``n`` for a net of ``depth = 6n + 2`` weighted layers; a ModelError for any other depth."""
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 8 or (depth - 2) % 6:
        raise ModelError(
            f"depth={depth!r} is not 6n+2 for a whole n >= 1; the CIFAR nets have 6n+2 weighted layers "
            f"(e.g. 8, 14, 20, 32, 44, 56, 110)"
        )
    return (depth - 2) // 6


def _norm(channels: int, bn: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if bn else nn.Identity()


def _conv3x3(in_channels: int, out_channels: int, stride: int, bn: bool) -> nn.Conv2d:
    # A bias would duplicate the following batch norm's beta, so convolutions carry one only without BN.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=not bn)


def make_branch(in_channels: int, out_channels: int, stride: int, bn: bool, preact: bool) -> nn.Sequential:
    """The residual function F: conv-BN-ReLU-conv-BN, or BN-ReLU-conv-BN-ReLU-conv when ``preact``."""
    conv1 = _conv3x3(in_channels, out_channels, stride, bn)
    conv2 = _conv3x3(out_channels, out_channels, 1, bn)
    if preact:
        layers = [("bn1", _norm(in_channels, bn)), ("act1", nn.ReLU()), ("conv1", conv1),
                  ("bn2", _norm(out_channels, bn)), ("act2", nn.ReLU()), ("conv2", conv2)]
    else:
        layers = [("conv1", conv1), ("bn1", _norm(out_channels, bn)), ("act1", nn.ReLU()),
                  ("conv2", conv2), ("bn2", _norm(out_channels, bn))]
    return nn.Sequential(OrderedDict(layers))


def make_shortcut(kind: str, in_channels: int, out_channels: int, stride: int, bn: bool) -> nn.Module:
    """The shortcut of one block for option ``kind`` (see the module docstring)."""
    same_shape = stride == 1 and in_channels == out_channels
    if kind == "C" or (kind == "B" and not same_shape):
        conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=not bn)
        return nn.Sequential(OrderedDict([("conv", conv), ("bn", _norm(out_channels, bn))]))
    if same_shape:
        return nn.Identity()
    return PadShortcut(in_channels, out_channels, stride)


def make_block(in_channels: int, out_channels: int, stride: int, *, residual: bool, bn: bool, preact: bool,
               shortcut: str) -> nn.Module:
    """One stage block; the plain block is the residual block without its shortcut."""
    branch = make_branch(in_channels, out_channels, stride, bn, preact)
    act = None if preact else nn.ReLU()
    if not residual:
        return PlainBlock(branch, act)
    return ResidualBlock(branch, make_shortcut(shortcut, in_channels, out_channels, stride, bn), act)


class CifarNet(nn.Module):
    """A plain or residual CIFAR net; build it with :func:`cifar_net` (or the registry), which initialises it."""

    def __init__(self, depth: int, *, residual: bool, bn: bool = True, shortcut: str = "A",
                 preact: bool = False, width: int = 16, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        n = blocks_per_stage(depth)
        self.in_channels = in_channels
        stem = [("conv", _conv3x3(in_channels, width, 1, bn))]
        if not preact:
            stem += [("bn", _norm(width, bn)), ("act", nn.ReLU())]
        self.stem = nn.Sequential(OrderedDict(stem))
        channels = width
        for index, stage_width in enumerate((width, 2 * width, 4 * width), start=1):
            blocks = []
            for position in range(n):
                stride = 2 if index > 1 and position == 0 else 1
                blocks.append(make_block(channels, stage_width, stride, residual=residual, bn=bn,
                                         preact=preact, shortcut=shortcut))
                channels = stage_width
            self.add_module(f"stage{index}", nn.Sequential(*blocks))
        head = [("bn", _norm(channels, bn)), ("act", nn.ReLU())] if preact else []
        head += [("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
                 ("fc", nn.Linear(channels, num_classes))]
        self.head = nn.Sequential(OrderedDict(head))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_channels, H, W)`` images -> ``(N, num_classes)`` logits (any H, W >= 1; 32x32 in the paper)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ModelError(
                f"expected images of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}; "
                f"pass in_channels= to build() for other channel counts"
            )
        x = self.stem(x)
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.head(x)



def cifar_net(depth: int, *, residual: bool, bn: bool = True, shortcut: str = "A", preact: bool = False,
              init: str = "kaiming", zero_init_last_layer: bool = False, width: int = 16,
              num_classes: int = 10, in_channels: int = 3) -> CifarNet:
    """Validate the options, build a :class:`CifarNet`, initialise it, and attach ``gradscope_config``.

    Draws from torch's global RNG; the registry's ``build(..., seed=...)`` fixes it.
    """
    n = blocks_per_stage(depth)
    check_choice("init", init, SCHEMES)
    for option, value in (("width", width), ("num_classes", num_classes), ("in_channels", in_channels)):
        check_positive(option, value)
    for option, value in (("bn", bn), ("preact", preact), ("zero_init_last", zero_init_last_layer)):
        check_bool(option, value)
    if residual:
        shortcut = check_choice("shortcut", shortcut.upper() if isinstance(shortcut, str) else shortcut,
                                SHORTCUTS)
    if zero_init_last_layer and not residual:
        raise ModelError("zero_init_last=True needs residual blocks: a plain block whose last layer is zero "
                         "outputs zeros and cuts the signal; use a resnet or drop the option")
    model = CifarNet(depth, residual=residual, bn=bn, shortcut=shortcut, preact=preact,
                     width=width, num_classes=num_classes, in_channels=in_channels)
    init_weights(model, init, "relu", classifier=model.head.fc)
    if zero_init_last_layer:
        zero_init_last(block.branch for block in model.modules() if getattr(block, "gradscope_block", False))
    model.gradscope_config = {
        "name": f"{'resnet' if residual else 'plain'}{depth}",
        "family": "cifar",
        "residual": bool(residual),
        "bn": bool(bn),
        "shortcut": shortcut if residual else None,
        "preact": bool(preact),
        "init": init,
        "zero_init_last": bool(zero_init_last_layer),
        "activation": "relu",
        "width": width,
        "depth": depth,
        "num_blocks": 3 * n,
        "blocks_per_stage": n,
        "num_classes": num_classes,
        "in_channels": in_channels,
    }
    return model


def resnet(depth: int = 20, *, bn: bool = True, shortcut: str = "A", preact: bool = False,
           init: str = "kaiming", zero_init_last: bool = False, width: int = 16, num_classes: int = 10,
           in_channels: int = 3) -> CifarNet:
    """A residual CIFAR net of ``depth = 6n + 2`` layers (He et al. 2016, §4.2); see the module docstring.

    ``zero_init_last`` starts every residual branch at zero output: the last BN's gamma is set to 0, or, when
    ``bn=False`` or ``preact=True`` (branches that end in a convolution), the last convolution's weight.
    """
    return cifar_net(depth, residual=True, bn=bn, shortcut=shortcut, preact=preact, init=init,
                     zero_init_last_layer=zero_init_last, width=width, num_classes=num_classes,
                     in_channels=in_channels)


def plain(depth: int = 20, *, bn: bool = True, preact: bool = False, init: str = "kaiming", width: int = 16,
          num_classes: int = 10, in_channels: int = 3) -> CifarNet:
    """The plain twin of :func:`resnet`: the same layers with the same names, and no shortcuts."""
    return cifar_net(depth, residual=False, bn=bn, preact=preact, init=init, width=width,
                     num_classes=num_classes, in_channels=in_channels)
