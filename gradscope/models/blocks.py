"""The two block kinds every built-in network is made of, and the option-A shortcut.

A block is what the hook engine records: the class attribute ``gradscope_block = True`` is how
``blocks="auto"`` finds it. Both kinds hold their residual branch F as the submodule ``branch``; a
:class:`ResidualBlock` adds a ``shortcut`` submodule and returns ``F(x) + shortcut(x)``, a :class:`PlainBlock`
is the same block with the shortcut taken away (He et al. 2016, §4.2: "plain" counterparts have the same layers).
Keeping the branch identical is what lets depth indices and module names line up between ``plainN`` and
``resnetN``.

Each forward calls ``self.branch`` and ``self.shortcut`` exactly once, so forward hooks on them see ``F(x)`` and
the shortcut path of every call (the engine records the opt-in ``branch_var`` and ``shortcut_var`` there). The
optional post-addition activation (the original ResNet's ReLU after the sum) is its own submodule ``act``, outside
the branch; pre-activation blocks and the MLP blocks have none.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PlainBlock(nn.Module):
    """``act(branch(x))``, or ``branch(x)`` when ``act`` is None: a residual block without its shortcut."""

    gradscope_block = True

    def __init__(self, branch: nn.Module, act: nn.Module | None = None) -> None:
        super().__init__()
        self.branch = branch
        if act is not None:
            self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        act = getattr(self, "act", None)
        return out if act is None else act(out)


class ResidualBlock(nn.Module):
    """``act(branch(x) + shortcut(x))``, or the bare sum when ``act`` is None (pre-activation, residual MLP)."""

    gradscope_block = True

    def __init__(self, branch: nn.Module, shortcut: nn.Module, act: nn.Module | None = None) -> None:
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut
        if act is not None:
            self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x) + self.shortcut(x)
        act = getattr(self, "act", None)
        return out if act is None else act(out)


class PadShortcut(nn.Module):
    """Option A shortcut where the shape changes (He et al. 2016, §3.3 and §4.2).

    The identity on the first ``in_channels`` channels, taken at every ``stride``-th pixel, with zero channels
    appended up to ``out_channels``. It has no parameters, which is why option-A ResNets have exactly the
    parameters of their plain twins. Input ``(N, in_channels, H, W)`` -> ``(N, out_channels, ceil(H/s), ceil(W/s))``,
    the same output size as the branch's 3x3 convolution with padding 1 and stride ``s``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"PadShortcut cannot shrink channels: {in_channels} -> {out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sub = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads the last dims first: (W left, W right, H top, H bottom, C front, C back).
        return F.pad(sub, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"
