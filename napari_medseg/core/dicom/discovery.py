"""Discovery: walk a folder tree once and read each DICOM header once.

Files are recognised by the ``DICM`` marker after the 128-byte preamble (so
``IM0001`` with no extension counts), or by a ``.dcm`` ending. Each header is read with
pydicom, once, for an allow-list of technical attributes only: patient identifiers are
never asked for, so they cannot reach a layer, a log or the command line. The pixel
data is not read here; where it is stored uncompressed, its file offset is kept so the
pixel pass can read it without parsing the header again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..privacy import library_warnings_silenced
from ..progress import Progress, report

# The technical attributes read from every file (and nothing else).
TAGS = (
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID",
    "Modality", "SeriesNumber", "SeriesDescription", "ImageType", "BodyPartExamined", "Manufacturer",
    "Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness",
    "InstanceNumber", "EchoNumbers", "EchoTime", "TemporalPositionIdentifier", "TriggerTime",
    "AcquisitionNumber", "DiffusionBValue", "DiffusionGradientOrientation", "NumberOfFrames",
    "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
    "RescaleSlope", "RescaleIntercept", "ReferencedSeriesSequence", "PixelData",
)
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
NATIVE_SYNTAXES = {"1.2.840.10008.1.2": "<", "1.2.840.10008.1.2.1": "<", "1.2.840.10008.1.2.2": ">"}
# The non-image objects a study folder holds, by SOP class prefix, in the user's words.
NON_IMAGE_KINDS = (
    ("1.2.840.10008.5.1.4.1.1.88.59", "a key-object selection (KO)"),
    ("1.2.840.10008.5.1.4.1.1.88.", "a structured report (SR)"),
    ("1.2.840.10008.5.1.4.1.1.11.", "a presentation state (PR)"),
    ("1.2.840.10008.5.1.4.1.1.66", "raw data (RAW)"),
    ("1.2.840.10008.5.1.4.1.1.104.", "an encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.481.", "a radiotherapy object (RT)"),
    ("1.2.840.10008.5.1.4.1.1.9.", "a waveform"),
)


def _floats(value, count: int | None = None) -> tuple | None:
    from pydicom.multival import MultiValue

    if value is None:
        return None
    try:
        items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None
    return numbers if count is None or len(numbers) == count else None


def _number(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


@dataclass
class Instance:
    """One DICOM file's technical header (never a patient identifier)."""

    path: Path
    sop_class: str = ""
    sop_uid: str = ""
    series_uid: str = ""
    frame_of_reference: str = ""
    modality: str = ""
    series_number: str = ""
    series_description: str = ""
    image_type: tuple = ()
    body_part: str = ""
    manufacturer: str = ""
    rows: int = 0
    columns: int = 0
    pixel_spacing: tuple | None = None      # (row spacing, column spacing) in mm
    orientation: tuple | None = None        # ImageOrientationPatient: row then column direction
    position: tuple | None = None           # ImagePositionPatient
    slice_thickness: float | None = None
    instance_number: float | None = None
    echo_number: float | None = None
    echo_time: float | None = None
    temporal_position: float | None = None
    trigger_time: float | None = None
    acquisition_number: float | None = None
    b_value: float | None = None
    gradient: tuple | None = None
    frames: int = 1
    bits_allocated: int = 16
    bits_stored: int = 16
    signed: bool = False
    samples: int = 1
    slope: float = 1.0
    intercept: float = 0.0
    transfer_syntax: str = ""
    pixel_offset: int | None = None         # where uncompressed pixel data starts in the file
    pixel_length: int | None = None
    has_pixels: bool = False
    referenced_series: tuple = ()           # a SEG's source series

    @property
    def is_localizer(self) -> bool:
        return any(part.upper() == "LOCALIZER" for part in self.image_type)

    @property
    def is_segmentation(self) -> bool:
        return self.sop_class == SEGMENTATION

    @property
    def non_image_kind(self) -> str | None:
        """What this object is when it is not an image to show (a report, a presentation state...)."""
        if self.sop_class == MEDIA_DIRECTORY:
            return "a media directory (DICOMDIR)"
        if self.is_segmentation:
            return None
        for prefix, kind in NON_IMAGE_KINDS:
            if self.sop_class.startswith(prefix):
                return kind
        if not self.has_pixels or not self.rows or not self.columns:
            return "not an image (no pixel data)"
        return None

    @property
    def native_pixels(self) -> bool:
        return self.transfer_syntax in NATIVE_SYNTAXES and self.pixel_offset is not None


@dataclass
class Discovery:
    instances: list = field(default_factory=list)
    skipped: list = field(default_factory=list)   # one line each: base name and why


def looks_like_dicom_file(path) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
        return head[128:132] == b"DICM"
    except OSError:
        return False


def _candidates(folder: Path):
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.is_file():
                yield Path(entry.path)


def read_header(path: Path) -> Instance:
    """One file's allow-listed header; raises ``pydicom`` or ``OSError`` errors for junk."""
    import pydicom

    with open(path, "rb") as handle, library_warnings_silenced():
        dataset = pydicom.dcmread(handle, defer_size=512, specific_tags=list(TAGS),
                                  force=not looks_like_dicom_file(path))
    meta = getattr(dataset, "file_meta", None)
    raw_pixels = dataset._dict.get(0x7FE00010)  # a deferred element: no pixel bytes are read
    instance = Instance(
        path=path,
        sop_class=str(dataset.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else "")),
        sop_uid=str(dataset.get("SOPInstanceUID", "")),
        series_uid=str(dataset.get("SeriesInstanceUID", "")),
        frame_of_reference=str(dataset.get("FrameOfReferenceUID", "")),
        modality=str(dataset.get("Modality", "") or ""),
        series_number=str(dataset.get("SeriesNumber", "") or ""),
        series_description=str(dataset.get("SeriesDescription", "") or ""),
        image_type=tuple(str(v) for v in (dataset.get("ImageType") or ())),
        body_part=str(dataset.get("BodyPartExamined", "") or ""),
        manufacturer=str(dataset.get("Manufacturer", "") or ""),
        rows=int(dataset.get("Rows") or 0),
        columns=int(dataset.get("Columns") or 0),
        pixel_spacing=_floats(dataset.get("PixelSpacing"), 2),
        orientation=_floats(dataset.get("ImageOrientationPatient"), 6),
        position=_floats(dataset.get("ImagePositionPatient"), 3),
        slice_thickness=_number(dataset.get("SliceThickness")),
        instance_number=_number(dataset.get("InstanceNumber")),
        echo_number=_number(dataset.get("EchoNumbers")),
        echo_time=_number(dataset.get("EchoTime")),
        temporal_position=_number(dataset.get("TemporalPositionIdentifier")),
        trigger_time=_number(dataset.get("TriggerTime")),
        acquisition_number=_number(dataset.get("AcquisitionNumber")),
        b_value=_number(dataset.get("DiffusionBValue")),
        gradient=_floats(dataset.get("DiffusionGradientOrientation"), 3),
        frames=int(_number(dataset.get("NumberOfFrames")) or 1),
        bits_allocated=int(dataset.get("BitsAllocated") or 16),
        bits_stored=int(dataset.get("BitsStored") or dataset.get("BitsAllocated") or 16),
        signed=int(dataset.get("PixelRepresentation") or 0) == 1,
        samples=int(dataset.get("SamplesPerPixel") or 1),
        slope=_number(dataset.get("RescaleSlope")) or 1.0,
        intercept=_number(dataset.get("RescaleIntercept")) or 0.0,
        transfer_syntax=str(meta.get("TransferSyntaxUID", "")) if meta else "1.2.840.10008.1.2",
        has_pixels=raw_pixels is not None,
    )
    if raw_pixels is not None and getattr(raw_pixels, "value_tell", None) is not None \
            and raw_pixels.length not in (None, 0xFFFFFFFF):
        instance.pixel_offset, instance.pixel_length = int(raw_pixels.value_tell), int(raw_pixels.length)
    references = dataset.get("ReferencedSeriesSequence") or ()
    instance.referenced_series = tuple(str(item.get("SeriesInstanceUID", "")) for item in references
                                       if item.get("SeriesInstanceUID"))
    if instance.position is None and instance.frames == 1 and instance.has_pixels and not instance.is_segmentation:
        _single_frame_groups(instance)
    return instance


def _single_frame_groups(instance: Instance) -> None:
    """An enhanced image of one frame keeps its geometry in the functional groups (not at the top
    level); these files are stacked like classic slices, so their plane is read here."""
    import pydicom

    with library_warnings_silenced():
        dataset = pydicom.dcmread(str(instance.path), stop_before_pixels=True)
    groups = []
    for key in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        items = dataset.get(key) or ()
        if items:
            groups.append(items[0])

    def find(sequence: str, attribute: str):
        for group in groups:
            items = group.get(sequence) or ()
            if items and attribute in items[0]:
                return items[0].get(attribute)
        return None

    instance.position = _floats(find("PlanePositionSequence", "ImagePositionPatient"), 3)
    instance.orientation = _floats(find("PlaneOrientationSequence", "ImageOrientationPatient"), 6)
    instance.pixel_spacing = _floats(find("PixelMeasuresSequence", "PixelSpacing"), 2)
    instance.slice_thickness = _number(find("PixelMeasuresSequence", "SliceThickness"))
    instance.slope = _number(find("PixelValueTransformationSequence", "RescaleSlope")) or instance.slope
    instance.intercept = _number(find("PixelValueTransformationSequence", "RescaleIntercept")) or instance.intercept


def scan_folder(folder: str | os.PathLike, progress: Progress | None = None) -> Discovery:
    """Every DICOM file below ``folder``, headers read once; unreadable files are listed as skipped."""
    from pydicom.errors import InvalidDicomError

    found = Discovery()
    paths = [p for p in _candidates(Path(folder))]
    for index, path in enumerate(paths):
        marked = looks_like_dicom_file(path)
        if not marked and path.suffix.lower() != ".dcm" and path.name != "DICOMDIR":
            continue  # not DICOM (a NIfTI, a text file): not ours to mention
        try:
            instance = read_header(path)
        except (InvalidDicomError, OSError, ValueError, TypeError, EOFError, KeyError, IndexError) as exc:
            found.skipped.append(f"skipped {path.name}: not a readable DICOM file ({type(exc).__name__})")
            continue
        found.instances.append(instance)
        if index % 64 == 0:
            report(progress, 0.3 * index / max(len(paths), 1), f"reading headers {index}/{len(paths)}")
    return found


def normal_of(orientation: tuple) -> np.ndarray:
    """The slice normal (row direction x column direction) of an ImageOrientationPatient."""
    row, column = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
    return np.cross(row, column)
