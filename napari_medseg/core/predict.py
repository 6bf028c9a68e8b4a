"""Segmenting one scan: the one function the CLI's ``predict``, the Segment widget and the
worklist call, so the scope check, the network run and the plausibility checks always
come together.

``ScanImage`` is the scan as the core needs it (layer-order voxels, geometry and what is
known of its modality and body part), made from a read file or from a viewer layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import MedsegError, OutOfScope
from .progress import Progress, report


@dataclass
class ScanImage:
    data: np.ndarray                   # layer order (see core.geometry)
    geometry: object                   # ScanGeometry
    name: str = "scan"
    modality: str = "unknown"
    modality_guessed: bool = True
    body_part: str | None = None
    warnings: list = field(default_factory=list)

    @classmethod
    def from_volume(cls, volume, action: str = "segment") -> "ScanImage":
        if volume.is_label_map:
            raise MedsegError(f"'{volume.name}' looks like a label map, not an image to {action}")
        return cls(volume.layer_data(), volume.geometry, volume.name, volume.modality, volume.modality_guessed,
                   (volume.info.get("dicom") or {}).get("BodyPartExamined"), list(volume.warnings))


def scope_problems(scan: ScanImage, card) -> list[str]:
    """Why ``scan`` lies outside ``card``'s domain; empty when it fits (see :mod:`.domain`).
    A scan of several channels is judged by its first."""
    from .domain import scan_problems

    first = scan.data[0] if scan.data.ndim == 4 else scan.data
    return scan_problems(first, scan.geometry.layer_spacing, card, scan.modality, scan.modality_guessed,
                         scan.body_part)


def stack_channels(scans: list, names: tuple | list | None = None) -> ScanImage:
    """One scan of several channels (``(C, D, H, W)``) on the first scan's grid.

    A scan on another grid is resampled onto the first one through both affines (linear,
    outside its field of view its minimum), and the result says so in its warnings.
    """
    from scipy import ndimage

    scans = list(scans)
    if not scans:
        raise MedsegError("no input images were given")
    names = list(names or [scan.name for scan in scans])
    first = scans[0]
    target = np.asarray(first.geometry.layer_affine_ras, dtype=np.float64)
    arrays, warnings = [np.asarray(first.data, dtype=np.float32)], list(first.warnings)
    for scan, name in zip(scans[1:], names[1:]):
        source = np.asarray(scan.geometry.layer_affine_ras, dtype=np.float64)
        data = np.asarray(scan.data, dtype=np.float32)
        if data.shape == arrays[0].shape and np.allclose(source, target, atol=1e-4):
            arrays.append(data)
        else:
            voxel_to_voxel = np.linalg.inv(source) @ target     # first's voxel -> this scan's voxel
            arrays.append(ndimage.affine_transform(data, voxel_to_voxel[:3, :3], voxel_to_voxel[:3, 3],
                                                   output_shape=arrays[0].shape, order=1, mode="constant",
                                                   cval=float(data.min())))
            warnings.append(f"'{scan.name}' ({name}) was on another grid and was resampled onto "
                            f"'{first.name}''s through both files' geometry")
        warnings.extend(w for w in scan.warnings if w not in warnings)
    return ScanImage(np.stack(arrays), first.geometry, first.name, first.modality, first.modality_guessed,
                     first.body_part, warnings)


@dataclass
class Prediction:
    model: object                      # the loaded Model
    segmentation: object               # core.inference.Segmentation on the scan's grid
    warnings: list                     # everything the user must read: scan, scope, run, result

    @property
    def labels(self) -> np.ndarray:
        return self.segmentation.labels


def predict_scan(scan: ScanImage, model, settings=None, *, force: bool = False, want_probabilities: bool = False,
                 want_uncertainty: bool = False, progress: Progress | None = None) -> Prediction:
    """Check the scan against the model card, segment it, and flag an implausible result.

    ``model`` is a loaded model or anything :func:`~.models.load_model` takes (it is then
    loaded and verified here, off the caller's thread). A scan out of scope raises
    :class:`~.errors.OutOfScope` unless ``force``.
    """
    from .inference import InferenceSettings, segment
    from .models import Model, load_model

    settings = settings or InferenceSettings()
    if not isinstance(model, Model):
        report(progress, 0.0, "loading the model")
        model = load_model(model)
    mismatch = model.card.channel_mismatch(scan.data.shape[0] if scan.data.ndim == 4 else 1)
    if mismatch:
        raise MedsegError(mismatch)
    problems = scope_problems(scan, model.card)
    if problems and not force:
        raise OutOfScope(problems)
    result = segment(scan.data, scan.geometry.layer_affine_ras, model, settings,
                     want_probabilities=want_probabilities, want_uncertainty=want_uncertainty,
                     progress=progress, geometry=scan.geometry)
    warnings = list(scan.warnings) + problems + list(result.info.get("messages", [])) + list(result.warnings)
    return Prediction(model, result, warnings)
