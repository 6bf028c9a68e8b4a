"""Converting core volumes to napari layer data and back."""

from __future__ import annotations

import numpy as np

from .core.geometry import ScanGeometry
from .core.io import Volume
from .core.windowing import default_preset, preset_limits

METADATA_KEY = "medseg"


def volume_to_layer_data(volume: Volume, name: str | None = None) -> tuple:
    """A napari layer-data tuple whose ``affine`` puts voxels at LPS millimetres."""
    meta = {
        METADATA_KEY: {
            "geometry": volume.geometry.to_dict(),
            "modality": volume.modality,
            "summary": volume.describe(),
            "warnings": list(volume.warnings),
        }
    }
    kwargs = {
        "name": name or volume.name,
        "affine": volume.geometry.world_affine,
        "metadata": meta,
        "units": "mm",
    }
    data = volume.layer_data()
    if volume.is_label_map:
        return data, kwargs, "labels"
    preset = default_preset(volume.modality)
    kwargs["contrast_limits"] = list(preset_limits(preset, data))
    kwargs["colormap"] = "gray"
    meta[METADATA_KEY]["window_preset"] = preset
    return data, kwargs, "image"


def geometry_of(layer) -> ScanGeometry | None:
    """The scan geometry recorded on a layer by napari-medseg, if any."""
    info = (getattr(layer, "metadata", None) or {}).get(METADATA_KEY) or {}
    if "geometry" not in info:
        return None
    return ScanGeometry.from_dict(info["geometry"])


def world_affine_from_meta(meta: dict) -> np.ndarray:
    """Compose napari's data-to-world matrix from a layer's saved state."""
    from napari.utils.transforms import Affine

    ndim = 3
    physical = Affine(
        scale=meta.get("scale", [1.0] * ndim),
        translate=meta.get("translate", [0.0] * ndim),
        rotate=meta.get("rotate"),
        shear=meta.get("shear"),
        ndim=ndim,
    ).affine_matrix
    extra = meta.get("affine")
    extra = np.eye(ndim + 1) if extra is None else np.asarray(getattr(extra, "affine_matrix", extra))
    return extra @ physical
