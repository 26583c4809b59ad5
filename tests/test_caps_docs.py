"""The runnable examples of the pages that document compare, sweep, the NaN origin, the test guard and the
optimizer-state signals run as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["testing.md", "optimizer-state.md"]


def _examples(page: str) -> list:
    text = (ROOT / "docs" / page).read_text()
    return [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "MyModel" not in b]


@pytest.mark.parametrize("page", PAGES)
def test_the_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    blocks = _examples(page)
    assert blocks, page
    for code in blocks:
        exec(compile(code, f"docs/{page}", "exec"), {"__name__": "__docs__"})
