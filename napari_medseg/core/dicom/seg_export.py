"""A worklist case's mask as a DICOM SEG object on its source series, made with highdicom.

Each source image gets the frame of mask values at its own pixels: every pixel's
patient position (PS3.3 C.7.6.2.1.1) is taken to the mask's voxel grid and the nearest
voxel is read. So the frames land on the source slices even where the scan was
resampled on reading (gantry tilt, uneven gaps). The patient and study attributes that
SEG requires are copied by highdicom from the source files into the new object here, at
export time, and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MedsegError
from ..geometry import RAS_TO_LPS
from ..privacy import library_warnings_silenced, scrub


def _source_instances(case) -> list:
    from .discovery import scan_folder
    from .stacks import group_series

    series_list, _ = group_series(scan_folder(case.source))
    for series in series_list:
        if series.uid == case.series:
            volumes = series.volumes
            index = case.volume if case.volume >= 0 else 0
            if index >= len(volumes):
                break
            return volumes[index].instances
    raise MedsegError("its source series is no longer in the folder it was added from")


def frames_on_sources(file_labels: np.ndarray, affine_ras: np.ndarray, instances: list) -> np.ndarray:
    """``(n, rows, columns)`` label frames, one per source image, by nearest voxel."""
    to_voxel = np.linalg.inv(RAS_TO_LPS @ affine_ras)
    frames = np.zeros((len(instances), instances[0].rows, instances[0].columns), dtype=file_labels.dtype)
    for n, instance in enumerate(instances):
        rows, columns = np.mgrid[0:instance.rows, 0:instance.columns]
        row_direction = np.asarray(instance.orientation[:3], float)
        column_direction = np.asarray(instance.orientation[3:6], float)
        row_spacing, column_spacing = instance.pixel_spacing
        points = (np.asarray(instance.position, float)[:, None, None]
                  + row_direction[:, None, None] * (columns * column_spacing)[None]
                  + column_direction[:, None, None] * (rows * row_spacing)[None])
        index = np.rint(np.tensordot(to_voxel[:3, :3], points, axes=1) + to_voxel[:3, 3, None, None]).astype(int)
        inside = np.all([(index[a] >= 0) & (index[a] < file_labels.shape[a]) for a in range(3)], axis=0)
        frame = np.zeros(inside.shape, dtype=file_labels.dtype)
        frame[inside] = file_labels[index[0][inside], index[1][inside], index[2][inside]]
        frames[n] = frame
    return frames


def write_segmentation(path, case, file_labels: np.ndarray, geometry, volumes: list, reviewed: bool) -> Path:
    """Write ``file_labels`` (file order, on ``geometry``) as a SEG referencing the case's series."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from ... import __version__
    from ..outputs import write_files

    instances = _source_instances(case)
    if instances[0].frames > 1:
        raise MedsegError("enhanced multi-frame sources are not exported as SEG yet")
    try:
        with library_warnings_silenced():
            sources = [pydicom.dcmread(str(i.path), stop_before_pixels=True) for i in instances]
    except Exception as exc:  # noqa: BLE001
        raise MedsegError(f"a source image could not be read again ({scrub(str(exc))[:120]})") from None
    for dataset in sources:  # type 2 in most image IODs, but highdicom needs it: the grid's spacing
        if not str(getattr(dataset, "SliceThickness", "") or "").strip():
            dataset.SliceThickness = f"{float(geometry.spacing[2]):.6g}"
    frames = frames_on_sources(np.asarray(file_labels), geometry.affine_ras, instances)
    names = {int(row["value"]): str(row["name"]) for row in volumes}
    present = [int(v) for v in np.unique(frames) if v != 0]
    if not present:
        raise MedsegError("the mask is empty on the source images")
    algorithm = hd.AlgorithmIdentificationSequence(name="napari-medseg", version=case.model or __version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions, segment_of = [], np.zeros(int(frames.max()) + 1, dtype=np.uint8)
    for number, value in enumerate(present, start=1):
        segment_of[value] = number
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=names.get(value, f"label {value}")[:64],
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=(hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC if reviewed
                            else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC),
            algorithm_identification=algorithm))
    try:
        with library_warnings_silenced():
            seg = hd.seg.Segmentation(
                source_images=sources, pixel_array=segment_of[frames],
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
                series_instance_uid=hd.UID(), series_number=9000, sop_instance_uid=hd.UID(), instance_number=1,
                manufacturer="napari-medseg", manufacturer_model_name=(case.model or "napari-medseg")[:64],
                software_versions=__version__, device_serial_number="none",
                series_description="napari-medseg segmentation")
    except (ValueError, TypeError, AttributeError) as exc:
        raise MedsegError(f"highdicom refused the segmentation ({scrub(str(exc).splitlines()[0])[:160]})") from None
    target = Path(path)
    write_files([(target, lambda tmp: seg.save_as(tmp), ".dcm")])
    return target
