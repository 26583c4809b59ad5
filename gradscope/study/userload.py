"""A user's own model for the CLI: ``path/to/file.py:factory`` or ``package.module:factory``."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from gradscope.errors import ModelError


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """Import the callable named by ``spec`` and wrap it so that calling it checks it returns an ``nn.Module``."""
    if ":" not in spec:
        raise ModelError(f"--model {spec!r} needs the form path/to/file.py:factory or package.module:factory")
    where, name = spec.rsplit(":", 1)
    module = _import(where, spec)
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        options = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))[:10]
        raise ModelError(f"--model {spec!r}: {where} has no callable {name!r}; callables there: {options}")

    def build() -> nn.Module:
        try:
            model = factory()
        except SystemExit as exc:
            raise ModelError(f"--model {spec!r}: calling {name}() called sys.exit({exc.code!r})") from exc
        except Exception as exc:
            raise ModelError(f"--model {spec!r}: calling {name}() raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise ModelError(f"--model {spec!r}: {name}() returned {type(model).__name__}, not a torch.nn.Module")
        return model

    return build


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


def random_data(spec: Any, n: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    """Gaussian inputs of the spec's input shape and labels over the model's output classes.

    Signal propagation at initialisation needs inputs of the right scale, not meaningful ones; the labels let the
    cross-entropy loss drive a backward pass through every block.
    """
    generator = torch.Generator().manual_seed(seed)
    shape = tuple(spec.input_shape)
    x = torch.randn((n,) + shape, generator=generator)
    from gradscope.engine.probes import first_tensor

    with torch.no_grad():
        out = first_tensor(spec.build()(x[:2]))
    if out is None:
        raise ModelError(f"the model returns no floating-point tensor for inputs of shape {shape}; gradscope "
                         f"trains it with cross-entropy on its first output tensor")
    classes = int(out.shape[-1]) if out.dim() >= 2 and out.shape[-1] >= 2 else 2
    y = torch.randint(0, classes, (n,), generator=generator)
    return torch.utils.data.TensorDataset(x, y)
