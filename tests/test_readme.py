"""The README is short, its examples run as written, and CI runs its test command."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from gradscope.cli import main

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
RUN_CMD = "pip install torch==2.13.0 && pip install -e . && gradscope profile"
TEST_CMD = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_is_short():
    assert len(README) <= 12_000, f"README.md has {len(README)} characters; move reference material to docs/"


def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("python")
    assert len(blocks) == 2
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "report-plain20" / "report.html").exists()


_GUARD_MODEL = '''
from torch import nn


def build():
    """A deep tanh MLP with too small an initialisation: its gradients vanish toward the input."""
    layers = [nn.Flatten(), nn.Linear(3 * 64 * 64, 32)]
    for _ in range(12):
        linear = nn.Linear(32, 32)
        nn.init.normal_(linear.weight, std=0.05)
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(32, 10))
'''


def test_ci_guard_example_exits_3_on_a_vanishing_model(tmp_path, monkeypatch, capsys):
    """The README's CI guard, run as written (plus --out) on a package in the current folder."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "nets.py").write_text(_GUARD_MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    line = next(line for block in _blocks("bash") for line in block.splitlines() if "--fail-on" in line)
    argv = shlex.split(line.split("#")[0])
    assert argv[0] == "gradscope"
    assert main(argv[1:] + ["--out", str(tmp_path / "out")]) == 3
    assert "vanishing" in capsys.readouterr().err


def test_setup_commands_and_ci_agree():
    commands = [line for block in _blocks("bash") for line in block.splitlines()]
    assert RUN_CMD in commands
    assert TEST_CMD in commands
    ci = (ROOT / ".ci" / "run").read_text()
    # CI runs the README's test command, with the interpreter spelled out
    assert TEST_CMD.replace("pip ", "python3 -m pip ").replace("python -m pytest", "python3 -m pytest") in ci


def test_links_point_to_files_that_exist():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        if "://" not in link:
            assert (ROOT / link).exists(), link
