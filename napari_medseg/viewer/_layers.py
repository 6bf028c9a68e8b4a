"""napari layers and napari-medseg's metadata on them: the one place that reads and writes it.

Everything napari-medseg records on a layer lives in ``layer.metadata["medseg"]`` as
plain types: the scan geometry, modality, the segmentation's model and label names,
whether a labels layer holds edited work. :func:`medseg_meta` reads it and
:func:`update_medseg_meta` writes it; no other code touches the key.
"""

from __future__ import annotations

import weakref

import numpy as np
from psygnal import Signal

from ..core.geometry import ScanGeometry
from ..core.io import Volume
from ..core.windowing import default_preset, preset_limits

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


class _PredictionEvents:
    """``recorded(layer)``: a model's prediction was just recorded for ``layer`` (Correct counts
    edits from then on). psygnal holds bound methods weakly, so a closed widget drops out."""

    recorded = Signal(object)


prediction_events = _PredictionEvents()


def remember_prediction(layer, labels: np.ndarray) -> None:
    _predictions[layer] = np.array(labels, copy=True)
    prediction_events.recorded.emit(layer)


def original_prediction(layer) -> np.ndarray | None:
    return _predictions.get(layer)


# The prompts accepted into a labels layer (PromptSession records) and the mask they
# produced, kept beside the layer like the prediction, and submitted with the correction.
_prompts: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def remember_prompts(layer, record: dict) -> None:
    """Add an accepted prompt session's record; the layer's data now is the mask they produced."""
    records, _ = _prompts.get(layer, ([], None))
    _prompts[layer] = (records + [record], np.array(layer.data, copy=True))


def accepted_prompts(layer) -> tuple:
    """``(records, prompted mask)`` of a layer: ``([], None)`` when no prompts were accepted."""
    return _prompts.get(layer, ([], None))


def edit_labels(layer, new: np.ndarray, before: np.ndarray | None = None) -> int:
    """Write ``new`` into a labels layer where it differs from ``before`` (default: the layer's
    data) as one step of napari's undo history, with its paint event; returns voxels changed.

    napari 0.9's ``data_setitem`` also writes the changed voxels into the displayed slice,
    which aliases the data; on a layer with a rotated (oblique) transform it picks the plane
    by rounding the world point without the rotation, so it wrote them onto another plane
    (measured: 334 wrong voxels for one sphere). With contours on, it skips that write; the
    contour is set back afterwards, which redraws the slice.
    """
    data = np.asarray(layer.data)
    changed = np.nonzero(new != (data if before is None else before))
    if not changed[0].size:
        return 0
    if layer.contour:
        layer.data_setitem(changed, new[changed])
        return int(changed[0].size)
    with layer.events.contour.blocker():
        layer.contour = 1
        try:
            layer.data_setitem(changed, new[changed], refresh=False)
        finally:
            layer.contour = 0
    return int(changed[0].size)


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
    """The scan geometry recorded on a layer (or a layer-data ``meta`` dict) by napari-medseg, if any."""
    info = medseg_meta(layer.get("metadata") or {}) if isinstance(layer, dict) else medseg_meta(layer)
    if "geometry" not in info:
        return None
    return ScanGeometry.from_dict(info["geometry"])


def layer_geometry(layer, shape: tuple | None = None) -> ScanGeometry:
    """A layer's scan geometry: the recorded one, else one derived from the layer's own transform.

    ``layer`` may be a napari layer or a layer-data ``meta`` dict (what a writer receives),
    then with the data's ``shape``.
    """
    from ..core.errors import MedsegError

    geometry = geometry_of(layer)
    if geometry is not None:
        return geometry
    if isinstance(layer, dict):
        state = layer
    else:
        shape = layer.data.shape
        state = {"scale": layer.scale, "translate": layer.translate, "rotate": layer.rotate,
                 "shear": layer.shear, "affine": layer.affine.affine_matrix}
    if len(shape) != 3:
        raise MedsegError(f"only 3D masks can be saved; this layer has shape {tuple(shape)}")
    return ScanGeometry.from_world_affine(world_affine_from_meta(state), tuple(shape))


def write_layer_mask(path, data, meta: dict):
    """Write a labels layer's ``data`` to ``path`` in its scan's geometry; returns the path written.

    Never over a source: not the file any open layer was read from, nor the scan this mask
    segments (the same check, and the same message, as the command line's ``-o``).
    """
    from ..core.io import write_mask
    from ..core.outputs import check_outputs

    info = medseg_meta(meta.get("metadata") or {})
    sources = [*open_sources(), info.get("source_path"), info.get("scan_source_path")]
    check_outputs({"mask": path}, inputs=sources)
    data = np.asarray(data)
    return write_mask(path, data, layer_geometry(meta, data.shape))


def correction_parts(viewer, layer) -> tuple:
    """``(scan, geometry, label, prediction, model)`` of a labels layer, for
    :func:`napari_medseg.core.workspace.submit_correction`."""
    from ..core.errors import MedsegError

    scan = scan_layer_of(viewer, layer)
    if scan is None:
        raise MedsegError(f"no image layer of the same grid to submit with '{layer.name}'")
    return (np.asarray(scan.data), layer_geometry(scan), np.array(layer.data, copy=True), original_prediction(layer),
            medseg_meta(layer).get("model", ""))


def segmentation_layers(volume) -> list:
    """Labels layers for the DICOM SEG objects that reference a DICOM volume's series."""
    from ..core.dicom import segmentations_of

    return [labels_layer_data(labels, volume, f"{volume.name} {name}", names)
            for name, labels, names in segmentations_of(volume)]


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


def scan_image_of(layer):
    """An image layer as the core's :class:`~napari_medseg.core.predict.ScanImage` (voxels, geometry,
    and what its metadata knows of the modality and body part)."""
    from ..core.predict import ScanImage

    info = medseg_meta(layer)
    return ScanImage(np.asarray(layer.data), layer_geometry(layer), layer.name, info.get("modality", "unknown"),
                     info.get("modality_guessed", True), info.get("body_part"))
