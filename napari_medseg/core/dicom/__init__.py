"""DICOM as PACS and CD exports deliver it: one step per module.

* :mod:`.discovery`: walk the tree once, read each header once (allow-listed tags only);
* :mod:`.stacks`: series (by UID, across folders) -> stacks -> volumes; duplicates,
  localizers, segmentations and non-image objects;
* :mod:`.geometry`: the true position of every pixel, and a regular grid where a
  resample is needed (gantry tilt, uneven gaps, missing slices);
* :mod:`.pixels`: decode and rescale one slice;
* :mod:`.multiframe`: enhanced multi-frame images and SEG objects through highdicom.

:func:`napari_medseg.core.io.read_volume` stays the only entry point for readers,
widgets and the CLI; it calls :func:`read_series` and :func:`read_file` here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import MultipleSeriesError, MultiVolumeError, NotAVolumeError, UnreadableScanError
from ..geometry import RAS_TO_LPS, ScanGeometry
from ..progress import Progress, report
from .discovery import Instance, looks_like_dicom_file, read_header, scan_folder
from .geometry import assemble, plan_grid, pixel_position
from .multiframe import onto_grid, read_multiframe, read_segmentation
from .pixels import PixelError, read_slice
from .stacks import Series, describe, group_series

__all__ = ["describe_series", "list_series", "looks_like_dicom_file", "pixel_position", "read_file",
           "read_series", "segmentations_of"]

# The technical header values kept on a volume (and so on its layer): never a patient's.
SAFE_SUMMARY = ("Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined", "Manufacturer",
                "SliceThickness")


def describe_series(entry: dict) -> str:
    return describe(entry)


def _study(folder, progress=None) -> tuple[list, list]:
    return group_series(scan_folder(folder, progress))


def list_series(folder: str | os.PathLike) -> dict:
    """``{"series": [summary, ...], "skipped": [line, ...]}`` for every series below ``folder``."""
    series, skipped = _study(folder)
    return {"series": [s.summary() for s in series], "skipped": skipped}


def _safe_tags(instance: Instance) -> dict:
    values = {"Modality": instance.modality, "SeriesNumber": instance.series_number,
              "SeriesDescription": instance.series_description, "BodyPartExamined": instance.body_part,
              "Manufacturer": instance.manufacturer,
              "SliceThickness": f"{instance.slice_thickness:g}" if instance.slice_thickness else ""}
    return {key: value for key, value in values.items() if value}


def _choose(series: list, wanted, folder_name: str, skipped: list) -> Series:
    images = [s for s in series if not s.is_segmentation]
    if not images and series:
        raise UnreadableScanError(f"folder '{folder_name}' holds only a DICOM SEG (a segmentation), not the scan it "
                                  "segments; open the study folder that also holds its image series, and the SEG "
                                  "opens over its scan")
    if not images:
        raise UnreadableScanError(f"no DICOM image series found in folder '{folder_name}'; open a folder of DICOM "
                                  "image files, or a NIfTI, NRRD or MetaImage file")
    if wanted is not None:
        for entry in series:
            if str(wanted) in (entry.uid, str(entry.index)):
                if entry.is_segmentation:
                    raise UnreadableScanError(f"series {wanted} is a segmentation (SEG); it opens as labels "
                                              "on the series it references")
                return entry
        raise UnreadableScanError(f"series '{wanted}' is not in this folder; available: "
                                  + "; ".join(describe(s.summary()) for s in images))
    candidates = [s for s in images if not s.is_localizer and s.volumes] or [s for s in images if s.volumes]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise NotAVolumeError(f"folder '{folder_name}' holds only single 2D images, no 3D series")
    listing = "; ".join(describe(s.summary()) for s in images)
    raise MultipleSeriesError(f"folder '{folder_name}' holds {len(candidates)} DICOM series, choose one: {listing}",
                              series=[s.summary() for s in series], skipped=skipped)


def read_series(folder: str | os.PathLike, *, series=None, volume_index: int | None = None,
                progress: Progress | None = None, finish=None):
    """One volume of one DICOM series below ``folder``, as a :class:`~napari_medseg.core.io.Volume`."""
    from ..io import Volume

    folder = Path(folder)
    all_series, skipped = _study(folder, progress)
    chosen = _choose(all_series, series, folder.name, skipped)
    summary = chosen.summary()
    volumes = chosen.volumes
    name = f"{chosen.first.modality or 'DICOM'} series {chosen.first.series_number or chosen.index}"
    if not volumes:
        raise NotAVolumeError(f"{name} holds only single 2D images, no volume")
    if volume_index is None and len(volumes) > 1:
        labels = [volume.label or f"volume {n}" for n, volume in enumerate(volumes)]
        listing = "; ".join(f"{n}: {label}" for n, label in enumerate(labels))
        raise MultiVolumeError(f"{name} holds {len(volumes)} volumes ({listing}); choose one",
                               n_volumes=len(volumes), labels=labels)
    index = volume_index or 0
    if not 0 <= index < len(volumes):
        raise NotAVolumeError(f"{name} has volumes 0 to {len(volumes) - 1}; volume {index} does not exist")
    chosen_volume = volumes[index]
    warnings = list(skipped) + list(chosen.warnings)
    if chosen_volume.instances[0].frames > 1:
        data, affine_lps = read_multiframe(chosen_volume.instances[0].path)
        info_geometry: dict = {"multiframe": True}
    else:
        data, affine_lps, info_geometry = _read_stack(chosen_volume.instances, name, warnings, progress)
    first = chosen.first
    geometry = ScanGeometry(affine_ras=RAS_TO_LPS @ affine_lps, file_shape=data.shape, source_format="dicom",
                            extra={"dicom": {"series_uid": chosen.uid, **info_geometry}})
    info = {"format": "DICOM series", "dicom": _safe_tags(first), "series": summary,
            "series_in_folder": [s.summary() for s in all_series], "skipped": skipped,
            "_segmentation_paths": [str(i.path) for s in all_series if s.is_segmentation
                                    for i in s.instances if chosen.uid in i.referenced_series]}
    if len(volumes) > 1:
        info["volume"] = f"{index} of {len(volumes)}: {chosen_volume.label}"
        info["n_volumes"] = len(volumes)
    report(progress, 1.0, "done")
    return Volume(data=data, geometry=geometry, name=name, modality=first.modality or "unknown",
                  modality_guessed=not first.modality, warnings=warnings, info=info)


def _read_stack(instances: list, name: str, warnings: list, progress) -> tuple:
    """Read the slices into one array in their order along the normal (skipping unreadable
    ones, each with a line), then place them (see :func:`.geometry.plan_grid`)."""
    plan = plan_grid(instances, name)
    rows, columns = plan.instances[0].rows, plan.instances[0].columns
    integral = all(i.slope == 1.0 and float(i.intercept).is_integer() for i in plan.instances)
    stack = np.empty((len(plan.instances), rows, columns), dtype=np.int16 if integral else np.float32)
    readable = []
    for number, instance in enumerate(plan.instances):
        try:
            values = read_slice(instance)
            if values.shape != (rows, columns):
                raise PixelError(f"it has {values.shape[0]} x {values.shape[1]} pixels, not {rows} x {columns}")
            if stack.dtype == np.int16 and (values.min() < -32768 or values.max() > 32767
                                            or not np.issubdtype(values.dtype, np.integer)):
                stack = stack.astype(np.int32 if np.issubdtype(values.dtype, np.integer) else np.float32)
            stack[len(readable)] = values
            readable.append(instance)
        except PixelError as exc:
            warnings.append(f"skipped {instance.path.name}: {exc}")
        if number % 32 == 0:
            report(progress, 0.3 + 0.6 * number / len(plan.instances),
                   f"reading pixels {number}/{len(plan.instances)}")
    if len(readable) < 2:
        raise UnreadableScanError(f"{name}: fewer than two slices could be read")
    stack = stack[:len(readable)]
    if len(readable) < len(plan.instances):
        plan = plan_grid(readable, name)  # the gaps the unreadable slices leave are placed, and reported
    warnings.extend(plan.warnings)
    if plan.exact:
        data = stack.transpose(2, 1, 0)  # (planes, rows, columns) -> file order (columns, rows, planes)
    else:
        data = assemble(plan, list(stack), float(stack.min()))
    return data, plan.affine_lps, {"exact": plan.exact, **plan.info}


def read_file(path: Path, volume_index: int | None = None):
    """A single DICOM file: a segmentation (labels), a multi-frame image, or a refused 2D slice."""
    from ..io import Volume

    try:
        instance = read_header(path)
    except Exception:  # noqa: BLE001 - pydicom raises many types for junk
        raise UnreadableScanError(f"'{path.name}' is not a readable DICOM file") from None
    kind = instance.non_image_kind
    if kind is not None:
        raise UnreadableScanError(f"'{path.name}' is {kind}, not a scan")
    names = {}
    if instance.is_segmentation:
        data, affine_lps, names = read_segmentation(path)
    elif instance.frames > 1:
        data, affine_lps = read_multiframe(path)
    else:
        raise NotAVolumeError(f"'{path.name}' is a single 2D DICOM slice; open its folder to read the whole series")
    if volume_index not in (None, 0):
        raise NotAVolumeError(f"'{path.name}' holds one volume; there is no volume {volume_index}")
    geometry = ScanGeometry(affine_ras=RAS_TO_LPS @ affine_lps, file_shape=data.shape, source_format="dicom",
                            extra={"dicom": {"series_uid": instance.series_uid}})
    return Volume(data=data, geometry=geometry, name=path.stem, modality=instance.modality or "unknown",
                  modality_guessed=not instance.modality, is_label_map=instance.is_segmentation,
                  info={"format": "DICOM SEG" if instance.is_segmentation else "DICOM multi-frame",
                        "dicom": _safe_tags(instance), "label_names": names})


def segmentations_of(volume) -> list:
    """The SEG objects found beside a DICOM volume's series, as ``(name, layer-order labels, names)``
    on the volume's own grid."""
    out = []
    target_lps = RAS_TO_LPS @ volume.geometry.affine_ras
    for path in volume.info.get("_segmentation_paths", []):
        labels, affine_lps, names = read_segmentation(Path(path))
        on_grid = onto_grid(labels, affine_lps, target_lps, volume.geometry.file_shape)
        out.append((Path(path).stem, volume.geometry.to_layer(on_grid), names))
    return out
