"""Model files (safetensors + card), safe loading, and the versioned registry."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from conftest import card_dict, make_card
from napari_medseg.core.models import ModelError, ModelRegistry, load_model, read_model_file, save_model
from napari_medseg.core.network import AttentionUNet3D


def tiny_card(name="tiny", version="1.0.0", classes=2):
    return card_dict(name=name, version=version, classes=classes)


def tiny_model(classes=2, seed=0):
    torch.manual_seed(seed)
    return AttentionUNet3D(1, classes, (4, 8)).eval()


@pytest.fixture
def model_file(tmp_path):
    return save_model(tmp_path / "tiny.safetensors", tiny_model(), tiny_card(), half_precision=False)


def test_round_trip_gives_the_same_predictions_and_card(model_file):
    net = tiny_model()
    loaded = load_model(model_file)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.network(x), net(x), atol=1e-4, rtol=1e-4)
    assert loaded.card.labels[1].name == "lesion" and loaded.label_names == {0: "background", 1: "lesion"}
    assert len(loaded.card.content_sha256) == 64 and loaded.title == "tiny v1.0.0"


def test_half_precision_files_are_half_the_size(tmp_path):
    full = save_model(tmp_path / "a.safetensors", tiny_model(), tiny_card(), half_precision=False)
    half = save_model(tmp_path / "b.safetensors", tiny_model(), tiny_card(), half_precision=True)
    def weight_bytes(path):  # the file less its 8-byte length and JSON header (the card)
        raw = path.read_bytes()
        return len(raw) - 8 - int.from_bytes(raw[:8], "little")

    assert weight_bytes(half) < 0.6 * weight_bytes(full)
    load_model(half)


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": Exploit(), "card": "{}"}, handle)
    with pytest.raises(ModelError, match="refused"):
        load_model(path)
    assert not marker.exists()
    # torch.save of a whole module is pickled code too: refused as well
    torch.save(tiny_model(), tmp_path / "module.pt")
    with pytest.raises(ModelError, match="refused"):
        load_model(tmp_path / "module.pt")


def test_weights_only_torch_files_are_accepted(tmp_path, model_file):
    state, card = read_model_file(model_file)
    torch.save({"state_dict": state, "card": json.dumps(card.to_dict())}, tmp_path / "plain.pt")
    assert load_model(tmp_path / "plain.pt").name == "tiny"


def test_tampered_weights_fail_the_integrity_check(model_file):
    raw = bytearray(model_file.read_bytes())
    raw[-20] ^= 0xFF  # flip bits in the last tensor's data
    model_file.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="integrity"):
        load_model(model_file)


def test_an_edited_card_fails_the_integrity_check(tmp_path, model_file):
    from safetensors.torch import load_file, save_file

    state = load_file(model_file)
    _, card = read_model_file(model_file)
    card = card.to_dict()
    card["labels"][1]["name"] = "tumour"
    save_file(state, tmp_path / "edited.safetensors", metadata={"napari_medseg": json.dumps(card)})
    with pytest.raises(ModelError, match="integrity"):
        load_model(tmp_path / "edited.safetensors")


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, b"not a model at all" * 100])
def test_corrupt_files_are_clear_errors(tmp_path, content):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="broken.safetensors"):
        load_model(path)


def test_a_truncated_file_is_a_clear_error(tmp_path, model_file):
    (tmp_path / "cut.safetensors").write_bytes(model_file.read_bytes()[:-100])
    with pytest.raises(ModelError, match="cut.safetensors"):
        load_model(tmp_path / "cut.safetensors")


def test_safetensors_without_a_card_is_not_a_model(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, tmp_path / "bare.safetensors")
    with pytest.raises(ModelError, match="not a napari-medseg model"):
        load_model(tmp_path / "bare.safetensors")


def test_card_and_network_must_agree(tmp_path):
    with pytest.raises(ModelError, match="labels"):
        save_model(tmp_path / "x.safetensors", tiny_model(classes=3), tiny_card(classes=2) | {
            "network": {"architecture": "AttentionUNet3D",
                        "hparams": {"in_channels": 1, "out_channels": 3, "channels": [4, 8]}}})


def test_registry_imports_versions_and_rolls_back(tmp_path, model_file):
    registry = ModelRegistry(home=tmp_path / "home", bundled_dir=tmp_path / "none")
    assert registry.entries() == []
    with pytest.raises(ModelError, match="no models"):
        registry.resolve(None)
    first, added = registry.import_model(model_file)
    assert added
    assert first.current and first.source == "user"
    second = registry.add_version(tiny_model(seed=1), make_card(version="1.1.0"), make_current=True)
    names = [(e.version, e.current) for e in registry.entries()]
    assert names == [("1.0.0", False), ("1.1.0", True)]
    assert registry.resolve("tiny") == second.path
    assert registry.resolve("tiny@1.0.0") == first.path
    registry.set_current("tiny", "1.0.0")  # rollback keeps 1.1.0 on disk
    assert registry.resolve("tiny") == first.path and second.path.exists()
    with pytest.raises(ModelError, match="no version '9'"):
        registry.resolve("tiny@9")
    with pytest.raises(ModelError, match="no model named 'nope'"):
        registry.resolve("nope")
    with pytest.raises(ModelError, match="already exists"):
        registry.add_version(tiny_model(), make_card(version="1.1.0"))


def test_bundled_brain_model_is_listed_and_verifies():
    registry = ModelRegistry(home="/nonexistent-medseg-home")
    entry = next(e for e in registry.entries() if e.name == "brain-t1")
    assert entry.source == "bundled" and entry.current
    model = load_model(entry.path)
    assert model.label_names == {0: "background", 1: "brain"} and model.card.modality == "MR"
    assert model.card.network.architecture == "LinkNet3d" and model.roi_network is not None
    assert entry.path.stat().st_size < 10_000_000  # small enough to ship in the wheel


def test_saved_models_are_readable_by_others_like_any_file(tmp_path, model_file):
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(model_file.stat().st_mode) == 0o666 & ~umask


def _model_card_docs():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "model_card_docs.py"
    spec = importlib.util.spec_from_file_location("model_card_docs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["brain-t1", "brain-t1-attention"])
def test_bundled_cards_carry_their_evaluation_rows(name):
    from napari_medseg.core.card import evaluation_rows
    from napari_medseg.core.models import BUNDLED_DIR

    _state, card = read_model_file(BUNDLED_DIR / f"{name}.safetensors")
    rows = evaluation_rows(card)
    assert len(rows) >= 10, f"{name}'s card stores no evaluation; run benchmarks/eval_brain_model.py --write-cards"
    assert all(0.0 <= row["dice"] <= 1.0 and row["head"] and row["copy"] for row in rows)
    assert card.metrics["date"] and card.metrics["method"] and card.metrics["machine"]


def test_the_docs_pages_and_readme_agree_with_the_bundled_cards():
    stale = [str(path.name) for path, text in _model_card_docs().rendered_documents().items()
             if not path.exists() or path.read_text(encoding="utf-8") != text]
    assert not stale, f"{stale} disagree with the cards; run scripts/model_card_docs.py"


def test_models_show_prints_a_readable_card_and_json_on_request(capsys):
    from napari_medseg.cli import main

    assert main(["models", "show", "brain-t1"]) == 0
    text = capsys.readouterr().out
    for heading in ("intended use:", "training data:", "licence:", "citation:", "evaluation (", "where it loses:"):
        assert heading in text
    assert "Fisch" in text and "MIT" in text and not text.lstrip().startswith("{")
    assert main(["models", "show", "brain-t1", "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["name"] == "brain-t1" and len(card["metrics"]["evaluation"]) >= 10
