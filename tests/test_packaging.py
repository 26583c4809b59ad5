"""Packaging: metadata in pyproject.toml only, one version everywhere, py.typed shipped, extras per integration."""
from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest

import gradscope
from gradscope.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_metadata_lives_in_pyproject_only():
    project = _pyproject()["project"]
    assert project["name"] == "torch-gradscope" and project["dynamic"] == ["version"]
    assert project["scripts"] == {"gradscope": "gradscope.cli:main_entry"}
    assert "pyarrow>=14.0.1" in project["dependencies"]
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg.sections() == ["tool:pytest"]  # no second copy of the metadata
    assert "setup()" in (ROOT / "setup.py").read_text()


def test_each_integration_has_its_extra_and_the_tests_install_them():
    extras = _pyproject()["project"]["optional-dependencies"]
    for name in ("lightning", "transformers", "tensorboard", "wandb", "mlflow", "all", "test"):
        assert name in extras
    assert extras["all"] == ["torch-gradscope[lightning,transformers,tensorboard,wandb,mlflow]"]
    tested = {r.split(">")[0].split("=")[0] for r in extras["test"]}
    for name in ("lightning", "transformers", "accelerate", "tensorboard", "wandb", "mlflow-skinny"):
        assert name in tested
    assert not any(r.startswith(("torch", "torchvision")) for r in extras["test"])


def test_one_version_everywhere(capsys):
    from gradscope import schema

    assert gradscope.__version__ == schema.__version__
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gradscope.schema.__version__"}
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"gradscope {gradscope.__version__}"
    done = subprocess.run([sys.executable, "-m", "gradscope", "--version"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"gradscope {gradscope.__version__}"


def test_py_typed_is_package_data():
    assert (ROOT / "gradscope" / "py.typed").is_file()
    assert _pyproject()["tool"]["setuptools"]["package-data"]["gradscope"] == ["py.typed"]
