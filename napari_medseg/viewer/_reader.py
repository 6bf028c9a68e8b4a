"""npe2 reader: NIfTI, NRRD, MetaImage and DICOM series folders.

The reader never raises: unsupported paths get ``None`` (napari tries other
readers), and broken scans get a notification plus napari's empty result.
"""

from __future__ import annotations

import logging

from napari.utils.notifications import show_error, show_warning

from ._layers import segmentation_layers, viewer_warnings, volume_to_layer_data
from ..core import io
from ..core.errors import MedsegError, MultipleSeriesError, MultiVolumeError

log = logging.getLogger(__name__)
NOTHING_OPENED = [(None,)]  # napari's sentinel for "handled, no layers"
MAX_SPLIT_VOLUMES = 16


def napari_get_reader(path):
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        if not io.is_supported_path(path):
            return None
    except OSError:
        return None
    return read_scan


def read_scan(path):
    """Read one path into napari layer-data tuples."""
    if isinstance(path, (list, tuple)):
        path = path[0]
    try:
        from napari import current_viewer

        from . import _widgets  # noqa: F401 - registers the Recover widget's offer with autosave
        from ._autosave import install

        viewer = current_viewer()
        install(viewer)  # masks opened here are somebody's work: autosave their edits
        layers = _read_layers(path)
        _open_layout_if_wanted(viewer)
        return layers
    except MedsegError as exc:
        show_error(f"napari-medseg: {exc}")
    except MemoryError:
        show_error("napari-medseg: not enough memory to open this scan")
    except Exception as exc:  # keep napari running whatever the file holds
        log.exception("unexpected error while reading a scan")
        show_error(f"napari-medseg: could not open this scan ({type(exc).__name__}: {exc})")
    return NOTHING_OPENED


def _open_layout_if_wanted(viewer) -> None:
    """The reading layout opens with every scan when the user asked for that (its own setting)."""
    from ._widgets.reading import layout_of, layout_settings, open_reading_layout

    if viewer is None or getattr(viewer, "window", None) is None or layout_of(viewer) is not None:
        return
    if layout_settings().get("open_by_default"):
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, lambda: open_reading_layout(viewer))  # after napari adds the layers


def _read_layers(path):
    try:
        volumes = [io.read_volume(path)]
    except MultiVolumeError as exc:
        n = min(exc.n_volumes, MAX_SPLIT_VOLUMES)
        volumes = [io.read_volume(path, volume_index=t) for t in range(n)]
        for label, volume in zip(exc.labels, volumes):
            volume.name = f"{volume.name} [{label}]"
        show_warning(
            f"napari-medseg: {exc.n_volumes} volumes; opened "
            + (f"all {n}" if n == exc.n_volumes else f"the first {n}")
            + " as separate layers. The Scan widget opens a single chosen volume."
        )
    except MultipleSeriesError as exc:
        volumes = [io.read_volume(path, series=exc.series[0]["index"])]
        show_warning(
            f"napari-medseg: the folder holds {len(exc.series)} DICOM series; opened the largest "
            f"({exc.series[0]['images']} images). Pick another in the Scan widget."
        )
    for volume in volumes:
        for message in viewer_warnings(volume):
            show_warning(f"napari-medseg: {volume.name}: {message}")
    layers = [volume_to_layer_data(volume, source_path=path) for volume in volumes]
    for volume in volumes[:1]:
        layers.extend(segmentation_layers(volume))
    return layers
