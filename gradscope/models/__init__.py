"""The paper's networks: plain and residual CIFAR nets (He et al. 2016) and deep MLPs, built by name.

Imports only torch. ``build(name, **options)`` returns an initialised ``nn.Module`` with a
``gradscope_config`` dict; ``available()`` lists the names. Blocks carry ``gradscope_block = True``.
"""
from __future__ import annotations

from gradscope.models.blocks import PadShortcut, PlainBlock, ResidualBlock
from gradscope.models.cifar import CifarNet
from gradscope.models.mlp import MLP
from gradscope.models.registry import available, build, facts

__all__ = ["MLP", "CifarNet", "PadShortcut", "PlainBlock", "ResidualBlock", "available", "build", "facts"]
