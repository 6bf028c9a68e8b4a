"""npe2 writer: a Labels layer saved in the geometry of the scan it belongs to."""

from __future__ import annotations

import logging

import numpy as np
from napari.utils.notifications import show_error

from ._layers import medseg_meta, open_sources, world_affine_from_meta
from .core.errors import MedsegError
from .core.geometry import ScanGeometry
from .core.io import write_mask
from .core.outputs import check_outputs

log = logging.getLogger(__name__)


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Write ``data`` to ``path`` (.nii.gz, .nii, .nrrd, .mha); returns written paths.

    Never over a source: not the file any open layer was read from, nor the scan this
    mask segments (the same check, and the same message, as the command line's ``-o``).
    """
    try:
        info = medseg_meta(meta.get("metadata") or {})
        sources = [*open_sources(), info.get("source_path"), info.get("scan_source_path")]
        check_outputs({"mask": path}, inputs=sources)
        geometry = _geometry_for(np.asarray(data).shape, meta)
        written = [str(write_mask(path, np.asarray(data), geometry))]
        from ._autosave import mark_clean

        mark_clean(meta.get("metadata") or {}, "saved")
        return written
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
