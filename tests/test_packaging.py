"""pyproject.toml stays buildable by the setuptools a machine already has.

The extension is built with the installed setuptools (`python setup.py build_ext --inplace` in
scripts/gpu_check.sh, `pip install --no-build-isolation -e .` in scripts/setup.sh); the GPU machine's
cannot be upgraded. setuptools before 77 rejects the whole file when `project.license` is a string
(the PEP 639 form), so the license is the LICENSE file alone.
"""

import pathlib

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_pyproject_has_no_license_key_that_old_setuptools_refuses():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "license" not in project and "license-files" not in project
    assert "MIT License" in (ROOT / "LICENSE").read_text()


def test_build_requirements_name_the_oldest_setuptools_that_reads_the_file():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert "setuptools>=64" in requires  # 61 reads [project]; 64 builds editable installs (PEP 660)
