"""Published networks as first-class models: deepbet's two networks in our model format.

deepbet 1.0.2 (Fisch et al. 2024, MIT) ships two TorchScript ``LinkNet3d`` networks in
its wheel, under ``data/models/`` at the top of site-packages: ``bbox_model.pt`` finds
the brain's box at 128³, ``model.pt`` segments the box at 256³. The converter checks
each file's SHA-256 against the releases it knows, refuses anything else, and only
then opens them (``torch.jit.load`` of a known file), copies their weights into the
eager :class:`~napari_medseg.core.network.LinkNet3d` (every key must match), and writes
one safetensors model file whose card declares deepbet's pipeline with our changes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .card import ModelCard, explain_methods_for, parse_card
from .errors import MedsegError
from .outputs import sha256_of_file
from .network import LinkNet3d

DEEPBET_FILES = ("bbox_model.pt", "model.pt")
# SHA-256 of the weights in each deepbet release we can convert.
KNOWN_DEEPBET = {
    "1.0.2": {
        "bbox_model.pt": "39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa",
        "model.pt": "de8ee7c69654d0dd3935dc4a5d84571d8ecf4637a6bfc01df399c4c2bc86e0fd",
    },
}
DEEPBET_CITATION = ("Fisch L, Zumdick S, Barkhau C, et al. deepbet: Fast brain extraction of T1-weighted MRI "
                    "using Convolutional Neural Networks. Computers in Biology and Medicine 179 (2024) 108845. "
                    "doi:10.1016/j.compbiomed.2024.108845")
DEEPBET_LICENCE = "MIT (deepbet 1.0.2, Copyright (c) 2023 Medical Machine Learning Lab - University of Münster)"


def find_deepbet(source: str | Path | None = None) -> Path:
    """The folder holding deepbet's two weight files: ``source``, or the installed package's."""
    if source is not None:
        folder = Path(source)
        for candidate in (folder, folder / "data" / "models", folder / "models"):
            if all((candidate / name).is_file() for name in DEEPBET_FILES):
                return candidate
        raise MedsegError(f"'{folder.name}' does not hold deepbet's {' and '.join(DEEPBET_FILES)}")
    from importlib import metadata

    try:
        distribution = metadata.distribution("deepbet")
    except metadata.PackageNotFoundError:
        raise MedsegError("deepbet is not installed; install it with 'pip install --no-deps deepbet==1.0.2' "
                          "or pass --source DIR with its bbox_model.pt and model.pt") from None
    for entry in distribution.files or ():
        if str(entry).replace("\\", "/").endswith("data/models/model.pt"):
            folder = Path(distribution.locate_file(entry)).parent
            if all((folder / name).is_file() for name in DEEPBET_FILES):
                return folder
    raise MedsegError(f"the installed deepbet {distribution.version} has no data/models/ weights")


def identify(folder: Path) -> str:
    """The deepbet release whose weights these are; unknown weights are refused."""
    hashes = {name: sha256_of_file(folder / name) for name in DEEPBET_FILES}
    for release, known in KNOWN_DEEPBET.items():
        if hashes == known:
            return release
    raise MedsegError(f"refusing to convert: the weights in '{folder.name}' are not a deepbet release this "
                      f"version knows (model.pt SHA-256 {hashes['model.pt'][:12]}...)")


def _eager(path: Path) -> LinkNet3d:
    scripted = torch.jit.load(str(path), map_location="cpu")  # a file whose hash we know
    network = LinkNet3d()
    try:
        network.load_state_dict(scripted.state_dict(), strict=True)
    except RuntimeError as exc:
        raise MedsegError(f"'{path.name}' does not have deepbet's LinkNet3d layout "
                          f"({str(exc).splitlines()[0][:120]})") from None
    return network.eval()


def deepbet_card(name: str, version: str, release: str) -> ModelCard:
    """deepbet's pipeline in our card, with what we changed marked in the provenance."""
    return parse_card({
        "format": "napari-medseg-model", "format_version": 2, "name": name, "version": version,
        "network": {"architecture": "LinkNet3d",
                    "hparams": {"in_channels": 1, "out_channels": 2, "channels": [16, 32, 64, 128]}},
        "roi_network": {"architecture": "LinkNet3d",
                        "hparams": {"in_channels": 1, "out_channels": 2, "channels": [16, 32, 64, 128]}},
        "labels": [{"value": 0, "name": "background", "color": [0, 0, 0, 0]},
                   {"value": 1, "name": "brain", "color": [0.95, 0.35, 0.2, 1], "expected_ml": [800, 2300]}],
        "domain": {"modality": "MR", "contrast": "T1", "body_part": "head",
                   "description": "brain extraction on T1-weighted head MRI of adults"},
        "pipeline": {
            "axis_order": "RAS",
            "roi": {"kind": "network", "input_shape": [128, 128, 128], "margin_fraction": 0.1,
                    "margin_mm": 10.0, "threshold": 0.5},
            "grid": {"kind": "shape", "shape": [256, 256, 256], "interpolation": "area"},
            "normalisation": {"kind": "quantile_zscore", "quantiles": [0.5, 99.5], "mean": 0.449, "std": 0.226,
                              "statistics": "region"},
            "patch_size": [256, 256, 256],
            "output": "probabilities",
            "threshold": 0.5,
            "postprocessing": ["largest_component", "fill_holes"],
        },
        "checks": {"max_foreground_ml": 2500, "max_body_fraction": 0.95},
        "explain": explain_methods_for("LinkNet3d"),
        "licence": DEEPBET_LICENCE,
        "citation": DEEPBET_CITATION,
        "provenance": {
            "source": f"PyPI deepbet=={release}, data/models/bbox_model.pt and model.pt (TorchScript)",
            "source_sha256": KNOWN_DEEPBET[release],
            "training_data": "7,837 T1-weighted MRI scans from 191 OpenNeuro datasets (healthy adults), as "
                             "described by the authors (Fisch et al. 2024); the networks are theirs, unchanged",
            "converted_by": "napari-medseg models convert deepbet: the TorchScript weights copied into an eager "
                            "LinkNet3d (every key matching), so it trains and takes forward hooks",
            "changes": [
                "before the first stage, the scan is cropped to the imaged head's extent plus 10 mm, and the "
                "intensity quantiles come from that region, so air padding does not change the input",
                "both stages resample with block averaging (anti-aliased) instead of nearest-neighbour",
                "the probabilities go back onto the scan grid by linear interpolation, then the 0.5 threshold",
                "optional mirror test-time augmentation",
                "deepbet's exact steps stay available (statistics: field_of_view, interpolation: nearest) for the "
                "equivalence check in benchmarks/eval_brain_model.py",
            ],
        },
        "metrics": {},
    }, name)


def convert_deepbet(target: str | Path, source: str | Path | None = None, name: str = "brain-t1",
                    version: str = "2.0.0", half_precision: bool = False) -> ModelCard:
    """Convert deepbet's weights into one model file at ``target``; returns its card."""
    from .models import read_model_file, save_model

    folder = find_deepbet(source)
    release = identify(folder)
    roi_network, network = (_eager(folder / filename) for filename in DEEPBET_FILES)
    card = deepbet_card(name, version, release)
    save_model(target, network, card, roi_network, half_precision=half_precision)
    return read_model_file(target)[1]
