"""npe2 writer: a Labels layer saved in the geometry of the scan it belongs to."""

from __future__ import annotations

import logging

from napari.utils.notifications import show_error

from ._autosave import mark_clean
from ._layers import write_layer_mask
from ..core.errors import MedsegError

log = logging.getLogger(__name__)


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Write ``data`` to ``path`` (.nii.gz, .nii, .nrrd, .mha); returns written paths.

    Never over a source (see :func:`~napari_medseg.viewer._layers.write_layer_mask`).
    """
    try:
        written = [str(write_layer_mask(path, data, meta))]
        mark_clean(meta.get("metadata") or {}, "saved")
        return written
    except MedsegError as exc:
        show_error(f"napari-medseg: {exc}")
    except Exception as exc:
        log.exception("unexpected error while writing a mask")
        show_error(f"napari-medseg: could not save the mask ({type(exc).__name__}: {exc})")
    return []
