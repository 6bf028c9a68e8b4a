"""npe2 writer: a Labels layer saved in the geometry of the scan it belongs to."""

from __future__ import annotations

import logging

import numpy as np
from napari.utils.notifications import show_error

from ._layers import medseg_meta, world_affine_from_meta
from .core.errors import MedsegError
from .core.geometry import ScanGeometry
from .core.io import write_mask

log = logging.getLogger(__name__)


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Write ``data`` to ``path`` (.nii.gz, .nii, .nrrd, .mha); returns written paths."""
    try:
        geometry = _geometry_for(np.asarray(data).shape, meta)
        return [str(write_mask(path, np.asarray(data), geometry))]
    except MedsegError as exc:
        show_error(f"napari-medseg: {exc}")
    except Exception as exc:
        log.exception("unexpected error while writing a mask")
        show_error(f"napari-medseg: could not save the mask ({type(exc).__name__}: {exc})")
    return []


def _geometry_for(shape: tuple, meta: dict) -> ScanGeometry:
    info = medseg_meta(meta.get("metadata") or {})
    if "geometry" in info:
        return ScanGeometry.from_dict(info["geometry"])
    if len(shape) != 3:
        raise MedsegError(f"only 3D masks can be saved; this layer has shape {shape}")
    return ScanGeometry.from_world_affine(world_affine_from_meta(meta), shape)
