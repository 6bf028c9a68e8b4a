"""Model files and the model registry.

A model is **one safetensors file**: the weights, plus the model card (see
:mod:`.card`) as JSON in the safetensors header under the key ``napari_medseg``.
Loading it never runs pickled code. Torch files (``.pt``/``.pth``) are accepted only
through ``torch.load(weights_only=True)``, which refuses pickled objects.

A SHA-256 content hash over the weights and the card is stored in the card and
checked on every load, so a corrupt or edited file is refused. A model with a
first-stage network (``roi_network``) keeps its weights under the prefix ``roi.``.

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
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .card import FORMAT, ModelCard, ModelError, parse_card
from .network import build_network, fuse_batch_norm
from .outputs import save_atomically

__all__ = ["Model", "ModelError", "ModelRegistry", "load_model", "read_model_file", "save_model", "user_home"]

CARD_KEY = "napari_medseg"
ROI_PREFIX = "roi."
MODEL_SUFFIXES = (".safetensors", ".pt", ".pth")
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = "brain-t1"


@dataclass
class Model:
    """A loaded, ready-to-run model: its network(s) and card."""

    network: torch.nn.Module
    card: ModelCard
    path: Path | None = None
    roi_network: torch.nn.Module | None = None

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        return self.card.version

    @property
    def label_names(self) -> dict:
        return self.card.label_names

    @property
    def label_colors(self) -> dict:
        return self.card.label_colors

    @property
    def title(self) -> str:
        return self.card.title


def user_home() -> Path:
    """The per-user data folder (models, workspace); ``NAPARI_MEDSEG_HOME`` overrides it."""
    env = os.environ.get("NAPARI_MEDSEG_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "napari-medseg"


def refused_pickle(exc: Exception) -> str:
    """What ``torch.load(weights_only=True)`` refused, in words: "a pickled object of type io.open"."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc)) or re.search(r"but got <class '([\w.]+)'>", str(exc))
    return f"a pickled object of type {found.group(1)}" if found else "a pickled object that is not weights"


# -- hashing -----------------------------------------------------------------------

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


# -- saving and loading ------------------------------------------------------------

def save_model(path: str | os.PathLike, network: torch.nn.Module, card: ModelCard | dict,
               roi_network: torch.nn.Module | None = None, half_precision: bool | None = None) -> Path:
    """Write ``network`` (and a first-stage ``roi_network``) with ``card`` to one safetensors file.

    Floating-point weights are stored as float16 (half the size), batch-norm statistics as
    float32, unless the card's provenance says ``weights: float32`` (an imported model, kept
    as its own tool runs it, also in later versions) or ``half_precision`` says otherwise.
    Written atomically; the folder must exist.
    """
    from safetensors.torch import save_file

    path = Path(path)
    card = card if isinstance(card, ModelCard) else parse_card({"format": FORMAT, **card}, path.name)
    if half_precision is None:
        half_precision = card.provenance.get("weights") != "float32"
    state = {}
    parts = [("", network)] + ([(ROI_PREFIX, roi_network)] if roi_network is not None else [])
    for prefix, module in parts:
        canonical = canonical_names(module)
        for name, tensor in module.state_dict().items():
            if canonical[name] != name:
                continue  # another name of the same tensor (nnU-Net's networks hold aliases)
            tensor = tensor.detach().cpu().contiguous()
            if half_precision and tensor.is_floating_point() and "running_" not in name:
                tensor = tensor.half()
            state[prefix + name] = tensor
    data = card.to_dict()
    data.pop("content_sha256", None)
    data["network"]["hparams"] = dict(getattr(network, "hparams", data["network"]["hparams"]))
    parse_card(data, path.name)  # the card as written must be valid
    data["content_sha256"] = content_hash(state, data)
    metadata = {CARD_KEY: json.dumps(data, sort_keys=True)}
    return save_atomically(path, lambda tmp: save_file(state, tmp, metadata=metadata), ".safetensors",
                           error=ModelError, label=f"the model '{path.name}'")


def _read_raw(path: Path) -> tuple[dict, dict]:
    """``(state_dict, card as stored)``, without checks; never unpickles objects."""
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
            return state, json.loads(metadata.get(CARD_KEY, "{}"))
        except json.JSONDecodeError:
            raise ModelError(f"'{path.name}' has a damaged model card") from None
    if suffix in (".pt", ".pth"):
        try:
            with warnings.catch_warnings():
                # torch warns about the pickle protocol before refusing; only our line is shown.
                warnings.simplefilter("ignore")
                payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means "refused"
            if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "pickle" in str(exc).lower():
                raise ModelError(f"refused to load '{path.name}': it contains pickled code or objects, "
                                 "not plain weights (only safetensors or weights-only torch files load)") from None
            raise ModelError(f"'{path.name}' is not a readable torch weights file ({str(exc)[:120]})") from None
        if not isinstance(payload, dict) or "state_dict" not in payload or "card" not in payload:
            raise ModelError(f"'{path.name}' must hold {{'state_dict': ..., 'card': JSON}} to be a model")
        try:
            card = json.loads(payload["card"]) if isinstance(payload["card"], str) else dict(payload["card"])
        except (TypeError, ValueError):
            raise ModelError(f"'{path.name}' has a damaged model card") from None
        return payload["state_dict"], card
    raise ModelError(f"'{path.name}' is not a model file (use .safetensors, or a weights-only .pt)")


def read_model_file(path: str | os.PathLike) -> tuple[dict, ModelCard]:
    """``(state_dict, card)`` from a model file, verified."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file '{path.name}' does not exist")
    state, raw = _read_raw(path)
    card = parse_card(raw, path.name)
    expected = raw.get("content_sha256")
    if not expected or content_hash(state, raw) != expected:
        raise ModelError(f"'{path.name}' failed its integrity check: the weights or the card were "
                         "changed after it was saved, or the file is damaged")
    return state, card


def canonical_names(module: torch.nn.Module) -> dict:
    """Each state-dict name -> the first name of the same tensor (shared modules give several names)."""
    first: dict = {}
    out = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype) \
            if tensor.numel() else (name,)
        out[name] = first.setdefault(key, name)
    return out


def _build(spec, state: dict, where: str) -> torch.nn.Module:
    try:
        network = build_network(spec.architecture, spec.hparams)
        canonical = canonical_names(network)
        state = {name: state[first] for name, first in canonical.items() if first in state} | \
            {name: value for name, value in state.items() if name not in canonical}
        network.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ModelError(f"'{where}' does not match its declared architecture "
                         f"{spec.architecture!r} ({str(exc).splitlines()[0][:120]})") from None
    return network


def networks_from_state(state: dict, card: ModelCard, where: str) -> tuple:
    """``(network, roi_network or None)`` with ``state`` loaded in float32 (files may hold float16)."""
    main = {k: v for k, v in state.items() if not k.startswith(ROI_PREFIX)}
    roi = {k[len(ROI_PREFIX):]: v for k, v in state.items() if k.startswith(ROI_PREFIX)}
    network = _build(card.network, main, where)
    roi_network = _build(card.roi_network, roi, where) if card.roi_network is not None else None
    return network, roi_network


def load_model(path: str | os.PathLike, for_training: bool = False) -> Model:
    """Load and verify a model file. For inference, batch norm is folded into the convolutions."""
    state, card = read_model_file(path)
    if for_training and card.pipeline.kind == "monai_bundle":
        raise ModelError(f"{card.title} runs through its MONAI bundle's own transforms, which serve prediction "
                         "only; fine-tuning it is not offered")
    if for_training and card.pipeline.regions:
        raise ModelError(f"{card.title} is region-based (overlapping regions, one sigmoid each); fine-tuning it "
                         "is not offered")
    if for_training and card.pipeline.parts:
        raise ModelError(f"{card.title} runs as {len(card.pipeline.parts)} separate networks whose labels are "
                         "merged; fine-tuning such a model is not offered")
    network, roi_network = networks_from_state(state, card, Path(path).name)
    for module in filter(None, (network, roi_network)):
        module.eval()
        if not for_training:
            fuse_batch_norm(module)
        for parameter in module.parameters():
            parameter.requires_grad_(for_training)
    if roi_network is not None:
        for parameter in roi_network.parameters():
            parameter.requires_grad_(False)  # the first stage is never fine-tuned
    return Model(network, card, Path(path), roi_network)


# -- registry ----------------------------------------------------------------------

@dataclass
class ModelEntry:
    name: str
    version: str
    path: Path
    source: str          # "bundled" or "user"
    current: bool
    card: ModelCard

    def summary(self) -> dict:
        return {"name": self.name, "version": self.version, "source": self.source,
                "current": self.current, "modality": self.card.modality,
                "labels": [label.name for label in self.card.labels], "path": str(self.path),
                "sha256": self.card.content_sha256, "metrics": self.card.metrics}


def version_key(version: str) -> tuple:
    """Sort key for versions such as ``1.10.0`` or ``v12`` (numbers compare as numbers)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-+]|(?<=v)(?=\d)", str(version)) if p)


def peek_card(path: Path) -> ModelCard | None:
    """The card of a model file without verifying its weights (for listings); None if unreadable."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                raw = json.loads((handle.metadata() or {}).get(CARD_KEY, "{}"))
            return parse_card(raw, path.name)
        return read_model_file(path)[1]
    except Exception:  # noqa: BLE001 - a broken file is skipped in listings
        return None


class ModelRegistry:
    """Bundled models plus the user's versioned models."""

    def __init__(self, home: str | os.PathLike | None = None, bundled_dir: Path | None = None):
        self.home = Path(home) if home is not None else user_home()
        self.bundled_dir = bundled_dir if bundled_dir is not None else BUNDLED_DIR

    @property
    def user_dir(self) -> Path:
        return self.home / "models"

    def entries(self) -> list[ModelEntry]:
        found: list[ModelEntry] = []
        folders = [(self.bundled_dir, "bundled", "*.safetensors")] if self.bundled_dir.is_dir() else []
        if self.user_dir.is_dir():
            folders += [(folder, "user", "*.safetensors") for folder in sorted(self.user_dir.iterdir())
                        if folder.is_dir()]
        for folder, source, pattern in folders:
            for path in sorted(folder.glob(pattern)):
                card = peek_card(path)
                if card is not None:
                    found.append(ModelEntry(card.name, card.version, path, source, False, card))
        by_name: dict[str, list[ModelEntry]] = {}
        for entry in found:
            by_name.setdefault(entry.name, []).append(entry)
        for name, versions in by_name.items():
            chosen = self._current_version(name)
            pick = sorted((e for e in versions if e.version == chosen), key=lambda e: e.source != "user") or \
                [max(versions, key=lambda e: (version_key(e.version), e.source == "user"))]
            pick[0].current = True
        return sorted(found, key=lambda e: (e.name, version_key(e.version), e.source))

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
            spec = DEFAULT_MODEL if DEFAULT_MODEL in names else names[0]
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

    def import_model(self, path: str | os.PathLike, make_current: bool = True) -> tuple[ModelEntry, bool]:
        """Verify a model file and copy it into the user folder as a new version.

        Returns ``(entry, added)``; ``added`` is False when a model with the same content
        hash is already installed (bundled or imported), which is then left as it is.
        """
        state, card = read_model_file(path)
        for entry in self.entries():
            if entry.card.content_sha256 == card.content_sha256:
                return entry, False
        target = self.user_dir / card.name / f"{card.version}.safetensors"
        if target.exists():
            raise ModelError(f"model '{card.name}' already has a different version "
                             f"{card.version}; give the new one another version")
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(path).suffix.lower() == ".safetensors":
            save_atomically(target, lambda tmp: shutil.copyfile(path, tmp), ".safetensors",
                            error=ModelError, label=f"the imported model '{target.name}'")
        else:
            network, roi_network = networks_from_state(state, card, Path(path).name)
            save_model(target, network, card, roi_network)
        if make_current:
            self.set_current(card.name, card.version)
        return next(e for e in self.entries() if e.path == target), True

    def add_version(self, network: torch.nn.Module, card: ModelCard, make_current: bool = False,
                    roi_network: torch.nn.Module | None = None, half_precision: bool | None = None) -> ModelEntry:
        """Save a new version of a model into the user folder (kept for rollback)."""
        target = self.user_dir / card.name / f"{card.version}.safetensors"
        if target.exists():
            raise ModelError(f"model '{card.name}' version {card.version} already exists")
        target.parent.mkdir(parents=True, exist_ok=True)
        save_model(target, network, card, roi_network, half_precision=half_precision)
        if make_current:
            self.set_current(card.name, card.version)
        return next(e for e in self.entries() if e.path == target)

    def set_current(self, name: str, version: str) -> None:
        """Make ``version`` the one used by default; earlier versions stay on disk."""
        if not any(e.name == name and e.version == version for e in self.entries()):
            raise ModelError(f"model '{name}' has no version '{version}'")
        folder = self.user_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        save_atomically(folder / "CURRENT", lambda tmp: Path(tmp).write_text(version + "\n"),
                        error=ModelError, label=f"the current-version marker of '{name}'")


def resolve_model(spec: str | os.PathLike | None = None, workspace=None) -> Path:
    """The model file the CLI and the widgets run: one rule for every caller.

    ``spec`` is a model file, ``NAME`` or ``NAME@VERSION`` from the bundled and user models,
    or, with a ``workspace``, one of its versions (``vN``, or ``NAME@vN``). Without a spec, a
    workspace gives its promoted version (when it has a model yet), else the default model.
    """
    if workspace is not None and workspace.model_name:
        if spec is None:
            return workspace.registry.resolve(workspace.model_name)
        text = str(spec)
        name, _, version = text.rpartition("@") if "@" in text else ("", "", text)
        if version in {v["version"] for v in workspace.versions()} and name in ("", workspace.model_name):
            return workspace.registry.resolve(f"{workspace.model_name}@{version}")
    return ModelRegistry().resolve(spec)


def model_choices(workspace=None) -> tuple[list, str | None]:
    """``([(label, path), ...], the path selected by default)`` for a model drop-down.

    A workspace's kept versions come first, its promoted one selected; then the bundled and
    user models (the default model selected when there is no workspace model).
    """
    choices, selected = [], None
    if workspace is not None and workspace.model_name:
        registry = workspace.registry
        for entry in registry.entries():
            label = f"{entry.name} {entry.version} (workspace '{workspace.folder.name}')" \
                    + (" * promoted" if entry.current else "")
            choices.append((label, str(entry.path)))
            if entry.current:
                selected = str(entry.path)
    for entry in ModelRegistry().entries():
        choices.append((f"{entry.name} {entry.version} ({entry.source})" + (" *" if entry.current else ""),
                        str(entry.path)))
        if selected is None and entry.current and entry.name == DEFAULT_MODEL:
            selected = str(entry.path)
    if selected is None and choices:
        selected = choices[0][1]
    return choices, selected
