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
    for name in ("lightning", "transformers", "tensorboard", "wandb", "mlflow", "ray", "all", "test"):
        assert name in extras
    assert extras["all"] == ["torch-gradscope[lightning,transformers,tensorboard,wandb,mlflow,ray]"]
    tested = {r.split(">")[0].split("=")[0] for r in extras["test"]}
    for name in ("lightning", "transformers", "accelerate", "tensorboard", "wandb", "mlflow-skinny", "ray"):
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


def test_licence_classifiers_and_project_urls():
    project = _pyproject()["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in licence
    assert "Framework :: Pytest" not in project["classifiers"]  # marks pytest plugins; gradscope is not one
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # PEP 639: `license` says it
    assert {"Homepage", "Documentation", "Source", "Issues", "Changelog"} <= set(project["urls"])
    assert all(u.startswith("https://") for u in project["urls"].values())


def test_changelog_and_citation_name_this_version():
    yaml = pytest.importorskip("yaml")  # PyYAML comes with mkdocs, in the test extra
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and f"## [{gradscope.__version__}]" in changelog
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["version"] == gradscope.__version__
    assert citation["license"] == "MIT" and citation["authors"] and citation["title"]


def test_docs_extra_builds_the_site_and_the_tests_install_it():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert extras["docs"] == ["mkdocs>=1.6", "mkdocstrings[python]>=0.26"]
    assert set(extras["docs"]) <= set(extras["test"])
    assert (ROOT / "mkdocs.yml").is_file()


def test_the_wheel_carries_the_licence_and_metadata(tmp_path):
    """Build the wheel from a copy of the sources (no dependencies, no network) and read its METADATA."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    shutil.copytree(ROOT / "gradscope", src / "gradscope", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "setup.cfg", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(tmp_path.glob("torch_gradscope-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in meta and "Framework :: Pytest" not in meta
    assert "Project-URL: Changelog, " in meta
