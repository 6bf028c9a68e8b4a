"""nnU-Net v2 results folders, read without running their code.

A trained configuration folder (``TRAINER__PLANS__CONFIG/``) holds ``dataset.json``,
``plans.json`` and ``fold_*/checkpoint_{final,best}.pth``. The checkpoints are pickles;
nnU-Net loads them with ``weights_only=False``, which would run any code a file carries.
Here ``torch.load(weights_only=True)`` reads them with exactly the numpy globals that
nnU-Net's checkpoints need, and anything else is refused with one line.

The network is built from ``plans.json`` with nnU-Net's own network package
(``dynamic_network_architectures``), and only from classes on an allow-list: a plans
file is data, and must not be able to name an arbitrary callable.
"""

from __future__ import annotations

import importlib
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .card import Normalisation
from .errors import MedsegError

# What ``torch.load(weights_only=True)`` may rebuild beyond tensors and plain containers:
# the numpy scalars and dtypes in a checkpoint's logging. Checkpoints saved under numpy 1.x
# name the scalar ``numpy.core.multiarray.scalar``; it is allowed by that name too.
_multiarray = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray")
CHECKPOINT_GLOBALS = [
    _multiarray.scalar,
    (_multiarray.scalar, "numpy.core.multiarray.scalar"),
    np.dtype,
    np.dtypes.Float32DType,
]
NETWORK_PACKAGE = "dynamic_network_architectures.architectures."
# The classes a plans file may name for the network's operations.
OPERATIONS = {
    f"torch.nn.{name}" for name in (
        "Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "ConvTranspose3d",
        "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "BatchNorm2d", "BatchNorm3d", "GroupNorm",
        "Dropout", "Dropout2d", "Dropout3d", "LeakyReLU", "ReLU", "PReLU", "GELU", "ELU")
}
OPERATION_MODULES = {"conv", "instancenorm", "batchnorm", "normalization", "dropout", "activation"}
FOLD_PATTERN = re.compile(r"^fold_(\d+|all)$")


@dataclass
class NnUNetCheckpoint:
    weights: dict                      # the network's state dict
    mirroring_axes: tuple | None       # the axes nnU-Net mirrors at inference (test-time augmentation)
    trainer: str


def read_checkpoint(path: str | Path) -> NnUNetCheckpoint:
    """The weights and inference settings of an nnU-Net ``checkpoint_*.pth``, read without unpickling code."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc)) or re.search(r"but got <class '([\w.]+)'>", str(exc))
        what = f"a pickled object of type {found.group(1)}" if found else "a pickled object that is not weights"
        raise MedsegError(f"refusing nnU-Net checkpoint '{path.name}': it holds {what}, which could run code "
                          "when loaded") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise MedsegError(f"cannot read nnU-Net checkpoint '{path.name}': {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("network_weights"), dict):
        raise MedsegError(f"'{path.name}' is not an nnU-Net checkpoint (it has no 'network_weights')")
    axes = raw.get("inference_allowed_mirroring_axes")
    return NnUNetCheckpoint(weights=dict(raw["network_weights"]),
                            mirroring_axes=tuple(int(a) for a in axes) if axes is not None else None,
                            trainer=str(raw.get("trainer_name") or ""))


def _operation(dotted: str, where: str):
    """A torch.nn class named in a plans file, only from the allow-list (full or short module path)."""
    parts = dotted.split(".")
    short = f"torch.nn.{parts[-1]}"
    full_ok = (len(parts) == 5 and parts[:3] == ["torch", "nn", "modules"] and parts[3] in OPERATION_MODULES)
    if short not in OPERATIONS or not (dotted == short or full_ok):
        raise MedsegError(f"plans.json: {where} names '{dotted}', which is not a network operation this "
                          "plugin builds; refused")
    return getattr(torch.nn, parts[-1])


def network_class(name: str):
    """An nnU-Net network class by its dotted name, only from ``dynamic_network_architectures``."""
    module_name, _, class_name = name.rpartition(".")
    if not name.startswith(NETWORK_PACKAGE) or not class_name.isidentifier() or class_name.startswith("_"):
        raise MedsegError(f"plans.json: network_class_name '{name}' is not one of nnU-Net's networks "
                          f"({NETWORK_PACKAGE}*); refused")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        raise MedsegError(f"plans.json names '{name}', but it cannot be imported ({exc}); "
                          "install dynamic-network-architectures") from None
    except AttributeError:
        raise MedsegError(f"plans.json: '{name}' does not exist in nnU-Net's network package") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise MedsegError(f"plans.json: '{name}' is not a network; refused")
    return cls


def build_network(plans: dict, configuration: str, input_channels: int, output_channels: int) -> torch.nn.Module:
    """The configuration's network as nnU-Net builds it for inference (no deep supervision)."""
    try:
        architecture = plans["configurations"][configuration]["architecture"]
        name, kwargs = architecture["network_class_name"], dict(architecture["arch_kwargs"])
        requires_import = list(architecture.get("_kw_requires_import") or [])
    except (KeyError, TypeError):
        raise MedsegError(f"plans.json has no architecture for configuration '{configuration}'") from None
    cls = network_class(name)
    for key in requires_import:
        if kwargs.get(key) is not None:
            kwargs[key] = _operation(str(kwargs[key]), f"arch_kwargs.{key}")
    for key, value in kwargs.items():
        if key not in requires_import and not _literal(value):
            raise MedsegError(f"plans.json: arch_kwargs.{key} is not a literal value; refused")
    try:
        return cls(input_channels=input_channels, num_classes=output_channels, deep_supervision=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MedsegError(f"plans.json: {name} cannot be built from its arch_kwargs ({reason})") from None


def _literal(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_literal(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _literal(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


@dataclass
class ResultsFolder:
    """A trained nnU-Net configuration: its folder, dataset.json, plans.json and folds."""

    folder: Path
    dataset: dict
    plans: dict
    configuration: str
    folds: dict                       # fold name -> its folder

    @property
    def channel_names(self) -> list:
        names = self.dataset.get("channel_names") or self.dataset.get("modality") or {}
        return [str(names[key]) for key in sorted(names, key=int)]

    @property
    def label_names(self) -> dict:
        """{value: name} from dataset.json's ``labels`` ({name: value}); regions are not supported."""
        labels = self.dataset.get("labels") or {}
        out = {}
        for name, value in labels.items():
            if not isinstance(value, int):
                raise MedsegError(f"dataset.json: label '{name}' is a region ({value}); region-based nnU-Net "
                                  "models are not supported yet")
            out[value] = str(name)
        return dict(sorted(out.items()))

    def checkpoint(self, fold: str, which: str = "final") -> Path:
        if fold not in self.folds:
            raise MedsegError(f"'{self.folder.name}' has no fold {fold} (it has: {', '.join(self.folds) or 'none'})")
        path = self.folds[fold] / f"checkpoint_{which}.pth"
        if not path.is_file():
            raise MedsegError(f"fold {fold} of '{self.folder.name}' has no checkpoint_{which}.pth")
        return path


def find_results_folder(path: str | Path) -> ResultsFolder:
    """A trained configuration folder, given it or the dataset folder above it (one configuration)."""
    path = Path(path)
    if not path.is_dir():
        raise MedsegError(f"'{path.name}' is not a folder")
    candidates = [path] if (path / "plans.json").is_file() else sorted(
        child for child in path.iterdir() if child.is_dir() and (child / "plans.json").is_file())
    if not candidates:
        raise MedsegError(f"'{path.name}' is not an nnU-Net results folder (no plans.json in it or below it)")
    if len(candidates) > 1:
        raise MedsegError(f"'{path.name}' holds {len(candidates)} trained configurations "
                          f"({', '.join(c.name for c in candidates)}); give one of them")
    folder = candidates[0]
    parts = folder.name.split("__")
    if len(parts) != 3:
        raise MedsegError(f"'{folder.name}' is not named TRAINER__PLANS__CONFIGURATION as nnU-Net names it")
    try:
        dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
        plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MedsegError(f"'{folder.name}' has no {Path(exc.filename).name}") from None
    except (OSError, ValueError) as exc:
        raise MedsegError(f"cannot read '{folder.name}': {exc}") from None
    folds = {match.group(1): child for child in sorted(folder.iterdir())
             if child.is_dir() and (match := FOLD_PATTERN.match(child.name))}
    return ResultsFolder(folder=folder, dataset=dataset, plans=plans, configuration=parts[2], folds=folds)


def channel_normalisations(plans: dict, configuration: str) -> list:
    """Each input channel's normalisation as the card declares it, from the plans."""
    try:
        schemes = plans["configurations"][configuration]["normalization_schemes"]
        properties = plans.get("foreground_intensity_properties_per_channel") or {}
    except (KeyError, TypeError):
        raise MedsegError(f"plans.json has no normalization_schemes for configuration '{configuration}'") from None
    out = []
    for channel, scheme in enumerate(schemes):
        if scheme != "CTNormalization":
            raise MedsegError(f"plans.json: channel {channel} uses {scheme}, which the import does not "
                              "reproduce yet (only CTNormalization)")
        stats = properties.get(str(channel))
        if not stats:
            raise MedsegError(f"plans.json has no foreground intensity properties for channel {channel}")
        out.append(Normalisation(kind="ct_zscore", window=(float(stats["percentile_00_5"]),
                                                           float(stats["percentile_99_5"])),
                                 mean=float(stats["mean"]), std=float(stats["std"]), statistics="field_of_view"))
    return out
