"""Reading scans and writing masks in the scan's own geometry.

Every public function raises only :class:`~napari_medseg.core.errors.MedsegError`
subclasses for bad input, with a message fit to show a radiologist.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import (
    MedsegError,
    MultiVolumeError,
    NotAVolumeError,
    UnreadableScanError,
)
from .geometry import ScanGeometry, check_affine, itk_to_ras_affine, ras_affine_to_itk
from .outputs import write_files
from .privacy import library_warnings_silenced, native_messages, quiet_simpleitk
from .progress import Progress
from .sampling import looks_like_ct, strided_sample

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SCAN_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
MASK_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
NIFTI_INTENT_LABEL = 1002
# More distinct values than this and an integer volume is an image, not a label map.
MAX_LABEL_VALUES = 64


def suffix_of(path: str | os.PathLike) -> str:
    name = str(path).lower()
    for suffix in sorted(SCAN_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ""


def is_supported_path(path: str | os.PathLike) -> bool:
    """True for files with a scan extension and for folders that may hold DICOM."""
    path = Path(path)
    if path.is_dir():
        return path.suffix.lower() != ".zarr"  # a zarr store is a folder that is never DICOM
    if suffix_of(path) != "":
        return True
    from . import dicom  # pydicom loads only for DICOM (80 ms of every start otherwise)

    return dicom.looks_like_dicom_file(path)


@dataclass
class Volume:
    """A 3D scan in file voxel order with its geometry.

    ``data`` is indexed ``(i, j, k)`` like the file; :meth:`layer_data` gives the
    napari view (see :mod:`napari_medseg.core.geometry`).
    """

    data: np.ndarray
    geometry: ScanGeometry
    name: str
    modality: str = "unknown"
    modality_guessed: bool = True
    is_label_map: bool = False
    warnings: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def layer_data(self) -> np.ndarray:
        return self.geometry.to_layer(self.data)

    def value_range(self) -> tuple:
        return float(np.min(self.data)), float(np.max(self.data))

    def describe(self) -> dict:
        """A patient-free summary for the CLI and the Scan widget."""
        g = self.geometry
        lo, hi = self.value_range()
        return {
            "name": self.name,
            "format": self.info.get("format", g.source_format),
            "dimensions": list(g.file_shape),
            "spacing_mm": [round(s, 6) for s in g.spacing],
            "orientation": g.orientation_code,
            "oblique": g.is_oblique,
            "modality": self.modality + (" (guessed from intensities)" if self.modality_guessed else ""),
            "dtype": str(self.data.dtype),
            "value_range": [lo, hi],
            "world_bounds_lps_mm": g.world_bounds_lps().round(3).tolist(),
            "kind": "label map" if self.is_label_map else "image",
            **({"volume": self.info["volume"]} if "volume" in self.info else {}),
        }


def _display_name(path: Path) -> str:
    name = path.name
    for suffix in SCAN_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def looks_like_dicom(path: Path) -> bool:
    from .dicom.discovery import looks_like_dicom_file

    return looks_like_dicom_file(path)


def read_volume(
    path: str | os.PathLike,
    *,
    volume_index: int | None = None,
    series: str | int | None = None,
    progress: Progress | None = None,
) -> Volume:
    """Read a 3D scan from NIfTI, NRRD, MetaImage or a DICOM series folder.

    Parameters
    ----------
    path
        File or DICOM folder.
    volume_index
        For 4D files, which volume to take; without it a 4D file raises
        :class:`MultiVolumeError` that says how many volumes there are.
    series
        For folders with several DICOM series: the series UID or its 0-based index in
        :func:`napari_medseg.core.dicom.list_series`. ``volume_index`` also picks one
        volume of a DICOM series with several (echoes, time points, b-values).
    progress
        Called as ``progress(fraction, message)``.
    """
    path = Path(path)
    if not path.exists():
        raise UnreadableScanError(f"'{path.name}' does not exist")
    if series is not None and not path.is_dir():
        raise UnreadableScanError(f"'{path.name}' is a single file, not a folder of DICOM series; "
                                  "a series can only be chosen in a folder")
    if path.is_dir():
        from . import dicom

        volume = dicom.read_series(path, series=series, volume_index=volume_index, progress=progress)
    else:
        suffix = suffix_of(path)
        if suffix in NIFTI_SUFFIXES:
            volume = _read_nifti(path, volume_index)
        elif suffix in ITK_SUFFIXES:
            volume = _read_itk_file(path, volume_index)
        elif path.suffix.lower() == ".dcm" or looks_like_dicom(path):
            from . import dicom

            volume = dicom.read_file(path, volume_index)
        else:
            raise UnreadableScanError(
                f"'{path.name}' is not a supported scan (use NIfTI, NRRD, MetaImage or a DICOM folder)"
            )
    _sanitize(volume)
    if progress:
        progress(1.0, "done")
    return volume


# -- NIfTI ------------------------------------------------------------------

def _read_nifti(path: Path, volume_index: int | None) -> Volume:
    import nibabel as nib

    try:
        with library_warnings_silenced():
            img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for junk input
        raise UnreadableScanError(f"'{path.name}' is not a valid NIfTI file ({_short(exc, path)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise UnreadableScanError(f"'{path.name}' is not a NIfTI image")
    header = img.header
    shape = tuple(int(n) for n in img.shape)
    _check_shape(path.name, shape)
    try:
        data = _fast_gzip_voxels(path, img)
        if data is None:
            # asanyarray keeps memory maps for uncompressed files: no extra copy.
            data = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise UnreadableScanError(
            f"'{path.name}' is truncated or corrupt: its voxel data could not be read ({_short(exc, path)})"
        ) from None
    data, info = _pick_volume(path.name, data, volume_index)
    affine = img.affine
    check_affine_named(path.name, affine)
    intent = int(header.get("intent_code", 0)) if "intent_code" in header else 0
    geometry = ScanGeometry(
        affine_ras=affine,
        file_shape=data.shape,
        source_format="nifti",
        nifti_header=header.binaryblock,
        extra={"nifti_version": 2 if isinstance(img, nib.Nifti2Image) else 1},
    )
    info["format"] = "NIfTI-2" if isinstance(img, nib.Nifti2Image) else "NIfTI-1"
    is_labels = intent == NIFTI_INTENT_LABEL or _looks_like_labels(data)
    return Volume(data=data, geometry=geometry, name=_display_name(path),
                  is_label_map=is_labels, info=info)


def _fast_gzip_voxels(path: Path, img) -> np.ndarray | None:
    """Decompress unscaled .nii.gz voxels with zlib-ng straight into the final array.

    About twice as fast as nibabel's gzip path (see benchmarks/bench_io.py) and with
    no intermediate buffer. Returns None where nibabel must do the work (scaled data,
    zlib-ng not installed).
    """
    if not str(path).lower().endswith(".gz"):
        return None
    try:
        from zlib_ng import gzip_ng
    except ImportError:
        return None
    proxy = img.dataobj  # nibabel's own reading of the header: offset, dtype, scaling
    if getattr(proxy, "order", "F") != "F" or not np.all(np.asarray(proxy.slope) == 1) \
            or not np.all(np.asarray(proxy.inter) == 0):
        return None
    dtype = np.dtype(proxy.dtype)
    shape = tuple(int(n) for n in proxy.shape)
    # NIfTI stores voxels with i fastest (Fortran order), as nibabel returns them.
    out = np.empty(shape[::-1], dtype=dtype.newbyteorder("=")).T
    buffer = memoryview(out.T).cast("B")
    with gzip_ng.open(str(path), "rb") as fh:
        fh.seek(int(proxy.offset))
        n_read = fh.readinto(buffer)
    if n_read != buffer.nbytes:
        raise EOFError(f"the file ends after {n_read} of {buffer.nbytes} voxel bytes")
    if not dtype.isnative:
        out.byteswap(inplace=True)
    return out


# -- NRRD / MetaImage / single DICOM file via SimpleITK ---------------------

class _KeepAlive:
    """Lets a numpy view keep its SimpleITK image (the owner of the buffer) alive."""

    def __init__(self, view: np.ndarray, owner):
        self.__array_interface__ = view.__array_interface__
        self._view = view
        self._owner = owner


def _sitk_array(image) -> np.ndarray:
    import SimpleITK as sitk

    return np.asarray(_KeepAlive(sitk.GetArrayViewFromImage(image), image))


def _read_itk_file(path: Path, volume_index: int | None) -> Volume:
    sitk = quiet_simpleitk()
    try:
        with native_messages():
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise UnreadableScanError(f"'{path.name}' could not be read: {_itk_reason(exc)}") from None
    return _finish_itk(image, path.name, _display_name(path), volume_index, fmt=suffix_of(path).lstrip(".").upper())


def _finish_itk(image, filename: str, name: str, volume_index: int | None, fmt: str) -> Volume:
    """Turn a SimpleITK image into a :class:`Volume` without copying voxels."""
    dim = image.GetDimension()
    components = image.GetNumberOfComponentsPerPixel()
    size = tuple(image.GetSize())  # ITK order: i, j, k[, t]
    shape = size + ((components,) if components > 1 else ())
    _check_shape(filename, shape)
    array = _sitk_array(image)  # numpy order: [t,] k, j, i [, c]
    if components > 1:
        array = np.moveaxis(array, -1, 0)  # channels first, like a 4th dimension
    # Reverse the spatial axes to file order i, j, k and put volumes last.
    file_order = array.T  # (n,) k, j, i -> i, j, k (, n): a view
    data, info = _pick_volume(filename, file_order, volume_index)
    origin = image.GetOrigin()[:3]
    spacing = image.GetSpacing()[:3]
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(dim, dim)[:3, :3]
    affine = itk_to_ras_affine(origin, spacing, direction)
    check_affine_named(filename, affine)
    geometry = ScanGeometry(
        affine_ras=affine,
        file_shape=data.shape,
        source_format="itk",
        itk={"origin": list(origin), "spacing": list(spacing), "direction": direction.ravel().tolist()},
    )
    info["format"] = fmt
    return Volume(data=data, geometry=geometry, name=name, is_label_map=_looks_like_labels(data), info=info)


# -- shared checks ------------------------------------------------------------

def _check_shape(filename: str, shape: tuple) -> None:
    if any(n == 0 for n in shape):
        raise NotAVolumeError(f"'{filename}' has a zero-length axis (shape {shape}): it holds no voxels")
    spatial = shape[:3]
    if len(shape) < 3 or sum(n > 1 for n in spatial) < 3:
        raise NotAVolumeError(
            f"'{filename}' is a 2D image (shape {shape}); napari-medseg needs a 3D volume"
        )


def check_affine_named(filename: str, affine: np.ndarray) -> None:
    try:
        check_affine(affine)
    except NotAVolumeError as exc:
        raise NotAVolumeError(f"'{filename}': {exc}") from None


def _pick_volume(filename: str, data: np.ndarray, volume_index: int | None):
    """Reduce 4D+ data to one 3D volume; trailing singleton axes are dropped."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    info: dict = {}
    if data.ndim == 3:
        if volume_index not in (None, 0):
            raise NotAVolumeError(f"'{filename}' is a single 3D volume; there is no volume {volume_index}")
        return data, info
    if data.ndim > 4:
        raise NotAVolumeError(f"'{filename}' has {data.ndim} dimensions {data.shape}; only 3D and 4D are supported")
    n = int(data.shape[3])
    if volume_index is None:
        raise MultiVolumeError(f"'{filename}' is 4D with {n} volumes, numbered 0 to {n - 1}; choose one",
                               n_volumes=n)
    if not 0 <= volume_index < n:
        raise NotAVolumeError(f"'{filename}' has volumes 0 to {n - 1}; volume {volume_index} does not exist")
    info["volume"] = f"{volume_index} of {n}"
    info["n_volumes"] = n
    return data[..., volume_index], info


def _looks_like_labels(data: np.ndarray) -> bool:
    """Integer volumes with few, non-negative values are label maps."""
    if not (np.issubdtype(data.dtype, np.integer) or data.dtype == bool):
        return False
    sample = strided_sample(data)
    if sample.min() < 0 or len(np.unique(sample)) > MAX_LABEL_VALUES:
        return False
    return int(data.max()) <= 10_000


def _guess_modality(volume: Volume) -> None:
    if not volume.modality_guessed or volume.is_label_map:
        return
    volume.modality = "CT" if looks_like_ct(volume.data) else "MR"


def _sanitize(volume: Volume) -> None:
    """Replace NaN/Inf, which break windowing and networks, and say so."""
    data = volume.data
    if np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        n_bad = int(data.size - np.count_nonzero(finite))
        if n_bad == data.size:
            raise NotAVolumeError(f"'{volume.name}' contains no finite values (all NaN or infinite)")
        if n_bad:
            fill = float(np.min(data[finite]))
            if not data.flags.writeable:
                data = np.array(data)
            data[~finite] = fill
            volume.data = data
            volume.warnings.append(
                f"{n_bad} voxels were NaN or infinite; they were set to the lowest finite value ({fill:g})"
            )
    if volume.data.dtype == bool:
        volume.data = volume.data.astype(np.uint8)
    _guess_modality(volume)


# -- writing ------------------------------------------------------------------

def write_mask(path: str | os.PathLike, layer_mask: np.ndarray, geometry: ScanGeometry) -> Path:
    """Write a label mask given in layer order into ``geometry``'s file grid.

    The file is written to a temporary name beside the target and then renamed, so a
    full disk or a crash never leaves a half-written mask or destroys an older one.
    The folder must exist (see :mod:`napari_medseg.core.outputs`).
    """
    return write_files([mask_file(path, layer_mask, geometry)])[0]


def mask_file(path: str | os.PathLike, layer_mask: np.ndarray, geometry: ScanGeometry) -> tuple:
    """``(path, write, suffix)`` for :func:`~napari_medseg.core.outputs.write_files`: a mask."""
    path = Path(path)
    lower = str(path).lower()
    if not lower.endswith(MASK_SUFFIXES):
        raise MedsegError(f"cannot save a mask as '{path.name}': use .nii.gz, .nii, .nrrd or .mha")
    mask = np.asarray(layer_mask)
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise MedsegError(f"a mask must hold integer labels, not {mask.dtype}")
    file_mask = np.ascontiguousarray(geometry.to_file(mask))
    hi = int(file_mask.max()) if file_mask.size else 0
    lo = int(file_mask.min()) if file_mask.size else 0
    dtype = np.uint8 if lo >= 0 and hi < 256 else (np.uint16 if lo >= 0 and hi < 65536 else np.int32)
    file_mask = file_mask.astype(dtype, copy=False)
    suffix = ".nii.gz" if lower.endswith(".nii.gz") else path.suffix
    if lower.endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        return path, lambda tmp: nib.save(_nifti_mask(file_mask, geometry), tmp), suffix
    return path, lambda tmp: _write_itk_mask(file_mask, geometry, tmp), suffix


def scan_file(path: str | os.PathLike, layer_scan: np.ndarray, geometry: ScanGeometry) -> tuple:
    """``(path, write, suffix)`` for :func:`~napari_medseg.core.outputs.write_files`: a scan's voxels
    (their own type) in a fresh NIfTI header on ``geometry``'s grid."""
    import nibabel as nib

    path = Path(path)
    if not str(path).lower().endswith(NIFTI_SUFFIXES):
        raise MedsegError(f"cannot save a scan as '{path.name}': use .nii.gz or .nii")
    data = np.ascontiguousarray(geometry.to_file(np.asarray(layer_scan)))
    img = nib.Nifti1Image(data, geometry.affine_ras)
    img.set_qform(geometry.affine_ras, code="scanner")
    img.set_sform(geometry.affine_ras, code="scanner")
    suffix = ".nii.gz" if str(path).lower().endswith(".nii.gz") else ".nii"
    return path, lambda tmp: nib.save(img, tmp), suffix


def write_map(path: str | os.PathLike, layer_maps: np.ndarray, geometry: ScanGeometry) -> Path:
    """Write float maps ``(C, D, H, W)`` or ``(D, H, W)`` in layer order as NIfTI in the scan's grid.

    Several maps become one 4D file with the maps along the last axis. Written
    atomically, like :func:`write_mask`.
    """
    return write_files([map_file(path, layer_maps, geometry)])[0]


def map_file(path: str | os.PathLike, layer_maps: np.ndarray, geometry: ScanGeometry) -> tuple:
    """``(path, write, suffix)`` for :func:`~napari_medseg.core.outputs.write_files`: float maps."""
    import nibabel as nib

    path = Path(path)
    if not str(path).lower().endswith(NIFTI_SUFFIXES):
        raise MedsegError(f"cannot save maps as '{path.name}': use .nii.gz or .nii")
    maps = np.asarray(layer_maps, dtype=np.float32)
    stack = maps[None] if maps.ndim == 3 else maps
    file_maps = np.stack([geometry.to_file(m) for m in stack], axis=-1)
    if maps.ndim == 3:
        file_maps = file_maps[..., 0]
    img = nib.Nifti1Image(np.ascontiguousarray(file_maps), geometry.affine_ras)
    img.set_qform(geometry.affine_ras, code="scanner")
    img.set_sform(geometry.affine_ras, code="scanner")
    img.set_data_dtype(np.float32)
    suffix = ".nii.gz" if str(path).lower().endswith(".nii.gz") else ".nii"
    return path, lambda tmp: nib.save(img, tmp), suffix


def _nifti_mask(file_mask: np.ndarray, geometry: ScanGeometry):
    import nibabel as nib

    if geometry.nifti_header is not None:
        header_cls = nib.Nifti2Header if geometry.extra.get("nifti_version") == 2 else nib.Nifti1Header
        image_cls = nib.Nifti2Image if geometry.extra.get("nifti_version") == 2 else nib.Nifti1Image
        header = header_cls(binaryblock=geometry.nifti_header)
        # affine=None keeps the source header's qform/sform and their codes verbatim.
        img = image_cls(file_mask, affine=None, header=header)
    else:
        img = nib.Nifti1Image(file_mask, geometry.affine_ras)
        img.set_qform(geometry.affine_ras, code="scanner")
        img.set_sform(geometry.affine_ras, code="scanner")
    img.set_data_dtype(file_mask.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, 0
    img.header.set_intent("label")
    return img


def _write_itk_mask(file_mask: np.ndarray, geometry: ScanGeometry, tmp: str) -> None:
    sitk = quiet_simpleitk()
    itk = geometry.itk or ras_affine_to_itk(geometry.affine_ras)
    image = sitk.GetImageFromArray(np.ascontiguousarray(file_mask.T))
    image.SetOrigin([float(v) for v in itk["origin"]])
    image.SetSpacing([float(v) for v in itk["spacing"]])
    image.SetDirection([float(v) for v in itk["direction"]])
    try:
        sitk.WriteImage(image, tmp, True)
    except RuntimeError as exc:
        raise OSError(_itk_reason(exc)) from None


def _short(exc: BaseException, path: Path | None = None) -> str:
    """First line of an exception, without the full path (folders can name patients)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if path is not None:
        text = text.replace(f'"{path}"', f"'{path.name}'").replace(str(path), path.name)
    return text[:160]


def _itk_reason(exc: BaseException) -> str:
    """ITK messages are multi-line with C++ file names; keep the useful line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if ln.lower().startswith(("description:", "itk::error")) or "Could not create IO" in ln:
            return ln.split(":", 1)[-1].strip()[:200]
    return (lines[-1] if lines else type(exc).__name__)[:200]
