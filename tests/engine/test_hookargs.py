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
