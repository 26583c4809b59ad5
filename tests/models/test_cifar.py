"""The CIFAR nets against He et al. 2016: Table 6 sizes, layout, shortcuts, plain/residual twins, init options."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gradscope.errors import ModelError
from gradscope.models import PadShortcut, PlainBlock, ResidualBlock, build

DEPTHS = (20, 32, 44, 56, 110)
#: Table 6 of He et al. 2016, option A, in millions, to the precision the paper prints.
TABLE_6 = {20: (0.27, 2), 32: (0.46, 2), 44: (0.66, 2), 56: (0.85, 2), 110: (1.7, 1)}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def closed_form_count(depth: int, width: int = 16, classes: int = 10, in_channels: int = 3) -> int:
    """Parameters of the option-A net with BN, from the architecture in §4.2 (convs without bias)."""
    n = (depth - 2) // 6
    w1, w2, w3 = width, 2 * width, 4 * width
    convs = 9 * (in_channels * w1 + 2 * n * w1 * w1 + w1 * w2 + (2 * n - 1) * w2 * w2
                 + w2 * w3 + (2 * n - 1) * w3 * w3)
    norms = 2 * (w1 + 2 * n * (w1 + w2 + w3))  # gamma and beta of every BN
    return convs + norms + w3 * classes + classes


def blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "gradscope_block", False)]


@pytest.mark.parametrize("depth", DEPTHS)
def test_parameter_counts_match_table_6(depth):
    resnet, plain = build(f"resnet{depth}", seed=0), build(f"plain{depth}", seed=0)
    value, digits = TABLE_6[depth]
    assert round(count(resnet) / 1e6, digits) == value
    assert count(resnet) == closed_form_count(depth)
    assert count(plain) == count(resnet)
    assert count(build(f"plain{depth}", bn=False)) == count(build(f"resnet{depth}", bn=False))


def test_projection_shortcuts_add_exactly_their_1x1_convs():
    base = count(build("resnet20"))
    # B: two projections (16->32, 32->64) with BN; C: one on each of the 9 blocks.
    assert count(build("resnet20", shortcut="B")) - base == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    per_stage = [16 * 16 + 2 * 16, 32 * 32 + 2 * 32, 64 * 64 + 2 * 64]
    c_extra = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64) + 3 * per_stage[0] + 2 * per_stage[1] + 2 * per_stage[2]
    assert count(build("resnet20", shortcut="C")) - base == c_extra


@pytest.mark.parametrize("depth", (20, 56))
@pytest.mark.parametrize("options", [{}, {"bn": False}, {"preact": True}, {"preact": True, "bn": False}])
def test_plain_and_residual_names_line_up(depth, options):
    for shortcut in ("A", "B", "C"):
        residual = [n for n, _ in build(f"resnet{depth}", shortcut=shortcut, **options).named_modules()
                    if "shortcut" not in n]
        plain = [n for n, _ in build(f"plain{depth}", **options).named_modules()]
        assert plain == residual


def test_stage_layout_and_feature_map_sizes():
    model = build("resnet20", seed=0)
    names = [n for n, m in model.named_modules() if getattr(m, "gradscope_block", False)]
    assert names == [f"stage{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    shapes = {}
    for name in ("stem", "stage1", "stage2", "stage3"):
        getattr(model, name).register_forward_hook(lambda m, a, out, name=name: shapes.__setitem__(name, out.shape))
    model(torch.randn(2, 3, 32, 32))
    assert shapes == {"stem": (2, 16, 32, 32), "stage1": (2, 16, 32, 32), "stage2": (2, 32, 16, 16),
                      "stage3": (2, 64, 8, 8)}
    strides = [m.branch.conv1.stride[0] for m in blocks(model)]
    assert strides == [1, 1, 1, 2, 1, 1, 2, 1, 1]


@pytest.mark.parametrize("shortcut, expected", [
    ("A", ["Identity"] * 3 + ["PadShortcut"] + ["Identity"] * 2 + ["PadShortcut"] + ["Identity"] * 2),
    ("B", ["Identity"] * 3 + ["Sequential"] + ["Identity"] * 2 + ["Sequential"] + ["Identity"] * 2),
    ("C", ["Sequential"] * 9),
])
def test_shortcut_options(shortcut, expected):
    model = build("resnet20", shortcut=shortcut, seed=0)
    assert [type(b.shortcut).__name__ for b in blocks(model)] == expected
    for block in blocks(model):
        if isinstance(block.shortcut, nn.Sequential):
            assert [n for n, _ in block.shortcut.named_children()] == ["conv", "bn"]
            assert block.shortcut.conv.kernel_size == (1, 1)
            assert block.shortcut.conv.stride == block.branch.conv1.stride


def test_pad_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 32, 32)
    out = PadShortcut(16, 32, 2)(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])
    assert not out[:, 16:].any()


def test_block_structure_and_forward():
    model = build("resnet20", seed=0)
    block = model.stage2[0]
    assert isinstance(block, ResidualBlock) and block.gradscope_block
    assert [n for n, _ in block.branch.named_children()] == ["conv1", "bn1", "act1", "conv2", "bn2"]
    assert [n for n, _ in block.named_children()] == ["branch", "shortcut", "act"]
    x = torch.randn(3, 16, 32, 32)
    assert torch.allclose(block(x), torch.relu(block.branch(x) + block.shortcut(x)))
    plain_block = build("plain20", seed=0).stage2[0]
    assert isinstance(plain_block, PlainBlock) and not hasattr(plain_block, "shortcut")
    assert torch.allclose(plain_block(x), torch.relu(plain_block.branch(x)))


def test_branch_and_shortcut_are_called_once_per_forward():
    model = build("resnet20", shortcut="B", seed=0)
    calls = {}
    for name, module in model.named_modules():
        if name.endswith(("branch", "shortcut", "act")):
            module.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    model(torch.randn(2, 3, 32, 32))
    assert len(calls) == 3 * 9 + 1  # branch, shortcut, act per block, and the stem's act
    assert set(calls.values()) == {1}


def test_no_module_is_used_twice():
    for model in (build("resnet56"), build("resnet20", preact=True), build("mlp", depth=4)):
        everything = [m for _, m in model.named_modules(remove_duplicate=False)]
        assert len(everything) == len({id(m) for m in everything})


def test_preact_variant():
    model = build("resnet20", preact=True, seed=0)
    block = model.stage2[0]
    assert [n for n, _ in block.branch.named_children()] == ["bn1", "act1", "conv1", "bn2", "act2", "conv2"]
    assert not hasattr(block, "act")
    assert block.branch.bn1.num_features == 16
    x = torch.randn(3, 16, 32, 32)
    assert torch.allclose(block(x), block.branch(x) + block.shortcut(x))
    assert [n for n, _ in model.stem.named_children()] == ["conv"]
    assert [n for n, _ in model.head.named_children()] == ["bn", "act", "pool", "flatten", "fc"]
    assert model.gradscope_config["preact"] is True


def test_bn_switch():
    with_bn, without = build("resnet20", seed=0), build("resnet20", bn=False, seed=0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in without.modules())
    assert all(m.bias is None for m in with_bn.modules() if isinstance(m, nn.Conv2d))
    assert all(m.bias is not None for m in without.modules() if isinstance(m, nn.Conv2d))
    assert isinstance(without.stage1[0].branch.bn1, nn.Identity)


def test_width_classes_and_channels():
    model = build("resnet", depth=8, width=8, num_classes=7, in_channels=1, seed=0)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert [b.branch.conv2.out_channels for b in blocks(model)] == [8, 16, 32]
    assert model.gradscope_config["width"] == 8
    with pytest.raises(ModelError, match=r"\(N, 1, H, W\)"):
        model(torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize("scheme", ["kaiming", "xavier", "orthogonal"])
def test_init_schemes(scheme):
    """Weight statistics per layer against each paper's formula; a wrong fan mode or gain is off by 2x or more."""
    model = build("resnet56", init=scheme, shortcut="C", bn=False, seed=0)
    fc = model.head.fc
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        w = module.weight.detach().flatten(1)
        if isinstance(module, nn.Conv2d):
            taps = module.kernel_size[0] * module.kernel_size[1]
            fan_in, fan_out = module.in_channels * taps, module.out_channels * taps
        else:
            fan_in, fan_out = module.in_features, module.out_features
        gain2 = 1.0 if module is fc else 2.0
        assert not module.bias.any(), name
        if scheme == "orthogonal":
            rows = min(w.shape)
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            assert torch.allclose(gram, gain2 * torch.eye(rows), atol=1e-4), name
            continue
        expected = gain2 / fan_in if scheme == "kaiming" else 2.0 / (fan_in + fan_out)
        tolerance = 5 * (2 / w.numel()) ** 0.5  # five standard errors of a sample variance
        assert abs(w.var().item() / expected - 1) < tolerance, name


def test_norm_layers_start_at_identity():
    model = build("resnet20", seed=0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert (module.weight == 1).all() and not module.bias.any()


@pytest.mark.parametrize("options, zeroed", [
    ({}, "bn2.weight"),  # the last BN's gamma
    ({"bn": False}, "conv2.weight"),  # no BN: the last conv
    ({"preact": True}, "conv2.weight"),  # pre-activation branches end in a conv
    ({"shortcut": "B"}, "bn2.weight"),
])
def test_zero_init_last(options, zeroed):
    model = build("resnet20", zero_init_last=True, seed=0, **options)
    assert model.gradscope_config["zero_init_last"] is True
    outputs = []
    for block in blocks(model):
        assert not block.branch.get_parameter(zeroed).any()
        block.branch.register_forward_hook(lambda m, a, out: outputs.append(out))
    x = torch.randn(4, 3, 32, 32)
    model(x).logsumexp(dim=1).sum().backward()
    assert len(outputs) == 9 and all(not out.any() for out in outputs)
    for block in blocks(model):  # the zeroed layer still learns
        assert block.branch.get_parameter(zeroed).grad.abs().sum() > 0
    untouched = build("resnet20", seed=0, **options)
    assert untouched.stage1[0].branch.get_parameter(zeroed).any()
