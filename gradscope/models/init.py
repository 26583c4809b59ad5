"""Weight initialisation schemes and zero-init of residual branches.

The schemes are the ones whose signal-propagation behaviour the toolkit is built to show:

- ``"kaiming"``: He et al. 2015 (Delving Deep into Rectifiers, §2.2), ``Var(w) = gain^2 / fan_in`` with the
  gain of the activation that follows (``sqrt(2)`` for ReLU, 5/3 for tanh, 1 for linear). In a ReLU net it keeps
  the forward second moment of every layer equal to the last one's.
- ``"xavier"``: Glorot & Bengio 2010, ``Var(w) = 2 / (fan_in + fan_out)`` with gain 1, the scheme He et al.
  compare against. Where fan_in == fan_out it halves the forward second moment at every ReLU layer.
- ``"orthogonal"``: Saxe et al. 2014, a (semi-)orthogonal weight matrix (conv kernels flattened to
  ``(out, in * kh * kw)``) scaled by the activation's gain.

Biases start at zero and batch-norm layers at ``gamma = 1, beta = 0``. The classifier feeds a softmax rather
than an activation, so it gets gain 1 under every scheme.
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from gradscope.errors import ModelError
from gradscope.models.options import check_choice

SCHEMES = ("kaiming", "xavier", "orthogonal")
ACTIVATIONS = ("relu", "tanh", "linear")

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_WEIGHTED = (nn.Conv2d, nn.Linear)


def init_layer(weight_module: nn.Module, scheme: str, nonlinearity: str) -> None:
    """Initialise one Conv2d/Linear in place: weight by ``scheme`` with the gain of ``nonlinearity``, bias 0."""
    weight = weight_module.weight
    if scheme == "kaiming":
        nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity=nonlinearity)
    elif scheme == "xavier":
        nn.init.xavier_normal_(weight, gain=1.0)
    elif scheme == "orthogonal":
        nn.init.orthogonal_(weight, gain=nn.init.calculate_gain(nonlinearity))
    else:
        check_choice("init", scheme, SCHEMES)
    if weight_module.bias is not None:
        nn.init.zeros_(weight_module.bias)


def init_weights(model: nn.Module, scheme: str, activation: str, classifier: nn.Module) -> None:
    """Initialise every Conv2d, Linear and batch norm of ``model`` in place.

    Hidden layers (convolutions, projection shortcuts, hidden linears) get the gain of ``activation``; the
    ``classifier`` gets gain 1 (see the module docstring). Modules are visited in ``named_modules`` order, so
    with a fixed RNG state the result is deterministic.
    """
    check_choice("init", scheme, SCHEMES)
    check_choice("activation", activation, ACTIVATIONS)
    for module in model.modules():
        if isinstance(module, _WEIGHTED):
            init_layer(module, scheme, "linear" if module is classifier else activation)
        elif isinstance(module, _NORMS):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def last_layer(branch: nn.Module) -> nn.Module:
    """The last module with parameters in ``branch`` (a batch norm or a conv/linear), in registration order."""
    layers = [m for m in branch.modules() if isinstance(m, _NORMS + _WEIGHTED)]
    if not layers:
        raise ModelError(f"branch {type(branch).__name__} has no layer with parameters to zero-initialise")
    return layers[-1]


def zero_init_last(branches: Iterable[nn.Module]) -> None:
    """Make every residual branch output zero at init, so each residual block starts as its shortcut.

    Zeroes the last layer with parameters of each branch (Goyal et al. 2017, §5.1): the ``gamma`` of the last
    batch norm in the original block (conv-BN-ReLU-conv-BN), and the weight of the last convolution when the
    branch ends in a convolution, which is the case without batch norm and in the pre-activation block
    (BN-ReLU-conv-BN-ReLU-conv). Zeroing the pre-activation block's last BN instead would feed a ReLU with 0,
    whose gradient is 0, and the branch would never train.
    """
    for branch in branches:
        layer = last_layer(branch)
        nn.init.zeros_(layer.weight)
        if getattr(layer, "bias", None) is not None:
            nn.init.zeros_(layer.bias)
