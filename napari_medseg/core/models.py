"""Model files and the model registry.

A model is **one safetensors file**: the weights, plus a JSON document (the "card")
in the safetensors header under the key ``napari_medseg``. Loading it never runs
pickled code. Torch files (``.pt``/``.pth``) are accepted only through
``torch.load(weights_only=True)``, which refuses pickled objects.

The card records the architecture and its hyperparameters, label names and colours,
modality, target spacing and orientation, intensity normalisation, patch size,
version, a SHA-256 content hash over weights and card (checked on every load, so a
corrupt or edited file is refused), and training provenance and metrics.

The registry holds the models bundled in the package plus a per-user folder
(``$NAPARI_MEDSEG_HOME/models`` or ``~/.local/share/napari-medseg/models``) in which
every version of a model is kept as ``<name>/<version>.safetensors``; a ``CURRENT``
file there names the version in use, so an earlier one can be restored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MedsegError
from .io import save_atomically
from .network import build_network, fuse_batch_norm

CARD_KEY = "napari_medseg"
FORMAT = "napari-medseg-model"
FORMAT_VERSION = 1
MODEL_SUFFIXES = (".safetensors", ".pt", ".pth")
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "models"
REQUIRED = ("name", "version", "architecture", "hparams", "labels", "modality",
            "target_spacing", "orientation", "normalisation", "patch_size")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ModelError(MedsegError):
    """A model file is missing, unsafe, corrupt or inconsistent."""


@dataclass
class Model:
    """A loaded, ready-to-run model."""

    network: torch.nn.Module
    card: dict
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def version(self) -> str:
        return str(self.card["version"])

    @property
    def label_names(self) -> dict:
        return {int(label["value"]): label["name"] for label in self.card["labels"]}

    @property
    def label_colors(self) -> dict:
        return {int(label["value"]): tuple(label["color"]) for label in self.card["labels"]}

    @property
    def title(self) -> str:
        return f"{self.name} v{self.version}"


def user_home() -> Path:
    """The per-user data folder (models, queue); ``NAPARI_MEDSEG_HOME`` overrides it."""
    env = os.environ.get("NAPARI_MEDSEG_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "napari-medseg"


# -- hashing and validation ------------------------------------------------------

def content_hash(state: dict, card: dict) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) and the card minus the hash."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    unsigned = {k: v for k, v in card.items() if k != "content_sha256"}
    digest.update(json.dumps(unsigned, sort_keys=True).encode())
    return digest.hexdigest()


def validate_card(card: dict, where: str) -> None:
    if card.get("format") != FORMAT:
        raise ModelError(f"'{where}' is not a napari-medseg model (no model card in the file)")
    missing = [key for key in REQUIRED if key not in card]
    if missing:
        raise ModelError(f"'{where}' has an incomplete model card: missing {', '.join(missing)}")
    if not _NAME.match(str(card["name"])):
        raise ModelError(f"'{where}' has an invalid model name {card['name']!r}")
    values = [int(label["value"]) for label in card["labels"]]
    if values != list(range(len(values))):
        raise ModelError(f"'{where}': label values must be 0..N-1 in order, got {values}")
    if card["hparams"].get("out_channels") != len(values):
        raise ModelError(f"'{where}': the network has {card['hparams'].get('out_channels')} outputs "
                         f"but the card names {len(values)} labels")


# -- saving and loading ------------------------------------------------------------

def save_model(path: str | os.PathLike, network: torch.nn.Module, card: dict,
               half_precision: bool = True) -> Path:
    """Write ``network`` and ``card`` to one safetensors file, atomically.

    Floating-point weights are stored as float16 by default (half the size; the
    brain model's predictions are unchanged), batch-norm statistics as float32.
    """
    from safetensors.torch import save_file

    path = Path(path)
    state = {}
    for name, tensor in network.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        if half_precision and tensor.is_floating_point() and "running_" not in name:
            tensor = tensor.half()
        state[name] = tensor
    card = dict(card)
    card.update(format=FORMAT, format_version=FORMAT_VERSION)
    card["hparams"] = dict(card.get("hparams") or getattr(network, "hparams", {}))
    validate_card(card, path.name)
    card["content_sha256"] = content_hash(state, card)
    metadata = {CARD_KEY: json.dumps(card, sort_keys=True)}
    return save_atomically(path, lambda tmp: save_file(state, tmp, metadata=metadata), ".safetensors",
                           error=ModelError, label=f"the model '{path.name}'")


def read_model_file(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(state_dict, card)`` from a model file, verified; never unpickles objects."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file '{path.name}' does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                state = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"'{path.name}' is not a readable safetensors file ({str(exc)[:120]})") from None
        try:
            card = json.loads(metadata.get(CARD_KEY, "{}"))
        except json.JSONDecodeError:
            raise ModelError(f"'{path.name}' has a damaged model card") from None
    elif suffix in (".pt", ".pth"):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means "refused"
            if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "pickle" in str(exc).lower():
                raise ModelError(f"refused to load '{path.name}': it contains pickled code or objects, "
                                 "not plain weights (only safetensors or weights-only torch files load)") from None
            raise ModelError(f"'{path.name}' is not a readable torch weights file ({str(exc)[:120]})") from None
        if not isinstance(payload, dict) or "state_dict" not in payload or "card" not in payload:
            raise ModelError(f"'{path.name}' must hold {{'state_dict': ..., 'card': JSON}} to be a model")
        state = payload["state_dict"]
        try:
            card = json.loads(payload["card"]) if isinstance(payload["card"], str) else dict(payload["card"])
        except (TypeError, ValueError):
            raise ModelError(f"'{path.name}' has a damaged model card") from None
    else:
        raise ModelError(f"'{path.name}' is not a model file (use .safetensors, or a weights-only .pt)")
    validate_card(card, path.name)
    expected = card.get("content_sha256")
    if not expected or content_hash(state, card) != expected:
        raise ModelError(f"'{path.name}' failed its integrity check: the weights or the card were "
                         "changed after it was saved, or the file is damaged")
    return state, card


def _network_from_state(state: dict, card: dict, where: str) -> torch.nn.Module:
    """The card's architecture with ``state`` loaded in float32 (files may hold float16)."""
    try:
        network = build_network(card["architecture"], card["hparams"])
        network.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ModelError(f"'{where}' does not match its declared architecture "
                         f"{card.get('architecture')!r} ({str(exc).splitlines()[0][:120]})") from None
    return network


def load_model(path: str | os.PathLike, for_training: bool = False) -> Model:
    """Load and verify a model file. For inference, batch norm is folded into the convolutions."""
    state, card = read_model_file(path)
    network = _network_from_state(state, card, Path(path).name)
    network.eval()
    if not for_training:
        fuse_batch_norm(network)
    for parameter in network.parameters():
        parameter.requires_grad_(for_training)
    return Model(network, card, Path(path))


# -- registry ----------------------------------------------------------------------

@dataclass
class ModelEntry:
    name: str
    version: str
    path: Path
    source: str          # "bundled" or "user"
    current: bool
    card: dict

    def summary(self) -> dict:
        labels = [label["name"] for label in self.card.get("labels", [])]
        return {"name": self.name, "version": self.version, "source": self.source,
                "current": self.current, "modality": self.card.get("modality"),
                "labels": labels, "path": str(self.path),
                "metrics": self.card.get("metrics", {})}


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.\-]", str(version)))


class ModelRegistry:
    """Bundled models plus the user's versioned models."""

    def __init__(self, home: str | os.PathLike | None = None, bundled_dir: Path | None = None):
        self.home = Path(home) if home is not None else user_home()
        self.bundled_dir = bundled_dir if bundled_dir is not None else BUNDLED_DIR

    @property
    def user_dir(self) -> Path:
        return self.home / "models"

    def _card_of(self, path: Path) -> dict | None:
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as handle:
                    return json.loads((handle.metadata() or {}).get(CARD_KEY, "{}")) or None
            return read_model_file(path)[1]
        except Exception:  # noqa: BLE001 - a broken file is skipped in listings
            return None

    def entries(self) -> list[ModelEntry]:
        found: list[ModelEntry] = []
        if self.bundled_dir.is_dir():
            for path in sorted(self.bundled_dir.glob("*.safetensors")):
                card = self._card_of(path)
                if card and card.get("format") == FORMAT:
                    found.append(ModelEntry(card["name"], str(card["version"]), path, "bundled", False, card))
        if self.user_dir.is_dir():
            for folder in sorted(p for p in self.user_dir.iterdir() if p.is_dir()):
                for path in sorted(folder.glob("*.safetensors")):
                    card = self._card_of(path)
                    if card and card.get("format") == FORMAT:
                        found.append(ModelEntry(card["name"], str(card["version"]), path, "user", False, card))
        by_name: dict[str, list[ModelEntry]] = {}
        for entry in found:
            by_name.setdefault(entry.name, []).append(entry)
        for name, versions in by_name.items():
            chosen = self._current_version(name)
            pick = sorted((e for e in versions if e.version == chosen), key=lambda e: e.source != "user") or \
                [max(versions, key=lambda e: (_version_key(e.version), e.source == "user"))]
            pick[0].current = True
        return sorted(found, key=lambda e: (e.name, _version_key(e.version), e.source))

    def names(self) -> list[str]:
        return sorted({entry.name for entry in self.entries()})

    def _current_version(self, name: str) -> str | None:
        marker = self.user_dir / name / "CURRENT"
        try:
            return marker.read_text().strip() or None
        except OSError:
            return None

    def resolve(self, spec: str | os.PathLike | None = None) -> Path:
        """A model file from a path, ``NAME`` (the current version) or ``NAME@VERSION``."""
        if spec is None:
            names = self.names()
            if not names:
                raise ModelError("no models are installed; import one or train one with 'napari-medseg train'")
            spec = "brain-t1" if "brain-t1" in names else names[0]
        text = str(spec)
        path = Path(text).expanduser()
        if path.suffix.lower() in MODEL_SUFFIXES or path.exists():
            if not path.is_file():
                raise ModelError(f"model file '{path.name}' does not exist")
            return path
        name, _, version = text.partition("@")
        entries = [e for e in self.entries() if e.name == name]
        if not entries:
            known = ", ".join(self.names()) or "none"
            raise ModelError(f"no model named '{name}' (available: {known})")
        if version:
            matches = [e for e in entries if e.version == version]
            if not matches:
                raise ModelError(f"model '{name}' has no version '{version}' "
                                 f"(available: {', '.join(e.version for e in entries)})")
            return max(matches, key=lambda e: e.source == "user").path
        return next(e for e in entries if e.current).path

    def load(self, spec: str | os.PathLike | None = None, for_training: bool = False) -> Model:
        return load_model(self.resolve(spec), for_training=for_training)

    def import_model(self, path: str | os.PathLike, make_current: bool = True) -> ModelEntry:
        """Verify a model file and copy it into the user folder as a new version."""
        state, card = read_model_file(path)
        target = self.user_dir / card["name"] / f"{card['version']}.safetensors"
        if target.exists():
            existing = self._card_of(target) or {}
            if existing.get("content_sha256") != card["content_sha256"]:
                raise ModelError(f"model '{card['name']}' already has a different version "
                                 f"{card['version']}; give the new one another version")
        elif Path(path).suffix.lower() == ".safetensors":
            save_atomically(target, lambda tmp: shutil.copyfile(path, tmp), ".safetensors",
                            error=ModelError, label=f"the imported model '{target.name}'")
        else:
            save_model(target, _network_from_state(state, card, Path(path).name), card)
        if make_current:
            self.set_current(card["name"], str(card["version"]))
        return next(e for e in self.entries() if e.path == target)

    def add_version(self, network: torch.nn.Module, card: dict, make_current: bool = False) -> ModelEntry:
        """Save a new version of a model into the user folder (kept for rollback)."""
        target = self.user_dir / card["name"] / f"{card['version']}.safetensors"
        if target.exists():
            raise ModelError(f"model '{card['name']}' version {card['version']} already exists")
        save_model(target, network, card)
        if make_current:
            self.set_current(card["name"], str(card["version"]))
        return next(e for e in self.entries() if e.path == target)

    def set_current(self, name: str, version: str) -> None:
        """Make ``version`` the one used by default; earlier versions stay on disk."""
        folder = self.user_dir / name
        if not (folder / f"{version}.safetensors").is_file():
            # a bundled version can also be made current again (rollback to the shipped model)
            if not any(e.name == name and e.version == version for e in self.entries()):
                raise ModelError(f"model '{name}' has no version '{version}'")
        save_atomically(folder / "CURRENT", lambda tmp: Path(tmp).write_text(version + "\n"),
                        error=ModelError, label=f"the current-version marker of '{name}'")
