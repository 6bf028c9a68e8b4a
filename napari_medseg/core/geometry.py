"""Scan geometry: where each voxel sits in patient space, and how the layer sees it.

Conventions (used everywhere in napari-medseg):

* ``affine_ras`` maps a *file* voxel index ``(i, j, k)`` to RAS+ millimetres, the
  nibabel convention.
* A napari layer holds the same voxels re-ordered (transposes and flips only, never a
  resample) so that layer axes run ``(S, P, L)``. Axial slices then appear in the 2D
  view in the radiological convention: anterior up, patient's right on screen left.
* napari world coordinates are **LPS millimetres listed in (z, y, x) order**, i.e.
  world axis 0 = LPS z (superior), 1 = LPS y (posterior), 2 = LPS x (left). The
  layer ``affine`` carries spacing, the direction matrix (oblique too) and origin.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np

from .errors import GeometryMismatchError, NotAVolumeError

LAYER_AXCODES = ("S", "P", "L")
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# RAS (x, y, z) -> napari world (z_lps, y_lps, x_lps)
RAS_TO_WORLD = np.array(
    [[0, 0, 1, 0], [0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]], dtype=float
)


def axis_rotation(axis: int, degrees: float) -> np.ndarray:
    """3 x 3 rotation by ``degrees`` about one coordinate axis (0, 1 or 2)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    r = np.eye(3)
    a, b = [i for i in range(3) if i != axis]
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def _orientations():
    """nibabel's orientation helpers, imported when first needed (nibabel is slow to import,
    and listing a DICOM study needs none of it)."""
    from nibabel import orientations

    return orientations


def voxel_spacing(affine: np.ndarray) -> tuple:
    """Voxel size in mm along each axis of a voxel-to-mm affine (the one definition used everywhere)."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0))


def check_affine(affine: np.ndarray) -> None:
    """Raise :class:`NotAVolumeError` unless ``affine`` places voxels in space."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise NotAVolumeError("the voxel-to-patient transform contains NaN or infinite values")
    linear = affine[:3, :3]
    if abs(np.linalg.det(linear)) < 1e-12 * max(1.0, np.abs(linear).max() ** 3):
        raise NotAVolumeError(
            "the voxel-to-patient transform is singular (determinant 0), "
            "so voxels cannot be placed in patient space"
        )


def itk_to_ras_affine(origin, spacing, direction) -> np.ndarray:
    """ITK/DICOM geometry (LPS) of a 3D image to a file-index -> RAS affine."""
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(np.asarray(spacing, dtype=float))
    lps[:3, 3] = np.asarray(origin, dtype=float)
    return RAS_TO_LPS @ lps


def ras_affine_to_itk(affine_ras: np.ndarray) -> dict:
    """Inverse of :func:`itk_to_ras_affine` (shears are not representable in ITK)."""
    lps = RAS_TO_LPS @ np.asarray(affine_ras, dtype=float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return {
        "origin": lps[:3, 3].tolist(),
        "spacing": spacing.tolist(),
        "direction": direction.ravel().tolist(),
    }


@dataclass
class ScanGeometry:
    """Everything needed to put a layer's voxels back into the source file's grid.

    It travels in napari layer metadata (``metadata["medseg"]``) as plain types, so
    masks derived from a scan can be written back in exactly that scan's geometry.
    """

    affine_ras: np.ndarray
    file_shape: tuple
    source_format: str = "nifti"
    nifti_header: bytes | None = None
    itk: dict | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.affine_ras = np.asarray(self.affine_ras, dtype=float)
        self.file_shape = tuple(int(n) for n in self.file_shape)
        if len(self.file_shape) != 3:
            raise NotAVolumeError(f"expected a 3D grid, got shape {self.file_shape}")
        check_affine(self.affine_ras)

    # -- axis bookkeeping -------------------------------------------------
    @property
    def _file_ornt(self) -> np.ndarray:
        if self.source_format == "napari":
            # The grid came from a napari layer: its axes already are the layer axes.
            return _orientations().axcodes2ornt(LAYER_AXCODES)
        return _orientations().io_orientation(self.affine_ras)

    @property
    def to_layer_ornt(self) -> np.ndarray:
        return _orientations().ornt_transform(
            self._file_ornt, _orientations().axcodes2ornt(LAYER_AXCODES)
        )

    @property
    def to_file_ornt(self) -> np.ndarray:
        return _orientations().ornt_transform(
            _orientations().axcodes2ornt(LAYER_AXCODES), self._file_ornt
        )

    @property
    def layer_shape(self) -> tuple:
        order = self.to_layer_ornt[:, 0].astype(int)
        shape = [0, 0, 0]
        for file_axis, layer_axis in enumerate(order):
            shape[layer_axis] = self.file_shape[file_axis]
        return tuple(shape)

    def to_layer(self, file_array: np.ndarray) -> np.ndarray:
        """File-order array -> layer-order view (no copy)."""
        if tuple(file_array.shape[:3]) != self.file_shape:
            raise GeometryMismatchError(
                f"array shape {file_array.shape} does not match the scan grid {self.file_shape}"
            )
        return _orientations().apply_orientation(file_array, self.to_layer_ornt)

    def to_file(self, layer_array: np.ndarray) -> np.ndarray:
        """Layer-order array -> file-order view (no copy)."""
        if tuple(layer_array.shape[:3]) != self.layer_shape:
            raise GeometryMismatchError(
                f"mask shape {tuple(layer_array.shape)} does not match the scan's "
                f"shape {self.layer_shape}"
            )
        return _orientations().apply_orientation(layer_array, self.to_file_ornt)

    def layer_to_file_index(self, layer_index) -> tuple:
        """The file's voxel index ``(i, j, k)`` of a layer voxel index (what other viewers show)."""
        index = [0, 0, 0]
        for file_axis, (layer_axis, flip) in enumerate(self.to_layer_ornt.astype(int)):
            value = int(layer_index[layer_axis])
            index[file_axis] = self.file_shape[file_axis] - 1 - value if flip < 0 else value
        return tuple(index)

    # -- derived geometry ---------------------------------------------------
    @property
    def layer_affine_ras(self) -> np.ndarray:
        return self.affine_ras @ _orientations().inv_ornt_aff(self.to_layer_ornt, self.file_shape)

    @property
    def world_affine(self) -> np.ndarray:
        """Layer index -> napari world (LPS mm, z/y/x order); napari's ``affine``."""
        return RAS_TO_WORLD @ self.layer_affine_ras

    @property
    def spacing(self) -> tuple:
        """Voxel size in mm along the file's i, j, k axes."""
        return voxel_spacing(self.affine_ras)

    @property
    def layer_spacing(self) -> tuple:
        """Voxel size in mm along the layer axes (S, P, L)."""
        return voxel_spacing(self.layer_affine_ras)

    @property
    def orientation_code(self) -> str:
        """RAS+ axis codes of the file axes, e.g. ``'LAS'`` (nibabel's aff2axcodes)."""
        return "".join(_orientations().aff2axcodes(self.affine_ras))

    @property
    def is_oblique(self) -> bool:
        cosines = self.affine_ras[:3, :3] / np.linalg.norm(self.affine_ras[:3, :3], axis=0)
        return bool(np.abs(np.abs(cosines).max(axis=0) - 1).max() > 1e-4)

    def world_bounds_lps(self) -> np.ndarray:
        """(3, 2) array of min/max LPS x, y, z over the voxel centres."""
        corners = np.array(
            [[i, j, k] for i in (0, self.file_shape[0] - 1)
             for j in (0, self.file_shape[1] - 1) for k in (0, self.file_shape[2] - 1)],
            dtype=float,
        )
        lps = RAS_TO_LPS @ self.affine_ras
        points = corners @ lps[:3, :3].T + lps[:3, 3]
        return np.stack([points.min(axis=0), points.max(axis=0)], axis=1)

    # -- serialisation into napari metadata ----------------------------------
    def to_dict(self) -> dict:
        return {
            "affine_ras": self.affine_ras.tolist(),
            "file_shape": list(self.file_shape),
            "source_format": self.source_format,
            "nifti_header": base64.b64encode(self.nifti_header).decode() if self.nifti_header else None,
            "itk": self.itk,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ScanGeometry":
        header = d.get("nifti_header")
        return cls(
            affine_ras=np.asarray(d["affine_ras"], dtype=float),
            file_shape=tuple(d["file_shape"]),
            source_format=d.get("source_format", "nifti"),
            nifti_header=base64.b64decode(header) if header else None,
            itk=d.get("itk"),
            extra=dict(d.get("extra") or {}),
        )

    @classmethod
    def from_world_affine(cls, world_affine: np.ndarray, layer_shape: tuple) -> "ScanGeometry":
        """A geometry for a layer that only has napari's affine (e.g. a new Labels layer)."""
        layer_affine_ras = np.linalg.inv(RAS_TO_WORLD) @ np.asarray(world_affine, dtype=float)
        # The layer grid itself becomes the file grid.
        return cls(affine_ras=layer_affine_ras, file_shape=tuple(layer_shape), source_format="napari")
