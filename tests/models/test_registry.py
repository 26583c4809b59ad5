"""The registry: every name builds a working, deterministic, self-describing network; bad input is refused."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

import gradscope.models as models
from gradscope.errors import GradscopeError, ModelError
from gradscope.models import available, build

PAPER_NAMES = [f"{family}{depth}" for family in ("plain", "resnet") for depth in (20, 32, 44, 56, 110)]
CONFIG_KEYS = {"name", "family", "residual", "bn", "shortcut", "preact", "init", "zero_init_last", "activation",
               "width", "depth", "num_blocks"}


def gradscope_blocks(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if getattr(m, "gradscope_block", False)]


def test_available_lists_the_paper_nets_and_the_families():
    names = available()
    assert names == sorted(names)
    assert set(PAPER_NAMES) | {"plain", "resnet", "mlp"} == set(names)


@pytest.mark.parametrize("name", available())
def test_every_name_trains_one_step(name):
    model = build(name, seed=0)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = model(x)
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, torch.arange(4)).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", available())
def test_config_describes_the_model(name):
    model = build(name, seed=0)
    config = model.gradscope_config
    assert CONFIG_KEYS <= set(config)
    assert config["num_blocks"] == len(gradscope_blocks(model))
    assert config["residual"] == any(hasattr(m, "shortcut") for m in model.modules()
                                     if getattr(m, "gradscope_block", False))
    assert config["bn"] == any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if config["family"] == "cifar":
        weighted = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        assert config["depth"] == len(weighted)  # option A and plain nets: 6n+2 weighted layers
        assert name in (config["name"], "plain", "resnet")
        assert config["shortcut"] == ("A" if config["residual"] else None)
    else:
        assert (config["name"], config["depth"], config["shortcut"]) == ("mlp", config["num_blocks"], None)


def test_generic_family_names_take_any_depth():
    model = build("resnet", depth=14, seed=0)
    assert model.gradscope_config["name"] == "resnet14"
    assert len(gradscope_blocks(model)) == 6
    assert build("plain", seed=0).gradscope_config["name"] == "plain20"


def test_same_seed_same_weights_and_the_global_rng_untouched():
    state = torch.get_rng_state()
    a, b, c = build("resnet20", seed=3), build("resnet20", seed=3), build("resnet20", seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.stage3[0].branch.conv1.weight, c.stage3[0].branch.conv1.weight)


def test_without_seed_the_global_rng_decides():
    torch.manual_seed(11)
    a = build("mlp", depth=2)
    torch.manual_seed(11)
    b = build("mlp", depth=2)
    assert torch.equal(a.blocks[1].branch.fc.weight, b.blocks[1].branch.fc.weight)


@pytest.mark.parametrize("bad, suggestion", [("resnt56", "resnet56"), ("plane20", "plain20"), ("MLp2", "mlp")])
def test_unknown_name_suggests_close_ones(bad, suggestion):
    with pytest.raises(ModelError) as caught:
        build(bad)
    assert isinstance(caught.value, GradscopeError)
    message = str(caught.value)
    assert repr(bad) in message and repr(suggestion) in message


def test_names_are_case_insensitive():
    assert build("ResNet20", seed=0).gradscope_config["name"] == "resnet20"
    with pytest.raises(ModelError, match="must be a string"):
        build(20)


@pytest.mark.parametrize("name, options, words", [
    ("resnet20", {"shortcutt": "A"}, ["'shortcutt'", "'shortcut'"]),
    ("plain20", {"shortcut": "A"}, ["'shortcut'", "plain20"]),
    ("resnet20", {"depth": 32}, ["depth=20", "32", "build('resnet', depth=32)"]),
    ("resnet", {"depth": 21}, ["depth=21", "6n+2"]),
    ("resnet", {"depth": 2}, ["depth=2", "6n+2"]),
    ("resnet20", {"shortcut": "D"}, ["shortcut='D'", "'A'"]),
    ("resnet20", {"init": "he"}, ["init='he'", "'kaiming'"]),
    ("mlp", {"activation": "gelu"}, ["activation='gelu'", "'tanh'"]),
    ("mlp", {"width": 0}, ["width=0"]),
    ("resnet20", {"seed": "0"}, ["seed='0'"]),
    ("plain20", {"zero_init_last": True}, ["'zero_init_last'"]),
    ("resnet20", {"bn": "False"}, ["bn='False'", "True or False"]),
    ("mlp", {"residual": 1}, ["residual=1"]),
])
def test_bad_options_are_refused_with_the_value_and_the_fix(name, options, words):
    with pytest.raises(ModelError) as caught:
        build(name, **options)
    for word in words:
        assert word in str(caught.value)


def test_models_import_only_torch():
    """The models package is imported by the hook engine's users: no pandas, seaborn, rich or numpy."""
    stdlib = set(sys.stdlib_module_names)
    for path in Path(models.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [node.module or ""]
            else:
                continue
            for root in roots:
                top = root.split(".")[0]
                assert top in stdlib or top == "torch" or root in {"gradscope.errors"} \
                    or root.startswith("gradscope.models"), f"{path.name} imports {root}"
