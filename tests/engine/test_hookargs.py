"""Which tensor of a block's arguments and output gradscope measures (engine/hookargs.py), on the shapes real blocks
hand their hooks: Hugging Face tuples and ``ModelOutput`` dicts, integer tensors, keyword-only inputs, lists of
earlier outputs (dense blocks), ``torch.func`` transforms."""
from __future__ import annotations

import torch

from gradscope.engine.hookargs import block_input, first_tensor, grad_inputs, primary_input, transformed


def _f(*shape, grad=False):
    return torch.randn(*shape, requires_grad=grad)


def test_first_tensor_skips_integer_tensors_and_takes_the_first_floating_one_depth_first():
    ids, hidden, attn = torch.arange(4), _f(2, 3), _f(2, 2)
    assert first_tensor((ids, (hidden, attn))) is hidden
    assert first_tensor(((hidden,), attn)) is hidden  # depth first: into the nested tuple before the next item
    assert first_tensor({"input_ids": ids, "last_hidden_state": hidden, "attentions": attn}) is hidden
    assert first_tensor([ids, ids]) is None
    assert first_tensor("text") is None and first_tensor(None) is None


def test_block_input_prefers_positional_then_hidden_states_then_any_keyword():
    x, h, other = _f(2), _f(3), _f(4)
    assert block_input((torch.arange(2), x), {"hidden_states": h}) is x
    assert block_input((), {"mask": other, "hidden_states": h}) is h
    assert block_input((), {"mask": torch.arange(3), "encoder_out": other}) is other
    assert block_input((), {}) is None


def test_primary_input_is_the_residual_stream_not_a_decoder_layers_other_inputs():
    x, enc, skip = _f(2), _f(2), _f(2)
    assert primary_input((x, enc), {}) is x
    assert primary_input((), {"encoder_hidden_states": enc, "hidden_states": x}) is x
    dense = [_f(2), _f(2)]
    assert primary_input((dense, skip), {}) is dense
    ids = (torch.arange(3),)
    assert primary_input(ids, {"mask": torch.arange(2)}) is ids  # no floating tensor anywhere: the arguments


def test_grad_inputs_are_the_primary_inputs_that_require_grad_each_once():
    a, b, frozen = _f(2, grad=True), _f(2, grad=True), _f(2)
    def ids(tensors):
        return [id(t) for t in tensors]

    assert ids(grad_inputs(([a, b, a, frozen], _f(2, grad=True)), {})) == [id(a), id(b)]  # in order, each once
    assert ids(grad_inputs((), {"hidden_states": {"other": b, "hidden_states": a}})) == [id(a)]  # the key, not first
    assert grad_inputs((frozen,), {}) == []


def test_tensors_inside_a_torch_func_transform_are_marked_transformed():
    seen = []

    def f(x):
        seen.append(transformed(x))
        return x.sum()

    torch.func.vmap(f)(torch.randn(3, 2))
    assert seen == [True] and not transformed(torch.randn(2)) and not transformed(None)


def test_a_block_returning_a_dataclass_is_measured_on_its_first_floating_field():
    """A block returning a dataclass got no activation or gradient rows and no word: the dataclass was not looked
    into. Its first floating field (in declaration order) is now what is measured, against a float64 reference."""
    import dataclasses

    import gradscope
    from torch import nn

    @dataclasses.dataclass
    class Out:
        step: int
        mask: torch.Tensor
        hidden: torch.Tensor
        extra: torch.Tensor

    ids, hidden, extra = torch.arange(3), _f(2, 3), _f(2, 3)
    assert first_tensor(Out(0, ids, hidden, extra)) is hidden
    assert first_tensor(Out) is None  # the class itself is not a value

    class Block(nn.Module):  # takes the previous block's dataclass whole, as chained blocks do
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            x = x.hidden if isinstance(x, Out) else x
            h = torch.tanh(self.fc(x))
            return Out(0, torch.zeros(2, dtype=torch.long), h, h * 0)

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block(), Block())
    x = torch.randn(5, 4)
    kept = []

    def keep(module, args, out):
        out.hidden.retain_grad()
        kept.append(out.hidden)

    model[0].register_forward_hook(keep)
    with gradscope.attach(model, blocks=["0", "1", "2"]) as scope:
        model(x).hidden.square().sum().backward()
        scope.step()
    frame = scope.frame()
    rows = frame.query("block == '0'").set_index("metric").value
    h = kept[0].detach().double()
    want_var, want_grad = torch.var(h, unbiased=False).item(), kept[0].grad.double().norm().item()
    assert abs(rows["act_var"] - want_var) <= 1e-6 * want_var
    assert abs(rows["grad_norm"] - want_grad) <= 1e-6 * want_grad
    # block 1's input is block 0's dataclass: its grad_in_norm is the gradient at block 0's hidden field
    into = frame.query("block == '1' and metric == 'grad_in_norm'").value
    assert len(into) == 1 and abs(into.item() - want_grad) <= 1e-6 * want_grad
