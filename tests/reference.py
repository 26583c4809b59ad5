"""Independent references for the engine's metrics: plain autograd on the same model and batch, no gradscope code.

Gradients w.r.t. a block's output come from a *probe leaf*: a forward hook returns ``output + z`` where ``z`` is a
zero tensor that requires grad, so ``z.grad`` is d loss / d output no matter what later modifies the output in
place. The same trick on the input (a forward pre-hook returning ``x + z_in``) gives d loss / d input. Moments are
computed in float64 with ``torch.var`` / ``torch.mean`` on a clone taken inside the hook.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn


def _first(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            f = _first(v)
            if f is not None:
                return f
    if isinstance(value, dict):
        return _first(list(value.values()))
    return None


def _replace_first(value, new):
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, tuple):
        return (new,) + tuple(value[1:])
    if isinstance(value, list):
        return [new] + list(value[1:])
    raise TypeError(type(value))


def reference_metrics(model: nn.Module, names: List[str], run: Callable[[nn.Module], torch.Tensor],
                      grad_in: bool = True) -> Dict[Tuple[str, int, str], float]:
    """``{(block, call, metric): value}`` for the named modules of a deep copy of ``model``.

    ``run(model)`` must do one forward pass and return the loss; backward is called here.
    """
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    records: Dict[Tuple[str, int, str], float] = {}
    probes: List[Tuple[str, int, str, torch.Tensor]] = []
    calls: Dict[str, int] = {}
    handles = []
    for name in names:
        module = modules[name]

        def pre(mod, args, kwargs, name=name):
            calls[name] = calls.get(name, -1) + 1
            key = None
            if args and isinstance(args[0], torch.Tensor):
                x = args[0]
            else:
                key = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
                x = kwargs[key] if key is not None else None
            if grad_in and x is not None and x.requires_grad and torch.is_grad_enabled():
                z = torch.zeros_like(x, requires_grad=True)
                probes.append((name, calls[name], "grad_in_norm", z))
                if key is None:
                    return (x + z,) + tuple(args[1:]), kwargs
                return args, {**kwargs, key: x + z}
            return None

        def post(mod, args, output, name=name):
            call = calls[name]
            y = _first(output)
            v = y.detach().double().clone()
            n = v.numel()
            records[(name, call, "act_mean")] = v.mean().item()
            records[(name, call, "act_var")] = torch.var(v, unbiased=False).item()
            records[(name, call, "act_rms")] = math.sqrt((v * v).mean().item())
            records[(name, call, "act_zero_frac")] = (v == 0).sum().item() / n
            records[(name, call, "act_nonfinite")] = float((~torch.isfinite(v)).sum().item())
            if y.requires_grad:
                z = torch.zeros_like(y, requires_grad=True)
                probes.append((name, call, "grad_norm", z))
                return _replace_first(output, y + z)
            return None

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    try:
        loss = run(model)
        leaves = [p[3] for p in probes]
        params = {n: [p for p in modules[n].parameters()] for n in names}
        all_params = [p for ps in params.values() for p in ps if p.requires_grad]
        unique = list({id(p): p for p in all_params}.values())
        grads = torch.autograd.grad(loss, leaves + unique, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for (name, call, metric, _), g in zip(probes, grads[:len(leaves)]):
        if g is not None:
            records[(name, call, metric)] = g.double().norm().item()
    grad_of = {id(p): g for p, g in zip(unique, grads[len(leaves):])}
    for name in names:
        ps = params[name]
        if ps:
            records[(name, 0, "param_norm")] = math.sqrt(sum(p.detach().double().pow(2).sum().item() for p in ps))
            gs = [grad_of.get(id(p)) for p in ps]
            gs = [g for g in gs if g is not None]
            if gs:
                records[(name, 0, "param_grad_norm")] = math.sqrt(sum(g.double().pow(2).sum().item() for g in gs))
    return records


def measured(frame, step: int = 0) -> Dict[Tuple[str, int, str], float]:
    rows = frame[frame["step"] == step]
    return {(b, int(c), m): float(v) for b, c, m, v in zip(rows["block"], rows["call"], rows["metric"], rows["value"])}


def assert_matches(got: Dict, want: Dict, rtol: float = 1e-5, atol: float = 1e-7,
                   skip: Tuple[str, ...] = ("branch_var", "shortcut_var", "update_ratio", "batch_size")) -> int:
    """Every reference value has a measured twin within tolerance and vice versa; returns how many were compared.

    ``batch_size`` (one row per step, a shape, not a reduction) is checked against the batch fed in
    tests/analysis/test_units_and_batch.py."""
    got_keys = {k for k in got if k[2] not in skip}
    assert got_keys == set(want), (sorted(got_keys - set(want))[:10], sorted(set(want) - got_keys)[:10])
    for key, ref in want.items():
        value = got[key]
        # a mean near zero is only known to float32 rounding of the values' scale (their rms)
        scale = want.get((key[0], key[1], "act_rms"), 0.0) if key[2] == "act_mean" else 0.0
        assert math.isclose(value, ref, rel_tol=rtol, abs_tol=max(atol, rtol * scale)), (key, value, ref)
    return len(want)
