"""The deepbet converter: known weights become our model file; anything else is refused in one line."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from napari_medseg.core.convert import KNOWN_DEEPBET, convert_deepbet, find_deepbet
from napari_medseg.core.errors import MedsegError
from napari_medseg.core.models import BUNDLED_DIR, load_model


def test_conversion_gives_deepbets_networks_and_a_card_that_says_where_they_come_from(tmp_path):
    card = convert_deepbet(tmp_path / "bt1.safetensors", name="bt1", version="9.0.0")
    assert card.licence.startswith("MIT") and "Fisch" in card.citation
    assert card.provenance["source_sha256"] == KNOWN_DEEPBET["1.0.2"]
    assert "7,837" in card.provenance["training_data"] and card.provenance["changes"]
    assert card.pipeline.axis_order == "RAS" and card.pipeline.roi.kind == "network"
    model = load_model(tmp_path / "bt1.safetensors")
    scripted = torch.jit.load(str(find_deepbet() / "model.pt")).eval()
    x = torch.randn(1, 1, 32, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.network(x), scripted(x), atol=1e-4, rtol=0)


def test_the_bundled_default_is_the_converted_deepbet():
    model = load_model(BUNDLED_DIR / "brain-t1.safetensors")
    assert model.card.provenance["source_sha256"] == KNOWN_DEEPBET["1.0.2"]
    assert model.card.version.startswith("2.") and "attention" not in model.card.explain
    attention = load_model(BUNDLED_DIR / "brain-t1-attention.safetensors")
    assert "attention" in attention.card.explain and attention.card.network.architecture == "AttentionUNet3D"


def test_unknown_weights_are_refused(tmp_path):
    source = find_deepbet()
    for name in ("bbox_model.pt", "model.pt"):
        shutil.copy(source / name, tmp_path / name)
    raw = bytearray((tmp_path / "model.pt").read_bytes())
    raw[-100] ^= 0xFF
    (tmp_path / "model.pt").write_bytes(bytes(raw))
    with pytest.raises(MedsegError, match="not a deepbet release this version knows"):
        convert_deepbet(tmp_path / "out.safetensors", source=tmp_path)
    assert not (tmp_path / "out.safetensors").exists()


def cli(*args, prelude=""):
    code = (f"{prelude}\nfrom napari_medseg.cli import main\nraise SystemExit(main({list(args)!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_cli_refuses_a_missing_deepbet_and_an_empty_source_in_one_line(tmp_path):
    # An environment without deepbet: its distribution cannot be found.
    missing = ("import importlib.metadata as m\nreal = m.distribution\n"
               "def distribution(name):\n    if name == 'deepbet':\n        raise m.PackageNotFoundError(name)\n"
               "    return real(name)\nm.distribution = distribution")
    result = cli("models", "convert", "deepbet", "--version", "7.0.0", prelude=missing)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "napari-medseg: error: deepbet is not installed; install it with 'pip install --no-deps deepbet==1.0.2' "
        "or pass --source DIR with its bbox_model.pt and model.pt"]
    (tmp_path / "empty").mkdir()
    result = cli("models", "convert", "deepbet", "--source", str(tmp_path / "empty"), "--version", "7.0.0")
    assert result.returncode == 2 and "does not hold deepbet's bbox_model.pt and model.pt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_converts_into_the_user_folder(tmp_path):
    import os

    env = {**os.environ, "NAPARI_MEDSEG_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "models", "convert", "deepbet",
                             "--version", "2.1.0"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "models" / "brain-t1" / "2.1.0.safetensors").is_file()
    again = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "models", "convert", "deepbet",
                            "--version", "2.0.0"], capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "already installed (bundled)" in again.stderr
