"""How a run feeds its model and what it minimises: the ``--model FILE.py:factory`` contract.

The factory returns either an ``nn.Module``, with the file's module-level ``loss``, ``batches`` and ``forward``
functions (each optional), or a dict ``{"model": module, "loss": ..., "batches": ..., "forward": ...}`` that holds
everything (the file's functions are then not used). Each is optional:

* ``batches(batch_size: int, seed: int) -> iterable of batches`` (a batch is anything: a tensor, a tuple
  ``(inputs, targets)``, a dict). Called again when it runs out. Default: Gaussian inputs of ``--input-shape`` with
  integer labels over the last dimension of the model's output.
* ``forward(model, batch) -> output``. Default: ``model(batch[0])`` for a tuple or list, ``model(batch)`` for a
  tensor or a dict (a model taking dicts).
* ``loss(output, batch) -> scalar tensor``. Default: cross-entropy of the first output tensor's last dimension
  against ``batch[1]`` when that holds integers (classifiers, sequence models ``(B, T, vocab)`` against
  ``(B, T)``), mean squared error when it holds floats (regressors).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from gradscope.engine.hookargs import first_tensor
from gradscope.errors import ModelError

#: The contract's page, named in every error about it.
DOCS = "see docs/cli.md, 'Your own model'"
#: Names a model file or a factory's dict may give.
PARTS = ("loss", "batches", "forward")


@dataclass(frozen=True)
class Task:
    """A user's ``batches``, ``forward`` and ``loss`` (None: the default described in the module docstring)."""

    batches: Optional[Callable[[int, int], Any]] = None
    loss: Optional[Callable[[Any, Any], torch.Tensor]] = None
    forward: Optional[Callable[[nn.Module, Any], Any]] = None


CLASSIFIER = Task()


def run_forward(task: Optional[Task], model: nn.Module, batch: Any) -> Any:
    """The model's output for ``batch``."""
    if task is not None and task.forward is not None:
        return task.forward(model, batch)
    return model(batch[0]) if isinstance(batch, (tuple, list)) else model(batch)


def loss_of(task: Optional[Task], output: Any, batch: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(loss, accuracy or None)``: the user's loss, else cross-entropy on integer targets or MSE on floats."""
    if task is not None and task.loss is not None:
        loss = task.loss(output, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ModelError(f"loss(output, batch) returned {type(loss).__name__}"
                             f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}, not a scalar tensor")
        return loss.reshape(()), None
    out = first_tensor(output)
    target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
    if out is None or not isinstance(target, torch.Tensor):
        raise ModelError("gradscope cannot tell which loss to train this model with: give loss(output, batch) in "
                         f"the model file or the factory's dict ({DOCS})")
    if target.is_floating_point():
        return nn.functional.mse_loss(out, target.reshape(out.shape).to(out.dtype)), None
    logits = out.reshape(-1, out.shape[-1])
    if logits.shape[0] != target.numel():
        raise ModelError(f"the output {tuple(out.shape)} does not match the targets {tuple(target.shape)} for "
                         f"cross-entropy over its last dimension; give loss(output, batch) ({DOCS})")
    target = target.reshape(-1)
    return nn.functional.cross_entropy(logits, target), (logits.argmax(1) == target).float().mean()


def move(batch: Any, to: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``to`` applied to every tensor in it (tuples, lists and dicts kept)."""
    if isinstance(batch, torch.Tensor):
        return to(batch)
    if isinstance(batch, dict):
        return {k: move(v, to) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move(v, to) for v in batch)
    return batch


def user_batches(task: Task, batch_size: int, seed: int) -> Iterator[Any]:
    """The user's ``batches(batch_size, seed)`` without end (called again when one pass runs out)."""
    while True:
        yielded = False
        for batch in task.batches(batch_size, seed):
            yielded = True
            yield batch
        if not yielded:
            raise ModelError(f"batches({batch_size}, {seed}) yielded nothing")


def random_data(model: nn.Module, shape: Tuple[int, ...], n: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    """Gaussian inputs of ``shape`` (one example) and integer labels over the model's output classes.

    Signal propagation at initialisation needs inputs of the right scale, not meaningful ones; the labels let the
    cross-entropy loss drive a backward pass through every block. An output ``(B, T, classes)`` gets labels
    ``(B, T)``.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((n,) + tuple(shape), generator=generator)
    try:
        with torch.no_grad():
            out = first_tensor(model(x[:2]))
    except Exception as exc:  # the user's model: report what it said, and the way out
        raise ModelError(f"the model rejects inputs of shape {tuple(shape)}: {type(exc).__name__}: {exc}; pass "
                         f"--input-shape, or give batches(batch_size, seed) ({DOCS})") from exc
    if out is None:
        raise ModelError(f"the model returns no floating-point tensor for inputs of shape {tuple(shape)}; give "
                         f"loss(output, batch) ({DOCS})")
    classes = int(out.shape[-1]) if out.dim() >= 2 and out.shape[-1] >= 2 else 2
    y = torch.randint(0, classes, (n,) + tuple(out.shape[1:-1]), generator=generator)
    return torch.utils.data.TensorDataset(x, y)


def load_task(spec: Any) -> Tuple[Callable[[], nn.Module], Task]:
    """Import the factory named by ``spec`` (or take ``spec`` itself when it is callable); return a builder that
    checks it gets an ``nn.Module``, and the task.

    The factory is called once here to see what it returns (a module, or a dict with ``"model"``).
    """
    if callable(spec):
        factory, name, module = spec, getattr(spec, "__name__", "factory"), None
    elif not isinstance(spec, str) or ":" not in spec:
        raise ModelError(f"--model {spec!r} needs the form path/to/file.py:factory or package.module:factory")
    else:
        where, name = spec.rsplit(":", 1)
        module = _import(where, spec)
        factory = getattr(module, name, None)
        if factory is None or not callable(factory):
            options = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))[:10]
            raise ModelError(f"--model {spec!r}: {where} has no callable {name!r}; callables there: {options}")

    def call() -> Tuple[Dict[str, Any], bool]:
        """What the factory made, as parts, and whether it returned them as a dict."""
        try:
            made = factory()
        except SystemExit as exc:
            raise ModelError(f"--model {spec!r}: calling {name}() called sys.exit({exc.code!r})") from exc
        except Exception as exc:
            raise ModelError(f"--model {spec!r}: calling {name}() raised {type(exc).__name__}: {exc}") from exc
        parts = dict(made) if isinstance(made, dict) else {"model": made}
        if not isinstance(parts.get("model"), nn.Module):
            what = ("dict without a 'model' entry" if isinstance(made, dict) and "model" not in made
                    else type(parts.get("model")).__name__)
            raise ModelError(f"--model {spec!r}: {name}() returned {what}, not a torch.nn.Module (or a dict "
                             f"{{'model': module, 'loss': ..., 'batches': ...}}; {DOCS})")
        unknown = sorted(set(parts) - {"model", *PARTS})
        if unknown:
            raise ModelError(f"--model {spec!r}: {name}() returned a dict with {unknown}; it may hold 'model', "
                             f"{', '.join(repr(p) for p in PARTS)}")
        return parts, isinstance(made, dict)

    first, as_dict = call()  # a dict holds everything; with a bare module, the file's own functions apply
    given = {p: first.get(p) if as_dict else getattr(module, p, None) for p in PARTS}
    for part, fn in given.items():
        if fn is not None and not callable(fn):
            raise ModelError(f"--model {spec!r}: {part} is a {type(fn).__name__}, not a function ({DOCS})")
    return (lambda: call()[0]["model"]), Task(**given)


def _import(where: str, spec: str) -> Any:
    try:
        if where.endswith(".py") or "/" in where or Path(where).suffix == ".py":
            path = Path(where)
            if not path.is_file():
                raise ModelError(f"--model {spec!r}: no such file {str(path)!r}")
            module_spec = importlib.util.spec_from_file_location(f"gradscope_user_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
            return module
        _cwd_importable()
        return importlib.import_module(where)
    except ModelError:
        raise
    except SystemExit as exc:  # a script-style module that exits at import: say so rather than exit with it
        raise ModelError(f"--model {spec!r}: importing {where} called sys.exit({exc.code!r}); guard the script "
                         f"part of that file with if __name__ == '__main__':") from exc
    except Exception as exc:  # SyntaxError, ImportError, whatever the user's module raises at import
        raise ModelError(f"--model {spec!r}: importing {where} failed: {type(exc).__name__}: {exc}") from exc


def _cwd_importable() -> None:
    """Make the current folder importable, as ``python -m`` does (the ``gradscope`` console script does not)."""
    cwd = os.getcwd()
    if not any(entry in ("", cwd) or _same(entry, cwd) for entry in sys.path):
        sys.path.insert(0, cwd)


def _same(entry: str, cwd: str) -> bool:
    try:
        return os.path.samefile(entry, cwd)
    except OSError:
        return False
