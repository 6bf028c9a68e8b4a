"""napari layers and napari-medseg's metadata on them: the one place that reads and writes it.

Everything napari-medseg records on a layer lives in ``layer.metadata["medseg"]`` as
plain types: the scan geometry, modality, the segmentation's model and label names,
whether a labels layer holds edited work. :func:`medseg_meta` reads it and
:func:`update_medseg_meta` writes it; no other code touches the key.
"""

from __future__ import annotations

import weakref

import numpy as np

from .core.geometry import ScanGeometry
from .core.io import Volume
from .core.windowing import default_preset, preset_limits

METADATA_KEY = "medseg"
OBLIQUE_NOTE = ("the scan is oblique: 3D view and world coordinates are exact; "
                "2D slices are shown along the nearest voxel axes")


def medseg_meta(layer_or_metadata) -> dict:
    """napari-medseg's metadata of a layer (or of a layer's ``metadata`` dict); empty if none."""
    metadata = layer_or_metadata if isinstance(layer_or_metadata, dict) else getattr(layer_or_metadata, "metadata", None)
    return dict((metadata or {}).get(METADATA_KEY) or {})


def update_medseg_meta(layer, **values) -> dict:
    """Merge ``values`` into a layer's napari-medseg metadata; returns the new dict."""
    merged = {**medseg_meta(layer), **values}
    layer.metadata = {**(layer.metadata or {}), METADATA_KEY: merged}
    return merged


# The model's original prediction of a result layer, kept beside the layer (not in its
# metadata, which napari copies) so edits can be counted against it and submitted with it.
_predictions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def remember_prediction(layer, labels: np.ndarray) -> None:
    _predictions[layer] = np.array(labels, copy=True)


def original_prediction(layer) -> np.ndarray | None:
    return _predictions.get(layer)


def make_metadata(**values) -> dict:
    """A layer ``metadata`` argument holding napari-medseg's values."""
    return {METADATA_KEY: values}


def viewer_warnings(volume: Volume) -> list:
    """The volume's warnings plus the ones only a viewer needs (2D slicing of oblique scans)."""
    return list(volume.warnings) + ([OBLIQUE_NOTE] if volume.geometry.is_oblique else [])


def volume_to_layer_data(volume: Volume, name: str | None = None, source_path: str | None = None) -> tuple:
    """A napari layer-data tuple whose ``affine`` puts voxels at LPS millimetres."""
    values = {
        "geometry": volume.geometry.to_dict(),
        "modality": volume.modality,
        "modality_guessed": volume.modality_guessed,
        "body_part": (volume.info.get("dicom") or {}).get("BodyPartExamined"),
        "summary": volume.describe(),
        "warnings": list(volume.warnings),
    }
    if source_path is not None:
        values["source_path"] = str(source_path)
    kwargs = {"name": name or volume.name, "affine": volume.geometry.world_affine, "units": "mm"}
    data = volume.layer_data()
    if volume.is_label_map:
        values["edited"] = True  # a mask opened from a file is somebody's work from the start
        names = {int(k): v for k, v in (volume.info.get("label_names") or {}).items()}
        if names:
            values["label_names"] = {str(k): v for k, v in names.items()}
            kwargs["features"] = label_features(names)
        kind = "labels"
    else:
        preset = default_preset(volume.modality)
        kwargs["contrast_limits"] = list(preset_limits(preset, data))
        kwargs["colormap"] = "gray"
        values["window_preset"] = preset
        kind = "image"
    kwargs["metadata"] = make_metadata(**values)
    return data, kwargs, kind


def label_features(names: dict) -> dict:
    """A labels layer's ``features`` table: one row per label value, with its name."""
    values = sorted({0, *[int(v) for v in names]})
    return {"index": values, "name": [names.get(v, "background" if v == 0 else f"label {v}") for v in values]}


def labels_layer_data(layer_labels, volume: Volume, name: str, names: dict) -> tuple:
    """A labels layer-data tuple on ``volume``'s grid, with label names (a SEG, a saved mask)."""
    metadata = make_metadata(geometry=volume.geometry.to_dict(), segmentation_of=volume.name, edited=True,
                             label_names={str(k): v for k, v in names.items()})
    return layer_labels, {"name": name, "affine": volume.geometry.world_affine, "units": "mm",
                          "metadata": metadata, "features": label_features(names), "opacity": 0.5}, "labels"


def scan_layer_of(viewer, layer):
    """The image layer a labels layer segments: the one it records, else the one image on its grid."""
    from napari.layers import Image

    if viewer is None:
        return None
    name = medseg_meta(layer).get("segmentation_of")
    if name and name in viewer.layers and isinstance(viewer.layers[name], Image):
        return viewer.layers[name]
    images = [other for other in viewer.layers
              if isinstance(other, Image) and tuple(other.data.shape) == tuple(layer.data.shape)]
    return images[0] if images else None


def open_sources() -> list[str]:
    """The files and folders that the layers open in any viewer were read from: never written over."""
    from napari import Viewer

    sources = []
    for viewer in list(getattr(Viewer, "_instances", ())):
        for layer in list(viewer.layers):
            info = medseg_meta(layer)
            for key in ("source_path", "scan_source_path"):
                if info.get(key):
                    sources.append(info[key])
            if getattr(layer, "source", None) is not None and getattr(layer.source, "path", None):
                sources.append(str(layer.source.path))
    return sources


def geometry_of(layer) -> ScanGeometry | None:
    """The scan geometry recorded on a layer by napari-medseg, if any."""
    info = medseg_meta(layer)
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
