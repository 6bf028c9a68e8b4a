"""The "Scan" dock widget: open scans, see their geometry, window them, save masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from magicgui.widgets import ComboBox, FileEdit, Label, PushButton
from napari.layers import Image, Labels
from napari.utils.notifications import show_info, show_warning

from ._panel import DockPanel
from .._layers import (make_metadata, medseg_meta, segmentation_layers, viewer_warnings,
                       volume_to_layer_data, write_layer_mask)
from .._worker import BackgroundTask, notify_warnings
from ...core.dicom import describe_series
from ...core.errors import MultipleSeriesError, MultiVolumeError
from ...core.io import read_volume
from ...core.windowing import PRESET_NAMES, preset_limits

SCAN_FILTER = "Scans (*.nii *.nii.gz *.nrrd *.nhdr *.mha *.mhd *.dcm);;DICOM files without an extension (*)"


class ScanWidget(DockPanel):
    """Open a scan file or DICOM folder, inspect it, window it and save masks."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        # Set when the last open needs a choice: a 4D file or a multi-series folder.
        self.needs_volume = False
        self.needs_series = False
        # Read by the drop-downs' callables: napari resets a docked widget's choices on every layer change.
        self._offered = {"series": [], "volumes": []}
        self._file = FileEdit(label="Scan file", mode="r", filter=SCAN_FILTER,
                              tooltip="A NIfTI, NRRD, MetaImage or DICOM file to open")
        self._open_file = PushButton(text="Open file")
        self._folder = FileEdit(label="DICOM folder", mode="d",
                                tooltip="A folder of DICOM files, as PACS exports it (searched with its subfolders)")
        self._open_folder = PushButton(text="Open folder")
        self._series = ComboBox(label="Series", choices=lambda _w=None: self._offered["series"], visible=False,
                                tooltip="The DICOM series to open from a folder that holds several")
        self._volume = ComboBox(label="Volume", choices=lambda _w=None: self._offered["volumes"], visible=False,
                                tooltip="The volume to open from a 4D file or a multi-volume series (echo, time point)")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._scan = ComboBox(label="Scan layer", choices=self._scan_layers,
                              tooltip="The open scan whose geometry is shown and windowed")
        self._info = Label(value="No scan open.")
        self._preset = ComboBox(label="Window", choices=("(keep)",) + PRESET_NAMES, value="(keep)",
                                tooltip="Window/level preset (CT presets in Hounsfield units)")
        self._new_mask = PushButton(text="New mask for this scan")
        self._mask = ComboBox(label="Mask layer", choices=self._mask_layers,
                              tooltip="The labels layer Save mask writes")
        self._save_path = FileEdit(label="Save mask as", mode="w", filter="Masks (*.nii.gz *.nii *.nrrd *.mha)",
                                   tooltip="Where to write the mask, in its scan's geometry (.nii.gz, .nii, .nrrd, .mha)")
        self._save = PushButton(text="Save mask")
        self.extend([self._file, self._open_file, self._folder, self._open_folder, self._series,
                     self._volume, self._cancel, self._scan, self._info, self._preset,
                     self._new_mask, self._mask, self._save_path, self._save])

        self._open_file.changed.connect(lambda: self.open(self._file.value))
        self._open_folder.changed.connect(lambda: self.open(self._folder.value))
        self._cancel.changed.connect(self._cancel_task)
        self._scan.changed.connect(self._show_info)
        self._preset.changed.connect(self._apply_preset)
        self._new_mask.changed.connect(self.new_mask)
        self._save.changed.connect(lambda: self.save_mask(self._save_path.value))
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._refresh_choices)
        self._refresh_choices()

    # -- choices ------------------------------------------------------------
    def _scan_layers(self, _widget=None):
        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def _mask_layers(self, _widget=None):
        return [layer for layer in self.viewer.layers if isinstance(layer, Labels)]

    def _refresh_choices(self, _event=None):
        self._scan.reset_choices()
        self._mask.reset_choices()
        self._show_info()

    # -- opening ------------------------------------------------------------
    def open(self, path) -> BackgroundTask | None:
        """Read ``path`` in the background; the result becomes a layer."""
        if path is None or str(path) in ("", "."):
            show_warning("napari-medseg: choose a scan file or DICOM folder first")
            return None
        if self.task is not None and self.task.running:
            show_warning("napari-medseg: a scan is still opening; cancel it first")
            return None
        path = Path(path)
        options = {}
        if self.needs_volume:
            options["volume_index"] = int(self._volume.value)
        if self.needs_series and self._series.value is not None:
            options["series"] = self._series.value
        self._cancel.enabled = True
        self.task = BackgroundTask(
            open_scan, path, **options, description=f"Opening {path.name}",
            on_done=lambda out: self._add_volume(*out, path), on_error=self._open_failed,
            on_finish=self._task_finished,
        )
        return self.task

    def _add_volume(self, volume, segmentations=(), path=None) -> None:
        data, kwargs, kind = volume_to_layer_data(volume, source_path=path)
        layer = self.viewer.add_labels(data, **kwargs) if kind == "labels" else self.viewer.add_image(data, **kwargs)
        for seg_data, seg_kwargs, _kind in segmentations:
            self.viewer.add_labels(seg_data, **seg_kwargs)
        self.viewer.dims.axis_labels = ("S-I (z)", "P-A (y)", "L-R (x)")
        notify_warnings(volume.name, viewer_warnings(volume))
        self._offer_choices(volume=False, series=False)
        if isinstance(layer, Image):
            self._scan.value = layer
            self._preset.value = medseg_meta(kwargs["metadata"]).get("window_preset", "(keep)")

    def _open_failed(self, exc) -> None:
        if isinstance(exc, MultiVolumeError):
            # The distinguishing value of each volume is shown (for example "echo 2, TE 20 ms").
            self._offered["volumes"] = [(f"{n}: {label}", n) for n, label in enumerate(exc.labels)]
            self._volume.reset_choices()
            self._offer_choices(volume=True, series=self.needs_series)
            show_info("napari-medseg: pick a volume and press Open again")
        elif isinstance(exc, MultipleSeriesError):
            self._offered["series"] = [(describe_series(s), s["uid"]) for s in exc.series if not s["segmentation"]]
            self._series.reset_choices()
            self._offer_choices(volume=False, series=True)
            show_info("napari-medseg: pick a series and press Open folder again")

    def _offer_choices(self, volume: bool, series: bool) -> None:
        self.needs_volume = self._volume.visible = volume
        self.needs_series = self._series.visible = series

    def _task_finished(self) -> None:
        self._cancel.enabled = False

    def _cancel_task(self) -> None:
        if self.task is not None:
            self.task.cancel()

    # -- information and windowing -------------------------------------------
    def _show_info(self, _value=None) -> None:
        layer = self._scan.value
        if layer is None:
            self._info.value = "No scan open."
            return
        summary = medseg_meta(layer).get("summary")
        if not summary:
            self._info.value = f"{layer.name}: {' x '.join(map(str, layer.data.shape))} (no scan geometry recorded)"
            return
        self._info.value = "\n".join([
            f"Dimensions: {' x '.join(map(str, summary['dimensions']))}",
            f"Spacing: {' x '.join(f'{s:.3g}' for s in summary['spacing_mm'])} mm",
            f"Orientation: {summary['orientation']}" + (" (oblique)" if summary["oblique"] else ""),
            f"Modality: {summary['modality']}",
        ])

    def _apply_preset(self, name: str) -> None:
        layer = self._scan.value
        if layer is None or name in (None, "(keep)"):
            return
        lo, hi = preset_limits(name, layer.data)
        range_lo, range_hi = layer.contrast_limits_range
        layer.contrast_limits_range = (min(range_lo, lo), max(range_hi, hi))
        layer.contrast_limits = (lo, hi)

    # -- masks ----------------------------------------------------------------
    def new_mask(self, _value=None) -> Labels | None:
        """An empty Labels layer on the selected scan's grid, ready to paint."""
        scan = self._scan.value
        if scan is None:
            show_warning("napari-medseg: open a scan first")
            return None
        meta = {}
        if "geometry" in medseg_meta(scan):
            meta = make_metadata(geometry=medseg_meta(scan)["geometry"], segmentation_of=scan.name)
        layer = self.viewer.add_labels(
            np.zeros(scan.data.shape, dtype=np.uint8), name=f"{scan.name} mask",
            affine=scan.affine.affine_matrix, scale=scan.scale, translate=scan.translate, metadata=meta,
        )
        self._mask.value = layer
        return layer

    def save_mask(self, path) -> BackgroundTask | None:
        """Write the chosen Labels layer in its scan's geometry (in the background)."""
        layer = self._mask.value
        if layer is None:
            show_warning("napari-medseg: there is no mask layer to save")
            return None
        if path is None or str(path) in ("", "."):
            show_warning("napari-medseg: choose where to save the mask")
            return None
        data = np.array(layer.data, copy=True)
        meta = layer.as_layer_data_tuple()[1]
        self.task = BackgroundTask(
            _write_in_background, path, data, meta, description=f"Saving {Path(path).name}",
            on_done=lambda written: self._saved(layer, written),
        )
        return self.task

    def _saved(self, layer, written) -> None:
        from .._autosave import mark_clean

        mark_clean(layer, "saved")
        show_info(f"napari-medseg: saved {Path(written).name}")


def open_scan(path, progress=None, **options):
    """Worker body: the volume, and the DICOM SEG objects that reference its series as labels layers."""
    volume = read_volume(path, progress=progress, **options)
    return volume, segmentation_layers(volume)


def _write_in_background(path, data, meta, progress):
    """Worker body: the same checks and writing as napari's File > Save (the plugin's writer)."""
    progress(0.1, "writing")
    return write_layer_mask(path, data, meta)
