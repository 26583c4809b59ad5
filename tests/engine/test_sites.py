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
