"""Discovery: walk a folder tree once and read each DICOM header once.

Files are recognised by the ``DICM`` marker after the 128-byte preamble (so
``IM0001`` with no extension counts), or by a ``.dcm`` ending. Each header is read with
pydicom, once, for an allow-list of technical attributes only: patient identifiers are
never asked for, so they cannot reach a layer, a log or the command line. The pixel
data is not read here; where it is stored uncompressed, its file offset is kept so the
pixel pass can read it without parsing the header again.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path


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
    if value is None or value == "":
        return None
    try:
        items = [value] if isinstance(value, (str, bytes, int, float)) else list(value)
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None
    return numbers if count is None or len(numbers) == count else None


def _number(value) -> float | None:
    try:
        return float(_first(value)) if value not in (None, "") else None
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


# The allow-listed attributes by tag, with how their values are stored (checked against
# pydicom's dictionary by the tests): text, unsigned 16-bit, or 64-bit float.
FAST_TAGS = {
    0x00020002: ("MediaStorageSOPClassUID", "text"), 0x00020010: ("TransferSyntaxUID", "text"),
    0x00080008: ("ImageType", "text"), 0x00080016: ("SOPClassUID", "text"), 0x00080018: ("SOPInstanceUID", "text"),
    0x00080060: ("Modality", "text"), 0x00080070: ("Manufacturer", "text"),
    0x0008103E: ("SeriesDescription", "text"), 0x00081115: ("ReferencedSeriesSequence", "sequence"),
    0x00180015: ("BodyPartExamined", "text"), 0x00180050: ("SliceThickness", "text"),
    0x00180081: ("EchoTime", "text"), 0x00180086: ("EchoNumbers", "text"), 0x00181060: ("TriggerTime", "text"),
    0x00189087: ("DiffusionBValue", "float"), 0x00189089: ("DiffusionGradientOrientation", "float"),
    0x0020000D: ("StudyInstanceUID", "text"), 0x0020000E: ("SeriesInstanceUID", "text"),
    0x00200011: ("SeriesNumber", "text"), 0x00200012: ("AcquisitionNumber", "text"),
    0x00200013: ("InstanceNumber", "text"), 0x00200032: ("ImagePositionPatient", "text"),
    0x00200037: ("ImageOrientationPatient", "text"), 0x00200052: ("FrameOfReferenceUID", "text"),
    0x00200100: ("TemporalPositionIdentifier", "text"), 0x00280002: ("SamplesPerPixel", "uint16"),
    0x00280004: ("PhotometricInterpretation", "text"), 0x00280008: ("NumberOfFrames", "text"),
    0x00280010: ("Rows", "uint16"), 0x00280011: ("Columns", "uint16"), 0x00280030: ("PixelSpacing", "text"),
    0x00280100: ("BitsAllocated", "uint16"), 0x00280101: ("BitsStored", "uint16"),
    0x00280103: ("PixelRepresentation", "uint16"), 0x00281052: ("RescaleIntercept", "text"),
    0x00281053: ("RescaleSlope", "text"),
}
_PIXEL_DATA = 0x7FE00010
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_FAST_SYNTAXES = {"1.2.840.10008.1.2": False}  # implicit VR; every other little-endian syntax is explicit
_PAIR = struct.Struct("<HH").unpack_from
_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from


def _decode(raw: bytes, kind: str):
    if kind == "uint16":
        return struct.unpack_from("<H", raw)[0] if len(raw) >= 2 else None
    if kind == "float":
        values = struct.unpack_from(f"<{len(raw) // 8}d", raw)
        return values[0] if len(values) == 1 else list(values)
    text = raw.decode("latin-1").strip(" \x00")
    return text.split("\\") if "\\" in text else text


def fast_values(path: Path, head: bytes) -> dict | None:
    """The allow-listed values of a DICOM Part 10 file, from its bytes up to the pixel data.

    A plain walk over explicit or implicit VR little-endian elements that reads only the
    values asked for. It gives up (``None``) on anything else (big endian, deflate, an
    undefined-length element before the pixel data, a sequence we need), and
    :func:`read_header` then asks pydicom.
    """
    data = head
    size = len(data)
    values: dict = {}
    pos, explicit, in_meta = 132, True, True
    tags, long_vrs, pair, u16, u32 = FAST_TAGS, _LONG_VRS, _PAIR, _U16, _U32
    while True:
        if pos + 12 > size:
            more = _read_more(path, size)
            if not more:
                return None
            data += more
            size = len(data)
            continue
        group, element = pair(data, pos)
        if in_meta and group != 2:
            in_meta = False
            syntax = values.get("TransferSyntaxUID", "")
            if syntax.startswith("1.2.840.10008.1.2.2") or syntax.endswith(".99"):
                return None  # big endian or deflated: pydicom's job
            explicit = _FAST_SYNTAXES.get(syntax, True)
        tag = (group << 16) | element
        if explicit or in_meta:
            vr = data[pos + 4:pos + 6]
            if vr in long_vrs:
                length, start = u32(data, pos + 8)[0], pos + 12
            else:
                length, start = u16(data, pos + 6)[0], pos + 8
        else:
            length, start = u32(data, pos + 4)[0], pos + 8
        if tag >= _PIXEL_DATA:
            if tag == _PIXEL_DATA:
                values["_pixels"] = (start, None if length == 0xFFFFFFFF else length)
            return values
        if length == 0xFFFFFFFF:
            return None
        wanted = tags.get(tag)
        if wanted is not None:
            if wanted[1] == "sequence":
                return None  # a SEG's references: pydicom reads sequences
            while start + length > size:
                more = _read_more(path, size, max(65536, start + length - size))
                if not more:
                    return None
                data += more
                size = len(data)
            values[wanted[0]] = _decode(data[start:start + length], wanted[1])
        pos = start + length


def _read_more(path: Path, offset: int, size: int = 65536) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def _pydicom_values(path: Path) -> dict:
    """The same values through pydicom, for the files the fast walk leaves to it."""
    import pydicom

    with open(path, "rb") as handle, library_warnings_silenced():
        dataset = pydicom.dcmread(handle, defer_size=512, specific_tags=list(TAGS),
                                  force=not looks_like_dicom_file(path))
    meta = getattr(dataset, "file_meta", None)
    values = {}
    for keyword in TAGS:
        if keyword != "PixelData" and keyword in dataset:
            values[keyword] = dataset.get(keyword)
    if meta is not None:
        values["MediaStorageSOPClassUID"] = str(meta.get("MediaStorageSOPClassUID", ""))
        values["TransferSyntaxUID"] = str(meta.get("TransferSyntaxUID", ""))
    raw = dataset._dict.get(0x7FE00010)  # a deferred element: no pixel bytes are read
    if raw is not None:
        length = getattr(raw, "length", None)
        values["_pixels"] = (getattr(raw, "value_tell", None), None if length in (None, 0xFFFFFFFF) else length)
    references = dataset.get("ReferencedSeriesSequence") or ()
    values["_references"] = tuple(str(item.get("SeriesInstanceUID", "")) for item in references
                                  if item.get("SeriesInstanceUID"))
    return values


def read_header(path: Path, head: bytes | None = None) -> Instance:
    """One file's allow-listed header; raises ``pydicom`` or ``OSError`` errors for junk."""
    if head is None:
        with open(path, "rb") as handle:
            head = handle.read(8192)
    values = fast_values(path, head) if head[128:132] == b"DICM" else None
    if values is None:
        values = _pydicom_values(path)
    pixels = values.get("_pixels")
    text = lambda key: str(values.get(key) or "")  # noqa: E731
    image_type = values.get("ImageType") or ()
    syntax = text("TransferSyntaxUID") or "1.2.840.10008.1.2"
    instance = Instance(
        path=path,
        sop_class=text("SOPClassUID") or text("MediaStorageSOPClassUID"),
        sop_uid=text("SOPInstanceUID"), series_uid=text("SeriesInstanceUID"),
        frame_of_reference=text("FrameOfReferenceUID"), modality=text("Modality"),
        series_number=text("SeriesNumber"), series_description=text("SeriesDescription"),
        image_type=tuple(str(v) for v in ([image_type] if isinstance(image_type, str) else image_type)),
        body_part=text("BodyPartExamined"), manufacturer=text("Manufacturer"),
        rows=int(_number(values.get("Rows")) or 0), columns=int(_number(values.get("Columns")) or 0),
        pixel_spacing=_floats(values.get("PixelSpacing"), 2),
        orientation=_floats(values.get("ImageOrientationPatient"), 6),
        position=_floats(values.get("ImagePositionPatient"), 3),
        slice_thickness=_number(values.get("SliceThickness")),
        instance_number=_number(values.get("InstanceNumber")),
        echo_number=_number(_first(values.get("EchoNumbers"))),
        echo_time=_number(values.get("EchoTime")),
        temporal_position=_number(values.get("TemporalPositionIdentifier")),
        trigger_time=_number(values.get("TriggerTime")),
        acquisition_number=_number(values.get("AcquisitionNumber")),
        b_value=_number(values.get("DiffusionBValue")),
        gradient=_floats(values.get("DiffusionGradientOrientation"), 3),
        frames=int(_number(values.get("NumberOfFrames")) or 1),
        bits_allocated=int(_number(values.get("BitsAllocated")) or 16),
        bits_stored=int(_number(values.get("BitsStored")) or _number(values.get("BitsAllocated")) or 16),
        signed=int(_number(values.get("PixelRepresentation")) or 0) == 1,
        samples=int(_number(values.get("SamplesPerPixel")) or 1),
        slope=_number(values.get("RescaleSlope")) or 1.0,
        intercept=_number(values.get("RescaleIntercept")) or 0.0,
        transfer_syntax=syntax,
        has_pixels=pixels is not None,
        referenced_series=tuple(values.get("_references") or ()),
    )
    if pixels is not None and pixels[0] is not None and pixels[1] is not None:
        instance.pixel_offset, instance.pixel_length = int(pixels[0]), int(pixels[1])
    if instance.position is None and instance.frames == 1 and instance.has_pixels and not instance.is_segmentation:
        _single_frame_groups(instance)
    return instance


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value


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


def _scan_files(paths: list) -> tuple[list, list]:
    """``(instances, skipped lines)`` for some candidate files, in their order."""
    instances, skipped = [], []
    for path in paths:
        try:
            with open(path, "rb") as handle:
                head = handle.read(8192)
        except OSError:
            continue
        if head[128:132] != b"DICM" and path.suffix.lower() != ".dcm" and path.name != "DICOMDIR":
            continue  # not DICOM (a NIfTI, a text file): not ours to mention
        try:
            instances.append(read_header(path, head))
        except Exception as exc:  # noqa: BLE001 - junk files raise anything; each is named and skipped
            skipped.append(f"skipped {path.name}: not a readable DICOM file ({type(exc).__name__})")
    return instances, skipped


def scan_folder(folder: str | os.PathLike, progress: Progress | None = None) -> Discovery:
    """Every DICOM file below ``folder``, headers read once; unreadable files are listed as skipped."""
    paths = list(_candidates(Path(folder)))
    found = Discovery()
    step = 256
    for start in range(0, len(paths), step):
        instances, skipped = _scan_files(paths[start:start + step])
        found.instances.extend(instances)
        found.skipped.extend(skipped)
        report(progress, 0.3 * min(1.0, (start + step) / max(len(paths), 1)),
               f"reading headers {min(start + step, len(paths))}/{len(paths)}")
    return found


@functools.lru_cache(maxsize=256)
def normal_of(orientation: tuple) -> tuple:
    """The slice normal (row direction x column direction) of an ImageOrientationPatient."""
    r0, r1, r2, c0, c1, c2 = (float(v) for v in orientation[:6])
    return (r1 * c2 - r2 * c1, r2 * c0 - r0 * c2, r0 * c1 - r1 * c0)
