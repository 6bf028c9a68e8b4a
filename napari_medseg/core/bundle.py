"""MONAI bundles, read as data: a bundle's config is code, and is never evaluated as it stands.

MONAI's ``ConfigParser`` runs a ``$``-expression as Python, and a ``_target_`` may name
any importable callable. Here only the sections a prediction needs are built
(``network_def``, ``preprocessing``, ``inferer``, ``postprocessing``), and only from:

* ``_target_`` classes on an allow-list: ``monai.networks.nets.*`` for the network,
  ``monai.transforms.*`` for the transforms, ``monai.inferers.*`` for the inferer;
* literal arguments, and ``@key`` references to other entries, resolved the same way.

Anything else (a ``$``-expression, a ``%`` macro, ``_mode_``, a class outside the
allow-list) is refused with one line that names the offending key, before anything is
built. The built objects are MONAI's own, so the transforms are MONAI's, not a copy.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

from .errors import MedsegError
from .progress import report, span

SECTIONS = {"network_def": "monai.networks.nets", "preprocessing": "monai.transforms",
            "inferer": "monai.inferers", "postprocessing": "monai.transforms"}
# Transforms that write files or talk to the outside: our own writer stores the result.
LEFT_OUT = {"SaveImage", "SaveImaged"}
SPECIAL_KEYS = {"_target_", "_disabled_", "_requires_", "_desc_"}


def _brats_regions_to_labels(x):
    """The model zoo's brats_mri_segmentation postprocessing, as its Lambdad states it:
    enhancing tumour 4, else tumour core 1, else whole tumour 2, from thresholded regions
    (channel 0 tumour core, 1 whole tumour, 2 enhancing tumour)."""
    import torch

    return torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, 1, torch.where(x[[1]] > 0, 2, 0)))


# Lambdad expressions that known bundles use, by their exact text (spaces aside): each
# runs as our own function with the same body; the bundle's text is never evaluated.
# With the labels it writes, since the network's channels are then regions, not labels.
KNOWN_FUNCTIONS = {
    "$lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, 1, torch.where(x[[1]] > 0, 2, 0)))":
        (_brats_regions_to_labels, {1: "tumor core (not enhancing)", 2: "whole tumor (not tumor core)",
                                    4: "enhancing tumor"}),
}


def known_function(text):
    """The (function, labels) a known bundle's Lambdad text stands for, or None."""
    if not isinstance(text, str):
        return None
    wanted = "".join(text.split())
    for known, entry in KNOWN_FUNCTIONS.items():
        if "".join(known.split()) == wanted:
            return entry
    return None


class BundleError(MedsegError):
    """A bundle's config asks for something that is not data."""


def read_config(bundle: str | Path, name: str = "inference.json") -> dict:
    path = Path(bundle) / "configs" / name
    if not path.is_file():
        raise BundleError(f"'{Path(bundle).name}' is not a MONAI bundle (no configs/{name})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read configs/{name}: {exc}") from None
    if not isinstance(config, dict):
        raise BundleError(f"configs/{name} is not an object of named entries")
    return config


class _Builder:
    def __init__(self, config: dict, source: str):
        self.config, self.source = config, source
        self.built: dict = {}
        self.resolving: list = []

    def section(self, key: str):
        if key not in self.config:
            raise BundleError(f"{self.source} has no '{key}'")
        return self.reference(key, SECTIONS[key])

    def reference(self, key: str, package: str):
        if key in self.built:
            return self.built[key]  # the same object: Invertd must see the preprocessing that ran
        if key in self.resolving:
            raise BundleError(f"{self.source}: '{key}' refers to itself through {' -> '.join(self.resolving)}")
        path = key.split("::")
        value = self.config
        for part in path:
            try:
                value = value[int(part)] if isinstance(value, list) else value[part]
            except (KeyError, IndexError, ValueError, TypeError):
                raise BundleError(f"{self.source}: the reference '@{key}' names nothing") from None
        self.resolving.append(key)
        try:
            self.built[key] = result = self.value(value, key, package)
        finally:
            self.resolving.pop()
        return result

    def value(self, value, where: str, package: str):
        if isinstance(value, str):
            if value.startswith("$"):
                raise BundleError(f"{self.source}: '{where}' is a Python expression ({value[:60]!r}); "
                                  "a bundle's code is never run")
            if value.startswith("%"):
                raise BundleError(f"{self.source}: '{where}' is a macro that reads another file ({value[:60]!r})")
            if value.startswith("@"):
                return self.reference(value[1:], package)
            return value
        if isinstance(value, list):
            return [self.value(item, f"{where}::{index}", package) for index, item in enumerate(value)]
        if isinstance(value, dict):
            if "_target_" in value:
                return self.component(value, where, package)
            return {key: self.value(item, f"{where}::{key}", package) for key, item in value.items()}
        return value

    def component(self, spec: dict, where: str, package: str):
        if "_mode_" in spec:
            raise BundleError(f"{self.source}: '{where}::_mode_' asks for a callable, not a component")
        if spec.get("_disabled_") is True:
            return None
        cls = allowed_class(spec["_target_"], package, f"{where}::_target_", self.source)
        if cls.__name__ in LEFT_OUT:
            return None  # its arguments (an output folder, often an expression) are never read
        if cls.__name__ in ("Lambda", "Lambdad"):
            known = known_function(spec.get("func"))
            if known is None:
                raise BundleError(f"{self.source}: '{where}::func' is a function written in the bundle "
                                  f"({str(spec.get('func'))[:60]!r}); only known bundles' functions are run, "
                                  "as this project's own code")
            spec = {**spec, "func": known[0]}
        kwargs = {key: item if key == "func" and callable(item) else self.value(item, f"{where}::{key}", package)
                  for key, item in spec.items() if key not in SPECIAL_KEYS}
        if cls.__name__ == "Compose" and isinstance(kwargs.get("transforms"), list):
            kwargs["transforms"] = [t for t in kwargs["transforms"] if t is not None]  # left out or disabled
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{self.source}: '{where}' ({cls.__name__}) cannot be built: "
                              f"{str(exc).splitlines()[0]}") from None


def allowed_class(target, package: str, where: str, source: str = "the bundle"):
    """A class named by ``_target_``, only from ``package`` (short names are looked up there)."""
    if not isinstance(target, str) or not target.replace(".", "").replace("_", "").isalnum():
        raise BundleError(f"{source}: '{where}' is {target!r}, not the name of a {package} class")
    name = target[len(package) + 1:] if target.startswith(package + ".") else target
    if "." in name or name.startswith("_"):
        raise BundleError(f"{source}: '{where}' names {target!r}, which is not in {package}; refused")
    cls = getattr(importlib.import_module(package), name, None)
    if not inspect.isclass(cls):
        raise BundleError(f"{source}: '{where}' names {target!r}, which is not a {package} class; refused")
    return cls


def build_sections(config: dict, source: str = "inference.json", network: bool = True) -> dict:
    """``network_def``, ``preprocessing``, ``inferer`` and ``postprocessing``, built from literals
    and allow-listed MONAI classes; missing optional sections are None. ``network=False``
    leaves the network out (a model card keeps it apart, with the weights)."""
    builder = _Builder(config, source)
    out = {"network_def": builder.section("network_def")} if network else {}
    for key in ("preprocessing", "inferer", "postprocessing"):
        out[key] = builder.section(key) if key in config else None
    return out


# -- importing a bundle as a model -------------------------------------------------------
# Only these top-level entries (and the literals they refer to) go into the card: enough to
# rebuild the prediction, never the bundle's training, evaluation or file-writing parts.
PREDICTION_SECTIONS = ("preprocessing", "inferer", "postprocessing")
LOADERS = {"LoadImage", "LoadImaged"}
NETWORK = "MonaiBundleNetwork"


def _references(value, config: dict, found: set) -> None:
    """The top-level entries that ``value`` refers to with ``@key``, transitively."""
    if isinstance(value, str) and value.startswith("@"):
        key = value[1:].split("::")[0]
        if key not in found and key in config:
            found.add(key)
            _references(config[key], config, found)
    elif isinstance(value, list):
        for item in value:
            _references(item, config, found)
    elif isinstance(value, dict):
        if str(value.get("_target_", "")).rsplit(".", 1)[-1] in LEFT_OUT:
            return  # never built, so what it refers to is never needed
        for item in value.values():
            _references(item, config, found)


def prediction_config(config: dict) -> dict:
    """The part of ``inference.json`` that a prediction needs, checked by building it once."""
    build_sections(config)  # refuses code and unknown classes before anything is kept
    keep = {key for key in PREDICTION_SECTIONS if key in config}
    for key in list(keep):
        _references(config[key], config, keep)
    return {key: config[key] for key in config if key in keep}


def _inlined(value, config: dict, where: str, seen: tuple = ()):
    """``value`` with every ``@key`` replaced by the literal it names (the network's arguments)."""
    if isinstance(value, str) and value.startswith("@"):
        key = value[1:]
        if key in seen or key not in config:
            raise BundleError(f"inference.json: '{where}' refers to '@{key}', which names nothing usable")
        return _inlined(config[key], config, where, seen + (key,))
    if isinstance(value, list):
        return [_inlined(v, config, f"{where}::{i}", seen) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _inlined(v, config, f"{where}::{k}", seen) for k, v in value.items()}
    return value


def build_bundle_network(network_def: dict, **_channels):
    """The network a card's ``network_def`` names (re-checked against the allow-list on every load)."""
    return _Builder({"network_def": network_def}, "the model card").section("network_def")


def _channel_names(definition: dict, count: int, fallback: str) -> list:
    names = {int(k): str(v) for k, v in (definition or {}).items() if str(k).isdigit()}
    return [names.get(i, f"{fallback} {i}") for i in range(count)]


def _written_labels(postprocessing) -> dict:
    """The labels that a known function in the postprocessing writes ({} when none does)."""
    transforms = postprocessing.get("transforms") if isinstance(postprocessing, dict) else None
    for spec in transforms or ():
        if isinstance(spec, dict) and str(spec.get("_target_", "")).rsplit(".", 1)[-1] in ("Lambda", "Lambdad"):
            known = known_function(spec.get("func"))
            if known is not None:
                return dict(known[1])
    return {}


def _first(transforms, names: set) -> dict | None:
    for spec in transforms:
        if isinstance(spec, dict) and str(spec.get("_target_", "")).rsplit(".", 1)[-1] in names:
            return spec
    return None


def read_weights(bundle: Path) -> dict:
    """``models/model.pt``: a state dict (or ``{"model": state dict}``), read with ``weights_only=True``;
    without it, the weights of a TorchScript ``models/model.ts`` (see :func:`torchscript_weights`)."""
    import torch

    path = bundle / "models" / "model.pt"
    if not path.is_file():
        if (bundle / "models" / "model.ts").is_file():
            return torchscript_weights(bundle / "models" / "model.ts")
        raise BundleError(f"'{bundle.name}' has no models/model.pt (or model.ts)")
    import pickle

    from .models import refused_pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise BundleError(f"refusing the bundle's model.pt: it holds {refused_pickle(exc)}, which could run code "
                          "when loaded; only a plain state dict is read") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise BundleError(f"the bundle's model.pt is not a readable torch file ({str(exc).splitlines()[0][:120]})") \
            from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # MONAI's CheckpointSaver writes {"model": ...}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleError("models/model.pt is not a state dict of tensors")
    return state


def torchscript_weights(path: Path) -> dict:
    """The parameters and buffers of a TorchScript archive, as a state dict.

    Only its tensors are kept: they are loaded into the network that ``network_def`` names
    (built from the allow-list), so the archive's own code never runs in a prediction.
    ``torch.jit.load`` compiles that code to read the tensors, and unpickles nothing but
    torch's own types."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # torch.jit is deprecated; reading it is still supported
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise BundleError(f"the bundle's {path.name} is not a readable TorchScript archive "
                          f"({str(exc).splitlines()[0][:120]})") from None
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def model_from_bundle(path, name: str | None = None, version: str | None = None, progress=None):
    """``(network, card)`` for a MONAI bundle: MONAI's network from ``network_def``, the weights
    from ``models/model.pt``, and the prediction sections kept in the card, to run through
    MONAI's own transforms and inferer."""
    from .card import FORMAT, default_color, parse_card

    bundle = Path(path).expanduser()
    config, metadata = read_config(bundle), read_config(bundle, "metadata.json")  # its channels and labels
    if "network_def" not in config:
        raise BundleError("inference.json has no network_def; the network is built only from it (a TorchScript "
                          "model alone would run its own code, which is not done here)")
    kept = prediction_config(config)
    if "inferer" not in kept or "preprocessing" not in kept:
        raise BundleError("inference.json needs a 'preprocessing' and an 'inferer' to predict")
    network_def = _inlined(config["network_def"], config, "network_def")
    network = build_sections(config)["network_def"]
    weights_file = "model.pt" if (bundle / "models" / "model.pt").is_file() else "model.ts"
    report(progress, 0.3, f"reading models/{weights_file}")
    try:
        network.load_state_dict(read_weights(bundle))
    except RuntimeError as exc:
        raise BundleError(f"models/{weights_file} does not fit network_def ({str(exc).splitlines()[0][:160]})") \
            from None
    formats = metadata.get("network_data_format") or {}
    inputs = next(iter((formats.get("inputs") or {}).values()), {}) or {}
    outputs = next(iter((formats.get("outputs") or {}).values()), {}) or {}
    in_channels = int(network_def.get("in_channels", inputs.get("num_channels", 1)))
    out_channels = int(network_def.get("out_channels", outputs.get("num_channels", 2)))
    written = _written_labels(kept.get("postprocessing"))
    labels = _channel_names(outputs.get("channel_def"), out_channels, "class")
    label_rows = [{"value": v, "name": n, "color": default_color(v)} for v, n in enumerate(labels)]
    if written:    # the network's channels are regions; a known function writes these labels
        label_rows = [{"value": 0, "name": "background", "color": default_color(0)}] + [
            {"value": v, "name": n, "color": default_color(v)} for v, n in sorted(written.items())]
        kept["label_values"] = [row["value"] for row in label_rows]
    steps = list(kept["preprocessing"].get("transforms") or []) if isinstance(kept["preprocessing"], dict) else []
    spacing = (_first(steps, {"Spacingd", "Spacing"}) or {}).get("pixdim")
    window = _first(steps, {"ScaleIntensityRanged", "ScaleIntensityRange"})
    inferer = kept["inferer"] if isinstance(kept["inferer"], dict) else {}
    roi = _inlined(inferer.get("roi_size", [96, 96, 96]), config, "inferer::roi_size")
    modality = str(inputs.get("modality") or "any").upper()
    normalisation = {"kind": "ct", "window": [float(window["a_min"]), float(window["a_max"])]} \
        if window and all(isinstance(window.get(k), (int, float)) for k in ("a_min", "a_max")) else {"kind": "zscore"}
    licence = metadata.get("license") or metadata.get("licence")
    if not licence and (bundle / "LICENSE").is_file():
        licence = next(iter((bundle / "LICENSE").read_text(encoding="utf-8", errors="replace").split("\n")), "")
    card = parse_card({
        "format": FORMAT, "format_version": 2,
        "name": name or bundle.name.replace(" ", "_"),
        "version": version or str(metadata.get("version") or "1.0.0"),
        "network": {"architecture": NETWORK,
                    "hparams": {"network_def": network_def, "in_channels": in_channels, "out_channels": out_channels}},
        "labels": label_rows,
        "domain": {"modality": modality if modality in ("CT", "MR") else "any", "contrast": None,
                   "body_part": None, "description": str(metadata.get("description") or metadata.get("name") or "")},
        "channels": _channel_names(inputs.get("channel_def"), in_channels, "image"),
        "pipeline": {
            "kind": "monai_bundle", "bundle": kept,
            "axis_order": "RAS", "roi": {"kind": "none"},
            "grid": {"kind": "spacing", "spacing": [float(v) for v in spacing]}
            if isinstance(spacing, list) and len(spacing) == 3 and all(isinstance(v, (int, float)) for v in spacing)
            else {"kind": "spacing", "spacing": [1.0, 1.0, 1.0]},
            "normalisation": normalisation,
            "patch_size": [int(v) for v in roi],
            "output": "logits",
        },
        "explain": [],  # the maps run on our pipeline's grid, which a bundle's transforms replace
        "provenance": {"source": f"MONAI bundle {metadata.get('name') or bundle.name} {metadata.get('version', '')}".strip(),
                       "weights": "float32", "weights_file": f"models/{weights_file}",
                       "kind": "monai_bundle", "monai_version": metadata.get("monai_version"),
                       "training_data": str(metadata.get("data_source") or "not stated in metadata.json"),
                       "intended_use": metadata.get("intended_use")},
        "licence": str(licence) if licence else "not stated in the bundle; ask whoever trained the model",
        "citation": "; ".join(str(r) for r in metadata.get("references") or []) or None,
    }, bundle.name)
    report(progress, 1.0, "read the bundle")
    return network, card


def import_bundle(path, registry=None, name: str | None = None, version: str | None = None, progress=None):
    """Import a MONAI bundle into the model registry as a new, current version (float32 weights)."""
    from .models import ModelRegistry

    registry = registry or ModelRegistry()
    network, card = model_from_bundle(path, name, version, progress)
    if any(entry.name == card.name and entry.version == card.version for entry in registry.entries()):
        raise MedsegError(f"{card.title} is already installed; pass --version (or --name) to import another copy")
    return registry.add_version(network, card, make_current=True)


# -- predicting through the bundle's own transforms ---------------------------------------

def _window_count(shape, roi, overlap: float) -> int:
    import math

    count = 1
    for size, tile in zip(shape, roi):
        tile = min(int(tile), int(size)) if int(tile) > 0 else int(size)
        interval = max(int(tile * (1 - overlap)), 1)
        count *= 1 if size <= tile else math.ceil((size - tile) / interval) + 1
    return count


class _CountingPredictor:
    """The network as MONAI's inferer calls it, reporting progress (and so cancel) per batch."""

    def __init__(self, predictor, total: int, progress):
        self.predictor, self.total, self.progress, self.done = predictor, max(total, 1), progress, 0

    def __call__(self, windows):
        report(self.progress, self.done / self.total, f"window {min(self.done + 1, self.total)} of {self.total}")
        out = self.predictor.forward(windows.to(self.predictor.device, memory_format=self.predictor.memory_format))
        self.done += int(windows.shape[0])
        return out


def _classes_innermost(scores):
    """The same values, laid out with the class axis innermost: torch's CPU argmax over the
    outermost axis of a (C, X, Y, Z) tensor is about 30x slower (2 s for a 512x512x48 CT)."""
    import torch

    if isinstance(scores, torch.Tensor) and scores.ndim == 4 and scores.is_floating_point() and scores.shape[0] > 1:
        return scores.movedim(0, -1).contiguous().movedim(-1, 0)
    return scores


def bundle_prediction(layer_array, layer_affine_ras, card, network, device, amp=None, want_probabilities=False,
                      progress=None, geometry=None):
    """``(labels, probabilities or None, info)`` on the scan's grid, from the card's bundle sections.

    The scan enters as the MetaTensor that MONAI's ``LoadImaged`` would give (RAS affine, no
    channel axis; several channels first), so every later transform, the inferer and
    ``Invertd`` are the bundle's own. With the scan's ``geometry``, its voxels enter in the
    file's own order, as ``LoadImaged`` reads them: a bundle without ``Orientationd`` (the
    zoo's BraTS one) sees what it was trained on. The result comes back in layer order.
    """
    import numpy as np
    import torch

    if geometry is not None and geometry.source_format != "napari":
        channels = layer_array if np.ndim(layer_array) == 4 else None
        in_file = np.stack([geometry.to_file(c) for c in channels]) if channels is not None else \
            geometry.to_file(layer_array)
        labels, probabilities, info = bundle_prediction(in_file, geometry.affine_ras, card, network, device, amp,
                                                        want_probabilities, progress)
        if probabilities is not None:
            probabilities = torch.stack([torch.from_numpy(np.ascontiguousarray(geometry.to_layer(c.numpy())))
                                         for c in probabilities])
        return np.ascontiguousarray(geometry.to_layer(labels)), probabilities, info
    import time

    from monai.data import MetaTensor
    from monai.transforms import AsDiscreted

    from .inference import NetworkPredictor

    sections = build_sections(card.pipeline.bundle, "the model card's bundle", network=False)
    preprocessing, inferer, postprocessing = sections["preprocessing"], sections["inferer"], sections["postprocessing"]
    loaders = [t for t in preprocessing.transforms if type(t).__name__ in LOADERS]
    image_key = (list(getattr(loaders[0], "keys", ())) or ["image"])[0] if loaders else "image"
    # The scan is already read (from any format we read, DICOM included): only the loader goes.
    # Invertd inverts this same Compose object, so the transforms stay the ones that ran.
    preprocessing.transforms = tuple(t for t in preprocessing.transforms if type(t).__name__ not in LOADERS)
    affine = torch.as_tensor(np.asarray(layer_affine_ras, dtype=np.float64))
    spatial = tuple(np.shape(layer_array)[-3:])
    # Several channels enter as LoadImaged stacks several files: channel first.
    channel_dim = 0 if np.ndim(layer_array) == 4 else "no_channel"
    image = MetaTensor(torch.from_numpy(np.ascontiguousarray(layer_array, dtype=np.float32)), affine=affine,
                       meta={"original_affine": affine.clone(), "spatial_shape": np.asarray(spatial),
                             "original_channel_dim": channel_dim, "space": "RAS", "filename_or_obj": "scan"})
    report(progress, 0.0, "preparing the scan (the bundle's transforms)")
    data = preprocessing({image_key: image})
    network_input = data[image_key]
    predictor = NetworkPredictor(network, output="logits", amp=amp).to(device)
    roi = tuple(getattr(inferer, "roi_size", card.pipeline.patch_size))
    overlap = float(getattr(inferer, "overlap", 0.25))
    counting = _CountingPredictor(predictor, _window_count(network_input.shape[1:], roi, overlap),
                                  span(progress, 0.05, 0.85))
    started = time.perf_counter()
    with torch.inference_mode():
        logits = inferer(network_input[None].to(device), counting)
    seconds = time.perf_counter() - started
    report(progress, 0.9, "mapping the result onto the scan grid (the bundle's inverse transforms)")
    data["pred"] = logits[0].float().cpu()
    probabilities = None
    for transform in (postprocessing.transforms if postprocessing is not None else ()):
        if isinstance(transform, AsDiscreted):
            if want_probabilities and probabilities is None:
                probabilities = torch.as_tensor(data["pred"]).clone()
            data["pred"] = _classes_innermost(data["pred"])
        data = transform(data)
    labels = torch.as_tensor(data["pred"])
    if labels.ndim == 4:
        labels = labels[0] if labels.shape[0] == 1 else labels.argmax(0)
    labels = labels.round().to(torch.uint8).numpy()
    if labels.shape != spatial:
        raise BundleError(f"the bundle's postprocessing gave a {labels.shape} mask for a {spatial} scan; "
                          "it needs an Invertd back onto the input")
    info = {"windows": counting.done, "seconds": seconds, "device": str(device),
            "network_shape": list(network_input.shape[1:])}
    return labels, probabilities, info
