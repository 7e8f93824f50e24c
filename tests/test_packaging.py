"""The package a user installs: one version everywhere, and the files a wheel must carry."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import ckptavg
from ckptavg.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def _changelog_version() -> str:
    text = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", text, flags=re.M)
    assert releases, "CHANGELOG.md has no release heading '## [X.Y.Z] - YYYY-MM-DD'"
    return releases[0]


def test_changelog_and_version_agree() -> None:
    out = CliRunner().invoke(cli, ["--version"]).stdout
    assert out.strip() == f"ckptavg, version {ckptavg.__version__}"
    assert _changelog_version() == ckptavg.__version__


def test_pyproject_reads_the_one_version_and_ships_py_typed() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ckptavg._version.__version__"}
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["ckptavg"]
    assert (ROOT / "ckptavg" / "py.typed").is_file()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("build") is None or importlib.util.find_spec("setuptools") is None,
                    reason="needs build and setuptools (the release extra; .ci/run installs it)")
def test_wheel_holds_every_module_and_py_typed(tmp_path: Path) -> None:
    # build from a copy: setuptools' build/ folder would otherwise stay in the source tree
    src = tmp_path / "src"
    shutil.copytree(ROOT / "ckptavg", src / "ckptavg", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("ckptavg-*.whl")
    assert wheel.name.startswith(f"ckptavg-{ckptavg.__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ckptavg").rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    assert "ckptavg/py.typed" in names
