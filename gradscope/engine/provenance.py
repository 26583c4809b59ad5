"""How an output folder was made: ``provenance.json`` beside the records.

Every folder gradscope writes (``attach(..., out=DIR)``, the callbacks' folders, profile reports) carries one
record: the command line, the configuration, the seeds, the versions of gradscope, torch and Python, the device
and the wall time. It is written when the run starts (``"status": "running"``) and rewritten when it ends, each
time atomically (:func:`gradscope.store.atomic_write`), so a crashed run still says how it was started.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import torch

from gradscope.schema import __version__

#: File name of the record inside an output folder.
PROVENANCE_FILE = "provenance.json"
#: Optional libraries whose versions are recorded when they are already imported (never imported here).
_TRACKED = ("lightning", "pytorch_lightning", "transformers", "wandb", "mlflow", "tensorboard", "numpy", "pandas")


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: containers recursively, non-finite floats as strings, anything else as repr."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v) for v in items]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def versions(extra: Iterable[str] = ()) -> Dict[str, str]:
    """Versions of gradscope, torch, Python and the platform, plus tracked libraries that are already imported."""
    found = {"gradscope": __version__, "torch": torch.__version__,
             "python": platform.python_version(), "platform": platform.platform()}
    for name in (*_TRACKED, *extra):
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None) if module is not None else None
        if version is None and name in extra:
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        if version is not None:
            found[name] = str(version)
    return found


def device_of(model: Optional[torch.nn.Module]) -> str:
    """The device of ``model``'s first parameter or buffer (``"cpu"`` without any), with the GPU's name."""
    tensor = None
    if model is not None:
        tensor = next(iter(model.parameters()), None)
        if tensor is None:
            tensor = next(iter(model.buffers()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _utc(seconds: float) -> str:
    return _dt.datetime.fromtimestamp(seconds, tz=_dt.timezone.utc).isoformat(timespec="seconds")


class Provenance:
    """One folder's record; :meth:`start` writes it, :meth:`finish` adds the end time, wall time and status."""

    def __init__(self, folder: Union[str, "os.PathLike[str]"], made_by: str, config: Mapping[str, Any], *,
                 seeds: Optional[Mapping[str, Any]] = None, device: Optional[str] = None,
                 libraries: Iterable[str] = (), argv: Optional[Iterable[str]] = None) -> None:
        self.path = Path(folder) / PROVENANCE_FILE
        self._start = time.time()
        self._clock = time.perf_counter()
        seeds = dict(seeds or {})
        seeds.setdefault("torch_initial_seed", torch.initial_seed())
        self.record: Dict[str, Any] = {
            "format": "gradscope-provenance", "version": 1, "made_by": made_by,
            "command": list(sys.argv if argv is None else argv), "cwd": os.getcwd(),
            "config": jsonable(config), "seeds": jsonable(seeds), "versions": versions(libraries),
            "device": device or "cpu", "started": _utc(self._start), "finished": None, "wall_s": None,
            "status": "running",
        }

    def start(self) -> Path:
        """Write the record with ``"status": "running"``; returns its path."""
        return self._write()

    def finish(self, error: Optional[BaseException] = None, **extra: Any) -> Path:
        """Rewrite the record with the end time, the wall time in seconds and ``finished``, ``interrupted`` (when
        ``interrupted=True`` is among ``extra``, or the error is a KeyboardInterrupt) or ``failed: ...``."""
        self.record["finished"] = _utc(time.time())
        self.record["wall_s"] = round(time.perf_counter() - self._clock, 6)
        stopped = isinstance(error, KeyboardInterrupt)  # Ctrl-C, or a SIGTERM the CLI turned into one: not a failure
        self.record["status"] = ("interrupted" if extra.get("interrupted") or stopped else "finished") \
            if error is None or stopped else f"failed: {type(error).__name__}: {error}"
        self.record.update(jsonable(extra))
        return self._write()

    def _write(self) -> Path:
        from gradscope.store import atomic_write

        text = json.dumps(self.record, indent=1)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))
        return self.path


def read(folder: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
    """The provenance record of an output folder."""
    return json.loads((Path(folder) / PROVENANCE_FILE).read_text())
