"""The "auto" rule on architectures whose blocks it used to miss (issue 26), and what it must keep picking.

The expected names are the blocks a practitioner names (the issue's table); the models are hand-built replicas of
the originals' module trees (``tests/engine/blocklike.py``), since torchvision and timm cannot be installed here.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import gradscope
from tests.engine import blocklike as B


def names(model, blocks="auto"):
    return [s.name for s in gradscope.find_blocks(model, blocks)]


def test_googlenet_gives_the_nine_inception_modules_not_their_convolutions_or_aux_heads():
    assert names(B.GoogLeNet()) == ["inception" + n for n in B.GoogLeNet.NAMES]


def test_regnet_gives_the_bottlenecks_held_as_plain_attributes():
    want = ["s1.b1", "s2.b1"] + [f"s3.b{i}" for i in range(1, 5)] + [f"s4.b{i}" for i in range(1, 8)]
    assert names(B.RegNet()) == want  # 13 blocks, lone ones included, stages and their layers not


def test_unet_gives_encoder_and_decoder_stages():
    assert names(B.UNet()) == ["inc", "down1", "down2", "down3", "up1", "up2", "up3", "outc"]


@pytest.mark.parametrize("raw_gate", [False, True], ids=["linear-gate", "parameter-gate"])
def test_mixture_of_experts_gives_the_moe_layers_and_the_experts_on_request(raw_gate):
    model = B.MoEModel(raw_gate=raw_gate)
    choice = gradscope.find_blocks(model, explain=True)
    assert [s.name for s in choice] == ["moe1", "moe2"]
    assert {s.rule for s in choice} == {"mixture"}
    experts = names(model, r".*\.experts\.\d+")
    assert experts == [f"moe{i}.experts.{e}" for i in (1, 2) for e in range(6)]
    assert names(model, B.Expert) == experts


def test_a_container_of_same_class_blocks_without_a_router_is_still_a_stage():
    """The router is what makes a mixture: the same layout without one is a stage that gives its blocks."""
    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([B.Expert(8) for _ in range(3)])

    model = nn.Sequential(Stage(), Stage())
    assert names(model) == [f"{i}.blocks.{j}" for i in range(2) for j in range(3)]


def test_multihead_attention_used_directly_is_one_block_not_its_out_proj():
    model = B.AttentionNet()
    assert names(model) == ["proj", "attn", "norm", "ff.0", "ff.2", "head"]


def test_repvgg_includes_the_stem_block():
    assert names(B.RepVGG()) == ["stem", "stages.0.0", "stages.0.1", "stages.1.0", "stages.1.1", "stages.1.2",
                                 "stages.2.0", "stages.2.1"]


def test_levit_gives_blocks_and_downsampling_units_not_their_sublayers_or_the_stem():
    want = ["stages.0.blocks.0", "stages.0.blocks.1", "stages.1.downsample", "stages.1.blocks.0",
            "stages.1.blocks.1", "stages.1.blocks.2", "stages.2.downsample"] + \
        [f"stages.2.blocks.{i}" for i in range(4)]
    assert names(B.Levit()) == want


def test_two_same_class_parts_of_a_block_do_not_make_it_a_stage():
    """GhostNet's ghost1/ghost2, a decoder layer's self- and cross-attention: parts, not a run of blocks."""
    class Ghost(nn.Module):
        def __init__(self):
            super().__init__()
            self.primary, self.cheap = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1)

    class GhostBottleneck(nn.Module):
        def __init__(self):
            super().__init__()
            self.ghost1, self.ghost2 = Ghost(), Ghost()

    model = nn.Module()
    model.blocks = nn.Sequential(GhostBottleneck(), GhostBottleneck(), GhostBottleneck())
    assert names(model) == ["blocks.0", "blocks.1", "blocks.2"]
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16), num_layers=2)
    assert names(decoder) == ["layers.0", "layers.1"]


def test_explain_names_the_rule_of_every_block_and_prints_a_table():
    choice = gradscope.find_blocks(B.RegNet(), explain=True)
    rules = {s.name: s.rule for s in choice}
    assert rules["s1.b1"] == "same-class" and rules["s3.b2"] == "repeated"
    text = str(choice)
    assert text.splitlines()[0].split() == ["block", "class", "rule", "why"]
    assert "s1.b1" in text and "same-class:" in text and "repeated:" in text
    unet = {s.name: s.rule for s in gradscope.find_blocks(B.UNet(), explain=True)}
    assert unet["inc"] == unet["outc"] == "beside"
    fallback = gradscope.find_blocks(B.AttentionNet(), explain=True)
    assert {s.rule for s in fallback} == {"own-parameters"}
    explicit = gradscope.find_blocks(B.UNet(), "down*", explain=True)
    assert {s.rule for s in explicit} == {"selector"}
    unet = B.UNet()
    assert gradscope.find_blocks(unet) == list(gradscope.find_blocks(unet, explain=True))


@pytest.mark.parametrize("build, x", [
    (B.GoogLeNet, torch.randn(2, 3, 16, 16)), (B.RegNet, torch.randn(2, 3, 32, 32)),
    (B.UNet, torch.randn(2, 3, 16, 16)), (B.MoEModel, torch.randn(8, 4)), (B.AttentionNet, torch.randn(2, 5, 4)),
    (B.RepVGG, torch.randn(2, 3, 16, 16)), (B.Levit, torch.randn(2, 3, 32, 32)),
], ids=lambda v: getattr(v, "__name__", ""))
def test_every_picked_block_records_a_forward_and_a_backward(build, x):
    """Through attach: each picked block runs and gets activation and gradient rows (none is never-run)."""
    torch.manual_seed(0)
    model = build()
    with gradscope.attach(model) as scope:
        model(x).float().pow(2).mean().backward()
        scope.step()
    frame = scope.frame()
    picked = names(model)
    assert sorted(frame[frame.metric == "act_var"].block.unique()) == sorted(picked)
    assert sorted(frame[frame.metric == "grad_norm"].block.unique()) == sorted(picked)


def test_transformer_families_keep_their_blocks():
    transformers = pytest.importorskip("transformers")
    bart = transformers.BartModel(transformers.BartConfig(
        encoder_layers=2, decoder_layers=2, d_model=16, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=50))
    assert names(bart) == ["encoder.layers.0", "encoder.layers.1", "decoder.layers.0", "decoder.layers.1"]
    t5 = transformers.T5Model(transformers.T5Config(num_layers=2, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                                                    vocab_size=50))
    assert names(t5) == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]
    vit = transformers.ViTModel(transformers.ViTConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                                       intermediate_size=32, image_size=16, patch_size=4))
    assert len(names(vit)) == 2 and all(".0" in n or ".1" in n for n in names(vit))
    torch_transformer = nn.Transformer(16, 2, 2, 2, 32)
    assert names(torch_transformer) == ["encoder.layers.0", "encoder.layers.1", "decoder.layers.0",
                                        "decoder.layers.1"]


def test_a_picked_module_that_never_runs_is_named_once_with_the_reason():
    model = B.AttentionNet()
    with pytest.warns(RuntimeWarning, match=r"'attn.out_proj' \(NonDynamicallyQuantizableLinear\): its parent "
                                            r"'attn' \(MultiheadAttention\) owns parameters .* pick 'attn' instead"):
        with gradscope.attach(model, blocks=nn.Linear) as scope:
            for _ in range(2):
                model(torch.randn(2, 5, 4)).sum().backward()
                scope.step()
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # once per scope, not every step
        warnings.simplefilter("always")
        with gradscope.attach(model, blocks=nn.Linear) as scope:
            for _ in range(3):
                model(torch.randn(2, 5, 4)).sum().backward()
                scope.step()
    assert sum("did not run" in str(w.message) for w in caught) == 1
    frame = scope.frame()
    assert "attn.out_proj" not in set(frame[frame.metric.isin(["act_var", "grad_norm"])].block)


def test_a_skipped_branch_is_named_with_the_other_reason_and_auto_blocks_all_run():
    model = B.GoogLeNet().eval()  # the auxiliary heads run only in training
    with pytest.warns(RuntimeWarning, match=r"2 picked block\(s\) did not run in recorded step 0 .*'aux1' "
                                            r"\(InceptionAux\): the forward did not call it"):
        with gradscope.attach(model, blocks=["inception3a", "aux1", "aux2"]) as scope:
            model(torch.randn(1, 3, 16, 16)).sum().backward()
            scope.step()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto's picks all run in eval mode too
        with gradscope.attach(model) as scope:
            model(torch.randn(1, 3, 16, 16)).sum().backward()
            scope.step()


# ---- what "the block's input" is for grad_in_norm ------------------------------------------------------------

class CrossBlock(nn.Module):
    """A decoder-style block: the residual stream x, and an encoder output it attends to."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.fc, self.mix = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, memory):
        return x + torch.tanh(self.fc(x) + self.mix(memory).mean(1, keepdim=True))


class DictBlock(nn.Module):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, inputs):
        return inputs["hidden_states"] + torch.tanh(self.fc(inputs["hidden_states"])) * inputs["scale"]


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 6)
        self.layers = nn.ModuleList([CrossBlock(), CrossBlock()])
        self.dicts = nn.ModuleList([DictBlock(), DictBlock()])

    def forward(self, x, src):
        memory = self.encoder(src)
        for layer in self.layers:
            x = layer(x, memory)
        for block in self.dicts:
            x = block({"scale": torch.ones(()), "hidden_states": x})
        return x


def test_grad_in_norm_is_the_residual_stream_not_the_encoder_output_and_dict_inputs_work():
    torch.manual_seed(0)
    model = Decoder()
    x, src = torch.randn(2, 3, 6, requires_grad=True), torch.randn(2, 3, 6)
    inputs = {}

    def keep(name):
        def pre(module, args):
            first = args[0]["hidden_states"] if isinstance(args[0], dict) else args[0]
            first.retain_grad()
            inputs[name] = first
        return pre

    for name in ("layers.0", "layers.1", "dicts.0", "dicts.1"):
        model.get_submodule(name).register_forward_pre_hook(keep(name))
    with gradscope.attach(model, blocks=["layers.0", "layers.1", "dicts.0", "dicts.1"]) as scope:
        model(x, src).pow(2).sum().backward()
        scope.step()
    got = scope.frame().query("metric == 'grad_in_norm'").set_index("block").value
    assert sorted(got.index) == ["dicts.0", "dicts.1", "layers.0", "layers.1"]  # a dict input has a row
    for name, t in inputs.items():
        assert got[name] == pytest.approx(t.grad.norm().item(), rel=1e-5)  # the stream alone, not + memory
