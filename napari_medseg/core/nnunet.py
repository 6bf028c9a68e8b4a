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

from .card import Normalisation, default_color, explain_methods_for, parse_card, FORMAT
from .errors import MedsegError
from .progress import Progress, report

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
        from .models import refused_pickle

        raise MedsegError(f"refusing nnU-Net checkpoint '{path.name}': it holds {refused_pickle(exc)}, which could run code "
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


def architecture_of(plans: dict, configuration: str) -> dict:
    """The configuration's architecture entry: class name, keyword arguments, which of them name classes."""
    try:
        architecture = plans["configurations"][configuration]["architecture"]
        return {"network_class_name": str(architecture["network_class_name"]),
                "arch_kwargs": dict(architecture["arch_kwargs"]),
                "kw_requires_import": list(architecture.get("_kw_requires_import") or [])}
    except (KeyError, TypeError):
        raise MedsegError(f"plans.json has no architecture for configuration '{configuration}'") from None


def build_network(plans: dict, configuration: str, input_channels: int, output_channels: int) -> torch.nn.Module:
    """The configuration's network as nnU-Net builds it for inference (no deep supervision)."""
    return build_from_architecture(architecture_of(plans, configuration), input_channels, output_channels)


def build_from_architecture(architecture: dict, input_channels: int, output_channels: int) -> torch.nn.Module:
    name = architecture["network_class_name"]
    kwargs = dict(architecture["arch_kwargs"])
    requires_import = list(architecture["kw_requires_import"])
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
    def regions(self) -> list:
        """A region-based model's ``[(name, value written), ...]``, one per network output, in
        nnU-Net's order (dataset.json's labels without background and ``ignore``, with
        ``regions_class_order``); empty for a model with one class per label."""
        labels = self.dataset.get("labels") or {}
        if not any(isinstance(v, (list, tuple)) for v in labels.values()):
            return []
        order = self.dataset.get("regions_class_order")
        names = [str(name) for name, value in labels.items() if name != "ignore" and value not in (0, [0], (0,))]
        if not isinstance(order, list) or len(order) != len(names) or len(set(order)) != len(order) \
                or not all(isinstance(v, int) and v > 0 for v in order):
            raise MedsegError(f"dataset.json: region-based labels need a regions_class_order with one distinct "
                              f"positive value per region ({len(names)}), got {order!r}")
        return list(zip(names, (int(v) for v in order)))

    @property
    def label_names(self) -> dict:
        """{value: name} from dataset.json's ``labels`` ({name: value}); for a region-based
        model, each region's name on the value it is written as ("whole tumor (not tumor
        core)": a later region overwrites an earlier one)."""
        labels = self.dataset.get("labels") or {}
        regions = self.regions
        if regions:
            # A value holds its region less the later regions written over it: named so.
            names = {value: name if index == len(regions) - 1 else f"{name} (not {regions[index + 1][0]})"
                     for index, (name, value) in enumerate(regions)}
            return dict(sorted({0: "background", **names}.items()))
        out = {}
        for name, value in labels.items():
            if name == "ignore":
                continue
            out[int(value)] = str(name)
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
    use_mask = list(plans["configurations"][configuration].get("use_mask_for_norm") or [False] * len(schemes))
    out = []
    for channel, scheme in enumerate(schemes):
        if scheme == "ZScoreNormalization":
            out.append(Normalisation(kind="zscore", use_mask=bool(use_mask[channel]), statistics="region"))
            continue
        if scheme != "CTNormalization":
            raise MedsegError(f"plans.json: channel {channel} uses {scheme}, which the import does not "
                              "reproduce yet (CTNormalization and ZScoreNormalization only)")
        stats = properties.get(str(channel))
        if not stats:
            raise MedsegError(f"plans.json has no foreground intensity properties for channel {channel}")
        out.append(Normalisation(kind="ct_zscore", window=(float(stats["percentile_00_5"]),
                                                           float(stats["percentile_99_5"])),
                                 mean=float(stats["mean"]), std=float(stats["std"]), statistics="field_of_view"))
    return out


class NnUNetEnsemble(torch.nn.Module):
    """An nnU-Net configuration's folds as one network: the mean of the folds' logits.

    nnU-Net averages the folds' sliding-window logits; blending and mirroring are linear,
    so averaging each window's logits gives the same result. It is a plain ``nn.Module``
    (Grad-CAM hooks, fine-tuning), built only from allow-listed classes (see above).
    """

    prefers_channels_last = False   # instance norm: faster in the contiguous layout, as nnU-Net runs it

    def __init__(self, network_class_name: str, arch_kwargs: dict, kw_requires_import: list,
                 in_channels: int, out_channels: int, folds: int = 1):
        super().__init__()
        architecture = {"network_class_name": network_class_name, "arch_kwargs": dict(arch_kwargs),
                        "kw_requires_import": list(kw_requires_import)}
        self.hparams = {**architecture, "in_channels": int(in_channels), "out_channels": int(out_channels),
                        "folds": int(folds)}
        self.folds = torch.nn.ModuleList(build_from_architecture(architecture, in_channels, out_channels)
                                         for _ in range(int(folds)))

    @property
    def divisor(self) -> int:
        """The smallest grid size every axis can take: the product of the strides (the largest axis's)."""
        strides = self.hparams["arch_kwargs"].get("strides") or [[1, 1, 1]]
        totals = [int(np.prod([s if isinstance(s, int) else s[axis] for s in strides])) for axis in range(3)]
        return max(totals)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.folds[0](x)
        for fold in self.folds[1:]:
            out = out + fold(x)
        return out / len(self.folds) if len(self.folds) > 1 else out


class NnUNetParts(torch.nn.Module):
    """A task split over several nnU-Net models (TotalSegmentator's ``total``: five datasets).

    Each part is an :class:`NnUNetEnsemble` with its own classes. The parts run in turn on
    one prepared input, and the card's ``pipeline.parts`` maps each part's classes onto the
    merged labels (see :func:`part_models`); there is no single forward pass.
    """

    def __init__(self, parts: list, in_channels: int, out_channels: int):
        super().__init__()
        self.hparams = {"parts": [dict(part) for part in parts], "in_channels": int(in_channels),
                        "out_channels": int(out_channels)}
        self.parts = torch.nn.ModuleList(NnUNetEnsemble(**part) for part in parts)

    @classmethod
    def of(cls, ensembles: list, out_channels: int) -> "NnUNetParts":
        """The parts from ensembles already read (their weights kept, not copied)."""
        model = cls([], int(ensembles[0].hparams["in_channels"]), out_channels)
        model.hparams["parts"] = [dict(e.hparams) for e in ensembles]
        model.parts = torch.nn.ModuleList(ensembles)
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise MedsegError("a model in parts runs one part at a time (see napari_medseg.core.nnunet.part_models)")


def part_models(model) -> list:
    """A model in parts as one :class:`~.models.Model` per part: its network, and a card with the
    part's classes (named by the merged labels they map onto) and the shared pipeline."""
    import dataclasses

    from .card import Label, NetworkSpec
    from .models import Model

    card = model.card
    merged_labels = {label.value: label for label in card.labels}
    out = []
    for network, table in zip(model.network.parts, card.pipeline.parts):
        labels = tuple(Label(value=part_value, name=merged_labels[merged].name, color=merged_labels[merged].color)
                       for part_value, merged in table)
        part_card = dataclasses.replace(
            card, labels=labels, network=NetworkSpec("NnUNetEnsemble", dict(network.hparams)),
            pipeline=dataclasses.replace(card.pipeline, parts=()))
        out.append(Model(network, part_card, model.path, model.roi_network))
    return out


# -- the import ------------------------------------------------------------------------------

RESAMPLING_FUNCTIONS = {"resample_data_or_seg_to_shape"}
ANISOTROPY_THRESHOLD = 3.0       # nnunetv2.configuration.ANISO_THRESHOLD
CT_NAMES = {"ct", "cect", "ncct", "cta"}
MR_NAMES = {"mr", "mri", "t1", "t1w", "t1ce", "t1c", "t1gd", "t2", "t2w", "flair", "t2f", "adc", "dwi", "pd"}
# The voxel order nnU-Net sees: SimpleITK's array of a scan stored with the identity direction
# (LPS), which is napari-medseg's layer order; the plans' transpose then applies to it.
NNUNET_READ_ORDER = "SPL"


def modality_of(channel_names: list, schemes: list) -> str:
    """CT when every channel is CT (by name, or by CTNormalization), MR when every name is an MR sequence."""
    names = [name.strip().lower().replace("-", "").replace(" ", "") for name in channel_names]
    if all(n in CT_NAMES for n in names) or (schemes and all(s == "CTNormalization" for s in schemes)):
        return "CT"
    if names and all(n in MR_NAMES or n.startswith(("t1", "t2")) for n in names):
        return "MR"
    return "any"


def _resampling(configuration: dict, which: str) -> dict:
    name = str(configuration.get(f"resampling_fn_{which}") or "")
    if name not in RESAMPLING_FUNCTIONS:
        raise MedsegError(f"plans.json: resampling_fn_{which} is '{name}', which the import does not reproduce "
                          f"(only {', '.join(sorted(RESAMPLING_FUNCTIONS))})")
    return dict(configuration.get(f"resampling_fn_{which}_kwargs") or {})


@dataclass
class TrainedConfiguration:
    """One trained configuration read for inference: its folds as one network, and its pipeline."""

    results: ResultsFolder
    network: NnUNetEnsemble
    pipeline: dict
    label_names: dict
    folds: list
    checkpoint: str

    @property
    def dataset_name(self) -> str:
        return str(self.results.plans.get("dataset_name") or self.results.folder.parent.name)

    @property
    def configuration(self) -> str:
        return self.results.configuration

    def provenance(self) -> dict:
        trainer, plans_name, _ = self.results.folder.name.split("__")
        return {"source": f"nnU-Net v2 results folder {self.dataset_name}/{self.results.folder.name}",
                "weights": "float32", "kind": "nnunet", "trainer": trainer, "plans": plans_name,
                "configuration": self.configuration, "folds": self.folds,
                "checkpoint": f"checkpoint_{self.checkpoint}.pth",
                "training_data": str(self.results.dataset.get("reference") or self.results.dataset.get("name") or
                                     self.dataset_name)}


def read_configuration(path, folds=None, checkpoint: str = "final", read_order: str = NNUNET_READ_ORDER,
                       progress: Progress | None = None) -> TrainedConfiguration:
    """A trained nnU-Net configuration's folds (weights loaded) and the pipeline that reproduces nnU-Net's.

    ``folds``: fold names (``["0", "1"]``, ``["all"]`` for ``fold_all``); None takes every
    numbered fold present, as ``nnUNetv2_predict`` does. ``read_order``: the voxel order the
    model was trained on, before the plans' transpose.
    """
    results = path if isinstance(path, ResultsFolder) else find_results_folder(path)
    if checkpoint not in ("final", "best"):
        raise MedsegError(f"--checkpoint must be final or best, got {checkpoint!r}")
    chosen = [str(f) for f in folds] if folds else [f for f in results.folds if f != "all"]
    if not chosen:
        raise MedsegError(f"'{results.folder.name}' has no trained folds (fold_0, fold_1, ...)")
    plans, configuration_name = results.plans, results.configuration
    configuration = (plans.get("configurations") or {}).get(configuration_name)
    if not isinstance(configuration, dict):
        raise MedsegError(f"plans.json has no configuration '{configuration_name}'")
    if configuration.get("previous_stage") or configuration_name.startswith("3d_cascade"):
        raise MedsegError(f"'{configuration_name}' is a cascade stage, which needs the low-resolution stage's "
                          "output; import 3d_fullres or 3d_lowres instead")
    patch = list(configuration.get("patch_size") or [])
    if len(patch) != 3:
        raise MedsegError(f"'{configuration_name}' is not a 3D configuration (patch {patch}); only 3D models run here")
    channels = results.channel_names
    if not channels:
        raise MedsegError(f"dataset.json of '{results.folder.name}' names no input channels (channel_names)")
    label_names = results.label_names
    regions = results.regions
    if not regions and sorted(label_names) != list(range(len(label_names))):
        raise MedsegError(f"dataset.json: label values must run 0..N-1, got {sorted(label_names)}")
    if "ignore" in (results.dataset.get("labels") or {}):
        raise MedsegError("dataset.json names an 'ignore' label; models trained with one are not imported yet")
    normalisations = channel_normalisations(plans, configuration_name)
    if len(normalisations) != len(channels):
        raise MedsegError(f"plans.json normalises {len(normalisations)} channels, but dataset.json names "
                          f"{len(channels)} ({', '.join(channels)})")
    data_kwargs, back_kwargs = _resampling(configuration, "data"), _resampling(configuration, "probabilities")
    transpose = [int(a) for a in plans.get("transpose_forward") or [0, 1, 2]]
    if sorted(transpose) != [0, 1, 2]:
        raise MedsegError(f"plans.json: transpose_forward {transpose} is not a permutation of three axes")
    architecture = architecture_of(plans, configuration_name)
    network = NnUNetEnsemble(**architecture, in_channels=len(channels),
                             out_channels=len(regions) if regions else len(label_names), folds=len(chosen))
    mirror_axes = None
    for index, fold in enumerate(chosen):
        report(progress, index / len(chosen), f"reading fold {fold} of {results.folder.parent.name}")
        read = read_checkpoint(results.checkpoint(fold, checkpoint))
        try:
            network.folds[index].load_state_dict(read.weights)
        except RuntimeError as exc:
            raise MedsegError(f"fold {fold}'s weights do not fit the network in plans.json "
                              f"({str(exc).splitlines()[0][:160]})") from None
        mirror_axes = read.mirroring_axes if index == 0 else mirror_axes
    pipeline = {
        "axis_order": "".join(read_order[a] for a in transpose),
        # nnU-Net reads the stored voxel order; TotalSegmentator turns scans to RAS first.
        "file_order": read_order == NNUNET_READ_ORDER,
        "roi": {"kind": "nonzero"},
        "grid": {"kind": "spacing", "spacing": [float(v) for v in configuration["spacing"]],
                 "interpolation": "spline", "order": int(data_kwargs.get("order", 3)),
                 "order_z": int(data_kwargs.get("order_z", 0)),
                 "back_order": int(back_kwargs.get("order", 1)), "back_order_z": int(back_kwargs.get("order_z", 0)),
                 "separate_z": data_kwargs.get("force_separate_z"), "anisotropy_threshold": ANISOTROPY_THRESHOLD},
        "normalisation": normalisations[0].to_dict(),
        # Each channel its own scheme, as nnU-Net normalises them (when they differ).
        **({"channel_normalisations": [n.to_dict() for n in normalisations]}
           if len({str(n.to_dict()) for n in normalisations}) > 1 else {}),
        "normalise_first": True,
        **({"regions": [value for _name, value in regions]} if regions else {}),
        "patch_size": patch,
        "output": "logits",
        "windows": {"plan": "step", "step": 0.5, "pad_value": 0.0,
                    "mirror_axes": list(mirror_axes or ()), "mirror_by_default": bool(mirror_axes),
                    "blend_dtype": "float16", "blend_folds_apart": True},
    }
    return TrainedConfiguration(results, network, pipeline, label_names, chosen, checkpoint)


def configuration_card(trained: TrainedConfiguration, name: str | None = None, version: str | None = None,
                       **overrides):
    """The card of one trained configuration; ``overrides`` replace its top-level entries."""
    results = trained.results
    schemes = list(results.plans["configurations"][trained.configuration].get("normalization_schemes") or [])
    licence = results.dataset.get("licence") or results.dataset.get("license")
    raw = {
        "format": FORMAT, "format_version": 2,
        "name": name or f"{trained.dataset_name}-{trained.configuration}".replace(" ", "_"),
        "version": version or "1.0.0",
        "network": {"architecture": "NnUNetEnsemble", "hparams": trained.network.hparams},
        "labels": [{"value": v, "name": n, "color": default_color(v)} for v, n in trained.label_names.items()],
        "domain": {"modality": modality_of(results.channel_names, schemes), "contrast": None, "body_part": None,
                   "description": str(results.dataset.get("description") or
                                      f"nnU-Net v2 model {trained.dataset_name} ({trained.configuration})")},
        "channels": results.channel_names,
        "pipeline": trained.pipeline,
        # Grad-CAM's classes and the entropy map are a softmax's; a region-based model has neither.
        "explain": [] if trained.pipeline.get("regions") else explain_methods_for("NnUNetEnsemble"),
        "provenance": trained.provenance(),
        "licence": str(licence) if licence else "not stated in dataset.json; ask whoever trained the model",
        **overrides,
    }
    return parse_card(raw, results.folder.name)


def model_from_results_folder(path, folds=None, checkpoint: str = "final", name: str | None = None,
                              version: str | None = None, read_order: str = NNUNET_READ_ORDER,
                              progress: Progress | None = None):
    """``(network, card)`` for a trained nnU-Net configuration: its folds as one
    :class:`NnUNetEnsemble` and a card that declares nnU-Net's pipeline (see :func:`read_configuration`).
    """
    trained = read_configuration(path, folds, checkpoint, read_order, progress)
    card = configuration_card(trained, name, version)
    report(progress, 1.0, f"read {len(trained.folds)} fold(s)")
    return trained.network, card


def import_nnunet(path, registry=None, folds=None, checkpoint: str = "final", name: str | None = None,
                  version: str | None = None, progress: Progress | None = None, task: str | None = None):
    """Import an nnU-Net results folder into the model registry as a new, current version.

    TotalSegmentator's folders (or any folder with ``task``) import as its task, with its
    class names (see :mod:`.totalseg`). The weights are kept in float32, as nnU-Net runs
    them. Returns the registry entry.
    """
    from .models import ModelRegistry
    from .totalseg import looks_like_totalsegmentator, model_from_totalsegmentator

    registry = registry or ModelRegistry()
    if task is not None or looks_like_totalsegmentator(Path(path)):
        network, card = model_from_totalsegmentator(path, task, folds, checkpoint, name, version, progress=progress)
    else:
        network, card = model_from_results_folder(path, folds, checkpoint, name, version, progress=progress)
    if any(entry.name == card.name and entry.version == card.version for entry in registry.entries()):
        raise MedsegError(f"{card.title} is already installed; pass --version (or --name) to import another copy")
    return registry.add_version(network, card, make_current=True)
