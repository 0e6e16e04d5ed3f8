"""What an install gives: the core install stays free of Qt (napari and Qt come only through the
napari extra), and CI runs exactly the README's test command, with the napari extra, so the
widget tests run there."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Distributions (and top-level modules) that bring Qt or napari.
QT = ("qt", "pyqt", "pyside", "napari", "magicgui", "vispy", "superqt", "qtpy")


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.\-]+", requirement.strip()).group().lower()


def _extra(requirement: str) -> str | None:
    """The extra a requirement belongs to (None: the core install)."""
    _, _, marker = requirement.partition(";")
    found = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
    return found.group(1) if found else None


def _brings_qt(name: str) -> bool:
    return any(name.startswith(prefix) for prefix in QT)


def test_core_requirements_name_no_qt_and_the_napari_extra_has_the_widget_stack():
    requirements = importlib.metadata.requires("emsynth") or []
    core = [_name(r) for r in requirements if _extra(r) is None]
    assert "torch" in core and "numpy" in core  # the metadata was read
    assert [n for n in core if _brings_qt(n)] == []
    napari = {_name(r) for r in requirements if _extra(r) == "napari"}
    assert {"napari", "magicgui", "npe2", "pytest-qt", "pytest-xvfb"} <= napari


def test_importing_emsynth_and_its_cli_loads_no_qt_module():
    probe = ("import sys, emsynth, emsynth.cli, emsynth.napari.compute\n"
             "print(' '.join(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=300, check=True)
    modules = done.stdout.split()
    assert "emsynth.cli" in modules and "emsynth.napari.compute" in modules
    assert [m for m in modules if _brings_qt(m.split(".")[0].lower())] == []


def test_ci_runs_the_readme_test_command_with_the_napari_extra():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    start, end = ci.index("# --- README test command ---"), ci.index("# --- end ---")
    assert end == start + 2
    command = ci[start + 1]
    assert command in (ROOT / "README.md").read_text().splitlines()
    extras = re.search(r"-e '\.\[([a-z,]+)\]'", command)
    assert extras and set(extras.group(1).split(",")) >= {"test", "bioimageio", "napari", "dask"}
    assert command.endswith("pytest -q")
