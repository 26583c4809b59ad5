"""The README's examples run, and CI runs the README's test command."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang: str):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("python")
    assert len(blocks) >= 2
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "report-plain20" / "report.html").exists()


def test_setup_commands_and_ci_agree():
    commands = [line for block in _blocks("bash") for line in block.splitlines()]
    run_cmd = "pip install torch==2.13.0 && pip install -e . && gradscope profile"
    test_cmd = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
    assert run_cmd in commands
    assert test_cmd in commands
    ci = (ROOT / ".ci" / "run").read_text()
    # CI runs the README's test command, with the interpreter spelled out
    assert test_cmd.replace("pip ", "python3 -m pip ").replace("python -m pytest", "python3 -m pytest") in ci


def test_public_api_is_documented_and_sorted():
    import gradscope

    assert gradscope.__all__ == sorted(gradscope.__all__)
    for name in gradscope.__all__:
        assert hasattr(gradscope, name)
        if name not in ("Site", "Scope", "NonFiniteError"):
            assert name in README, name
