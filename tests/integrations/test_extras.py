"""Optional integrations stay optional: gradscope never imports them on its own, and a missing library gives one
line naming the extra that installs it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = {"lightning": "lightning", "transformers": "transformers", "tensorboard": "tensorboard",
          "wandb": "wandb", "mlflow": "mlflow"}


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_and_attach_leave_the_integrations_out():
    out = _python(
        "import sys, json, torch, gradscope\n"
        "m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))\n"
        "with gradscope.attach(m) as s:\n"
        "    m(torch.randn(2, 3)).sum().backward(); s.step()\n"
        "    s.frame()\n"
        "names = ['lightning', 'pytorch_lightning', 'transformers', 'wandb', 'mlflow', 'tensorboard',\n"
        "         'torch.utils.tensorboard', 'gradscope.integrations']\n"
        "print(json.dumps([n for n in names if n in sys.modules]))\n")
    assert json.loads(out) == []


def test_a_missing_library_names_its_extra_in_one_line():
    code = (
        "import sys, json\n"
        f"extras = {EXTRAS!r}\n"
        "out = {}\n"
        "for module, extra in extras.items():\n"
        "    saved = {k: v for k, v in sys.modules.items() if k == module or k.startswith(module + '.')}\n"
        "    sys.modules[module] = None  # the library cannot be imported\n"
        "    try:\n"
        "        __import__('gradscope.integrations.' + extra)\n"
        "        out[extra] = 'imported'\n"
        "    except ImportError as exc:\n"
        "        from gradscope.integrations import MissingExtraError\n"
        "        out[extra] = [type(exc) is MissingExtraError, str(exc)]\n"
        "    del sys.modules[module]\n"
        "    sys.modules.update(saved)\n"
        "print(json.dumps(out))\n")
    got = json.loads(_python(code))
    for extra in EXTRAS:
        is_ours, message = got[extra]
        assert is_ours, (extra, message)
        assert "\n" not in message
        assert message.endswith(f"pip install 'torch-gradscope[{extra}]'"), message
        assert message.startswith(f"gradscope.integrations.{extra} needs")
