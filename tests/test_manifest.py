"""The npe2 manifest is valid, importable and shipped inside the wheel."""

from __future__ import annotations

import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO

MANIFEST = REPO / "napari.yaml"


def test_npe2_validate_passes():
    npe2 = Path(sys.executable).with_name("npe2")
    result = subprocess.run([str(npe2), "validate", "napari-medseg"], capture_output=True, text=True, encoding="utf-8")
    assert result.returncode == 0 and "valid" in result.stdout, result.stdout + result.stderr


def test_every_python_name_imports():
    commands = yaml.safe_load(MANIFEST.read_text())["contributions"]["commands"]
    assert len(commands) >= 4
    for command in commands:
        module_name, attribute = command["python_name"].split(":")
        assert callable(getattr(importlib.import_module(module_name), attribute)), command["id"]


def test_import_linter_keeps_the_core_free_of_qt_and_napari_and_the_viewer_layered():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], capture_output=True, text=True, encoding="utf-8", cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_core_imports_without_qt_or_napari():
    code = ("import sys, napari_medseg.cli, napari_medseg.core.io, napari_medseg.core.windowing,"
            " napari_medseg.core.inference, napari_medseg.core.models, napari_medseg.core.training;"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('napari','qtpy','PyQt5','PyQt6','PySide6','magicgui')];"
            "print(bad); sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.slow
def test_wheel_ships_the_top_level_manifest_and_napari_finds_it(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(REPO)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("napari_medseg-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("napari_medseg/napari.yaml") == MANIFEST.read_bytes()
        assert "napari_medseg/data/MNI152_T1_2mm.nii.gz" in zf.namelist()
        assert "napari_medseg/models/brain-t1.safetensors" in zf.namelist()
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    # A fresh interpreter that sees the installed wheel first (not the source tree).
    code = (
        "import sys, pathlib, napari_medseg, npe2;"
        f"assert pathlib.Path(napari_medseg.__file__).is_relative_to({str(target)!r}), napari_medseg.__file__;"
        "pm = npe2.PluginManager.instance(); pm.discover();"
        "m = pm.get_manifest('napari-medseg');"
        "print(m.name, len(m.contributions.commands))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(target), "PATH": ""}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "napari-medseg"
