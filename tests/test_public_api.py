"""The public face: lazy functions are the real ones (real signatures), and ``import gradscope`` needs torch only."""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import gradscope
from gradscope import agreement, store
from gradscope.render import report as render_report

ROOT = Path(__file__).resolve().parents[1]


def test_lazy_functions_are_the_real_functions_with_their_signatures():
    assert gradscope.verdicts is agreement.verdicts
    assert gradscope.load is store.load
    assert gradscope.report is render_report.write_report
    from gradscope.pipeline import profile

    assert gradscope.profile is profile
    for name in ("verdicts", "load", "report", "profile"):
        params = inspect.signature(getattr(gradscope, name)).parameters
        assert "options" not in params, f"gradscope.{name} hides its arguments behind **options"
    assert "configs" in inspect.signature(gradscope.verdicts).parameters
    assert {"models", "model", "steps", "init_only", "out", "fail_on"} <= set(inspect.signature(profile).parameters)
    assert {"load", "report", "verdicts", "attach", "models"} <= set(dir(gradscope))


def test_import_and_attach_load_neither_pandas_nor_plotting():
    code = ("import sys, torch, gradscope; m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2));"
            "s = gradscope.attach(m); m(torch.randn(4, 3)).sum().backward(); s.step(); s.detach();"
            "bad = [x for x in ('pandas', 'matplotlib', 'seaborn', 'rich', 'plotly') if x in sys.modules];"
            "assert not bad, bad; from gradscope import verdicts; assert 'pandas' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT))


def test_an_unknown_attribute_is_an_attribute_error():
    try:
        gradscope.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("gradscope.no_such_thing did not raise")
