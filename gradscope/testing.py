"""A one-line guard for a user's own test suite: :func:`assert_healthy` fails a test when a model's signals do not
travel.

Written for pytest (a plain ``AssertionError`` with a message that names the block, the signal, the class and the
measured rate), usable from any test runner. It is the library twin of ``gradscope profile --fail-on``: one
recorded forward and backward pass on a batch the test supplies, judged by the same verdicts
(:func:`gradscope.analysis.verdicts`) that the reports show::

    import torch, gradscope.testing

    def test_my_net_trains():
        model = MyNet()
        batch = (torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
        gradscope.testing.assert_healthy(model, batch)

The model's parameters and their ``.grad`` are as they were afterwards (BatchNorm running statistics in train
mode move by one batch, as in any forward): the guard reads, it
does not train.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import torch
from torch import nn

from gradscope import schema as S
from gradscope.errors import GradscopeError
from gradscope.engine.attach import attach
from gradscope.engine.sites import BlockSelector

__all__ = ["assert_healthy", "default_loss"]

#: verdict classes that fail the guard unless ``allow=`` names them
FAILING = ("vanishing", "exploding", "diverged")
_METRICS = (S.ACT_VAR, S.ACT_NONFINITE, S.GRAD_NORM, S.GRAD_IN_NORM)


def default_loss(output: Any, targets: Optional[torch.Tensor]) -> torch.Tensor:
    """The loss when none is given: cross-entropy for integer ``targets``; with no targets, the mean log-sum-exp of
    the output over its last dimension (a loss whose gradient reaches every output unit, as a classifier's would).

    A Hugging Face style output (an object with ``.loss``) gives its own loss; with ``.logits`` those are used.
    """
    if targets is None and getattr(output, "loss", None) is not None:
        return output.loss
    logits = getattr(output, "logits", output)
    if isinstance(logits, (tuple, list)) and logits:
        logits = logits[0]
    if not isinstance(logits, torch.Tensor):
        raise GradscopeError(f"the model returned {type(output).__name__}, not a tensor: pass loss_fn=... that turns "
                             f"it into a scalar loss")
    if targets is None:
        if logits.dim() == 0:
            return logits
        return torch.logsumexp(logits.float(), dim=-1).mean()
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise GradscopeError(f"targets of dtype {targets.dtype} are not class indices: the default loss is "
                             f"cross-entropy on integer targets; pass loss_fn=(output, targets) -> loss, e.g. "
                             f"torch.nn.functional.mse_loss")
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def _split(batch: Any) -> tuple:
    """``(inputs, targets)`` of a batch: a pair is (inputs, targets); anything else is the inputs alone."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, (tuple, list)) and len(batch) != 1:
        raise GradscopeError(f"batch is a {type(batch).__name__} of {len(batch)} items: pass (inputs, targets), a "
                             f"single input tensor, or a dict of keyword inputs")
    return (batch[0] if isinstance(batch, (tuple, list)) else batch), None


def _forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def _record(model: nn.Module, batch: Any, loss_fn: Optional[Callable[..., torch.Tensor]], blocks: BlockSelector):
    """One recorded forward/backward; the model's ``.grad`` fields are restored afterwards."""
    inputs, targets = _split(batch)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise GradscopeError(f"{type(model).__name__} has no parameter that requires grad: the backward signal "
                             f"cannot be measured")
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with attach(model, blocks=blocks, metrics=_METRICS, on_nonfinite="ignore") as scope:
            output = _forward(model, inputs)
            if loss_fn is None:
                loss = default_loss(output, targets)
            else:
                loss = loss_fn(output) if targets is None else loss_fn(output, targets)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise GradscopeError(f"the loss is {type(loss).__name__} of shape "
                                     f"{tuple(getattr(loss, 'shape', ()))}, not a scalar tensor")
            loss.reshape(()).backward()
            scope.step()
        return scope.frame(), scope.first_nonfinite()
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def _failure(row: Dict[str, Any], first: Dict[str, tuple]) -> str:
    """One line: which signal, which class, where, and the measured rate (``first``: the scope's
    ``first_nonfinite()``, which knows the order a NaN travelled in)."""
    signal, verdict = row["signal"], row["verdict"]
    metric = row["metric"]
    if verdict == "diverged":
        where = first[signal][1] if signal in first else row.get("nonfinite_block")
        return (f"{signal} signal diverged: first non-finite value (NaN/Inf) of the {signal} pass at block "
                f"{where!r}")
    if verdict == "vanishing":
        where = row.get("min_block") or (row["last_block"] if signal == "forward" else row["first_block"])
        extreme = row.get("min_value")
    else:
        where = row.get("max_block") or (row["last_block"] if signal == "forward" else row["first_block"])
        extreme = row.get("max_value")
    direction = "toward the output" if signal == "forward" else "toward the input"
    factor, e2e = row.get("factor"), row.get("end_to_end")
    if isinstance(row.get("reason"), str) and row["reason"]:  # decided by the measured ends, not the fit
        return f"{signal} signal {verdict} at block {where!r} ({metric} = {extreme:.3g} there): {row['reason']}"
    return (f"{signal} signal {verdict} at block {where!r} ({metric} = {extreme:.3g} there): x{factor:.3g} per "
            f"block {direction}, x{e2e:.3g} over {row['n_blocks']} blocks ({row['first_block']!r} to "
            f"{row['last_block']!r}; {row.get('rate_text') or ''})")


def assert_healthy(model: nn.Module, batch: Any, loss_fn: Optional[Callable[..., torch.Tensor]] = None, *,
                   blocks: BlockSelector = "auto", signals: Sequence[str] = ("forward", "backward"),
                   allow: Iterable[str] = (), vanish: Optional[float] = None, explode: Optional[float] = None):
    """Fail (``AssertionError``) unless the forward signal and the backward gradient of ``model`` are healthy.

    Runs one forward and backward pass on ``batch`` with every block hooked (:func:`gradscope.attach`), then judges
    each signal with :func:`gradscope.analysis.verdicts`: ``vanishing`` / ``exploding`` (a per-block rate beyond the
    thresholds) and ``diverged`` (a NaN/Inf) fail; ``healthy`` and ``unknown`` pass. A class is given only when the
    95% interval of the fitted per-layer rate lies wholly on one side of each threshold: a net whose blocks follow
    no geometric trend (a few heterogeneous layers: conv, norm, pooling, logits) gets ``unknown``, with the reason in
    the table's ``reason`` column (and in the message when another signal fails), rather than a class read from a
    line that does not fit; where its measured ends lie beyond the whole band by more than its noise (a cliff at
    one block), the ends decide (:func:`gradscope.analysis.measured_class`). ``unknown`` also means fewer than two
    blocks with a value.

    Args:
        model: the model under test, in the mode you set (left as it was: parameters and ``.grad``).
        batch: ``(inputs, targets)``, a bare input tensor, or a dict of keyword inputs (``model(**batch)``).
        loss_fn: ``(output, targets) -> loss`` (``(output) -> loss`` for a batch without targets). Default:
            :func:`default_loss` (cross-entropy on integer targets; mean log-sum-exp of a bare output).
        blocks: which modules are blocks (see :func:`gradscope.find_blocks`).
        signals: which signals to judge: ``"forward"``, ``"backward"`` or both.
        allow: verdict classes that do not fail (e.g. ``("vanishing",)`` for a known-deep test model).
        vanish, explode: the amplitude change over 54 layers that counts as vanishing / exploding (defaults as in the
            reports: 0.1 and 10 in amplitude, i.e. 1/100 and 100x in variance).

    Returns:
        The verdicts frame (one row per signal), for further assertions of your own.
    """
    from gradscope import analysis as A  # pandas: loaded only when a guard runs

    unknown = [s for s in signals if s not in A.SIGNALS]
    if unknown or not signals:
        raise GradscopeError(f"signals={list(signals)!r}: choose from {list(A.SIGNALS)}")
    allowed = set(allow)
    bad_allow = allowed - set(FAILING)
    if bad_allow:
        raise GradscopeError(f"allow={sorted(bad_allow)!r}: choose from {list(FAILING)}")
    thresholds = {"vanish": A.VANISH if vanish is None else vanish, "explode": A.EXPLODE if explode is None
                  else explode}
    frame, first = _record(model, batch, loss_fn, blocks)
    table = A.verdicts(frame, step=None, **thresholds)
    table = table[table["signal"].isin(list(signals))].reset_index(drop=True)
    records = table.to_dict("records")
    failed = [_failure(row, first) for row in records if row["verdict"] in FAILING and row["verdict"] not in allowed]
    if failed:
        failed += [_unclear(row) for row in records if row["verdict"] == "unknown"]
        raise AssertionError(f"gradscope: {type(model).__name__} is not healthy:\n  " + "\n  ".join(failed))
    return table


def _unclear(row: Dict[str, Any]) -> str:
    """One line for a signal the guard could not judge (it does not fail the guard): why, in the verdict's words."""
    return f"({row['signal']} signal unknown, not a failure: {row.get('reason') or 'no rate could be fitted'})"
