"""Building vitexp: quiet (no setuptools warnings before `make quickstart` trains) and whole
(a wheel carries every config and preset)."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement

from tests.helpers import REPO


@pytest.mark.slow
def test_the_wheel_builds_without_warnings_and_carries_every_config(tmp_path):
    # The environment's setuptools, not a download: the same checks as an isolated build with
    # a setuptools new enough for pyproject.toml (>= 77, for the SPDX license string).
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(tmp_path),
         str(REPO)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    # setuptools' warnings (a license table, config folders taken for undeclared packages) are
    # Python warnings of classes named *Warning; distutils' own "warning: byte-compiling is
    # disabled" notes (PYTHONDONTWRITEBYTECODE) are not about the project.
    warnings = sorted({m.group(0) for m in re.finditer(r"\w*Warning: [^\n]*", log)})
    assert warnings == []
    (wheel,) = tmp_path.glob("vitexp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {
        f"vitexp/_conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")
    }
    presets = {f"vitexp/_experiments/{p.name}" for p in (REPO / "experiments").glob("*.yaml")}
    assert len(configs) > 40 and "vitexp/_conf/config.yaml" in configs
    assert configs | presets | {"vitexp/_experiments/README.md"} <= names
    metadata = zipfile.ZipFile(wheel).read("vitexp-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: MIT" in metadata.splitlines()


def test_the_build_requires_a_setuptools_that_reads_the_license_string():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    (setuptools,) = [
        Requirement(r) for r in project["build-system"]["requires"] if r.startswith("setuptools")
    ]
    # PEP 639 license expressions need setuptools 77; an older one fails on the string.
    assert not setuptools.specifier.contains("76.1") and setuptools.specifier.contains("77.0")
