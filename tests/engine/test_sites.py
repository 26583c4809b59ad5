"""Block selection: the 'auto' rule and every explicit selector form, and clear errors."""
from __future__ import annotations

import re

import pytest
from torch import nn

import gradscope
from gradscope.errors import GradscopeError, SelectorError
from tests import nets


def names(model, blocks="auto"):
    return [s.name for s in gradscope.find_blocks(model, blocks)]


def test_auto_picks_torchvision_style_blocks():
    assert names(nets.TinyResNet()) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]


def test_auto_picks_hugging_face_style_blocks():
    assert names(nets.TinyTransformer()) == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]


def test_auto_falls_back_to_leaf_modules_with_parameters():
    assert names(nets.mlp(depth=2)) == ["0", "2", "4"]


def test_auto_prefers_declared_blocks():
    class Mine(nn.Module):
        gradscope_block = True

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x)

    model = nn.Sequential(nn.Linear(3, 3), Mine(), nn.Sequential(Mine()))
    assert names(model) == ["1", "2.0"]


def test_auto_descends_through_nested_sequentials():
    model = nn.Sequential(nn.Sequential(nets.ConvBNReLU(3, 4), nets.ConvBNReLU(4, 4)),
                          nn.Sequential(nets.ConvBNReLU(4, 4), nets.ConvBNReLU(4, 4)))
    assert names(model) == ["0.0", "0.1", "1.0", "1.1"]


def test_class_tuple_glob_regex_list_predicate_and_module():
    model = nets.TinyResNet()
    assert len(names(model, nn.BatchNorm2d)) == 1 + 4 * 2 + 1  # stem, two per block, one downsample
    assert names(model, (nn.Linear,)) == ["fc"]
    assert names(model, "layer1.*.conv?") == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]
    assert names(model, r"layer\d\.\d") == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert names(model, re.compile(r"layer2\.\d\.bn2")) == ["layer2.0.bn2", "layer2.1.bn2"]
    assert names(model, ["fc", "layer1.0"]) == ["layer1.0", "fc"]  # model order, not list order
    assert names(model, [model.fc]) == ["fc"]
    assert names(model, model.layer2[1]) == ["layer2.1"]
    assert names(model, lambda n, m: n.endswith("conv2") and n.startswith("layer2")) == ["layer2.0.conv2", "layer2.1.conv2"]


def test_selector_matching_nothing_lists_module_names():
    with pytest.raises(SelectorError) as err:
        gradscope.find_blocks(nets.TinyResNet(), "encoder.*")
    message = str(err.value)
    assert "'encoder.*'" in message and "'conv1'" in message and "matched no module" in message


def test_unknown_name_suggests_close_ones():
    with pytest.raises(SelectorError, match=r"'layer1\.0\.conv3' is not in the model; did you mean .*'layer1\.0\.conv1'"):
        gradscope.find_blocks(nets.TinyResNet(), ["layer1.0.conv3"])


@pytest.mark.parametrize("bad", [3.5, object(), [1, 2]])
def test_bad_selector_types(bad):
    with pytest.raises(SelectorError, match="selector|blocks list"):
        gradscope.find_blocks(nets.mlp(), bad)


def test_not_a_module():
    with pytest.raises(GradscopeError, match="needs a torch.nn.Module, got str"):
        gradscope.attach("resnet.pt")


def test_module_from_another_model():
    with pytest.raises(SelectorError, match="not a submodule"):
        gradscope.find_blocks(nets.mlp(), [nn.Linear(2, 2)])


def test_ddp_wrapper_is_looked_through():
    class DistributedDataParallel(nn.Module):  # stands in for the real wrapper: same name, same .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert names(DistributedDataParallel(nets.TinyResNet())) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]


# ---- "auto" on the shapes of libraries we cannot install here (torchvision, timm): look-alikes of their structure

class _Conv(nn.Module):
    """A conv layer with a child activation (timm's ConvNormAct / a block's sublayer)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.act = nn.ReLU()


class _SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(4, 2, 1), nn.Conv2d(2, 4, 1)


class _MBConv(nn.Module):
    """torchvision's MBConv: a Sequential of conv sublayers with a squeeze-excite in between."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), _SqueezeExcite(),
                                   nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))


class _DepthwiseSeparable(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw, self.pw = _Conv(), _Conv()


def test_auto_keeps_a_block_alone_in_its_stage_torchvision_efficientnet_style():
    # features: stem, stages of 1, 2, 1 MBConv, head (stem and head are Sequential conv+BN, as Conv2dNormActivation)
    stem = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    model = nn.Module()
    model.features = nn.Sequential(stem, nn.Sequential(_MBConv()), nn.Sequential(_MBConv(), _MBConv()),
                                   nn.Sequential(_MBConv()), head)
    assert names(model) == ["features.1.0", "features.2.0", "features.2.1", "features.3.0"]


def test_auto_keeps_a_block_of_a_class_found_once_timm_efficientnet_style():
    # timm: blocks = Sequential(Sequential(DepthwiseSeparableConv), Sequential(IR, IR), Sequential(IR)); the first
    # stage's block is the only one of its class in the whole model
    model = nn.Module()
    model.conv_stem = nn.Conv2d(4, 4, 1)
    model.blocks = nn.Sequential(nn.Sequential(_DepthwiseSeparable()), nn.Sequential(_MBConv(), _MBConv()),
                                 nn.Sequential(_MBConv()))
    assert names(model) == ["blocks.0.0", "blocks.1.0", "blocks.1.1", "blocks.2.0"]


def test_auto_keeps_single_block_stages_held_as_attributes_resnet10_style():
    model = nets.TinyResNet()
    model.layer1, model.layer2 = nn.Sequential(model.layer1[0]), nn.Sequential(model.layer2[0])
    assert names(model) == ["layer1.0", "layer2.0"]


class _Stage(nn.Module):
    """timm's ConvNeXtStage / SwinTransformerStage: a downsample and a Sequential of blocks, not a container."""

    def __init__(self, depth):
        super().__init__()
        self.downsample = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
        self.blocks = nn.Sequential(*[nets.ConvBNReLU(4, 4) for _ in range(depth)])


def test_auto_gives_the_blocks_inside_library_stage_classes_not_the_stages():
    model = nn.Module()
    model.stem = nn.Conv2d(4, 4, 1)
    model.stages = nn.Sequential(_Stage(2), _Stage(3), _Stage(1))
    assert names(model) == ["stages.0.blocks.0", "stages.0.blocks.1", "stages.1.blocks.0", "stages.1.blocks.1",
                            "stages.1.blocks.2", "stages.2.blocks.0"]


class _BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm with an activation child."""

    def __init__(self, n):
        super().__init__(n)
        self.drop, self.act = nn.Identity(), nn.ReLU()


def test_leaf_fallback_includes_norm_layers_with_children():
    model = nn.Module()
    model.conv1, model.bn1 = nn.Conv2d(3, 4, 1), _BatchNormAct(4)
    model.conv2, model.bn2 = nn.Conv2d(4, 4, 1), _BatchNormAct(4)
    model.fc = nn.Linear(4, 2)
    assert names(model) == ["conv1", "bn1", "conv2", "bn2", "fc"]


def test_an_invalid_regex_is_called_one_not_a_pattern_that_matched_nothing():
    with pytest.raises(SelectorError, match=r"'layer\(' is not a valid regular expression \(missing \)"):
        gradscope.find_blocks(nets.TinyResNet(), "layer(")
