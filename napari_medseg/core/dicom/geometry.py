"""Where every pixel of a stack lies, and the regular grid it is put on.

The judge is PS3.3 C.7.6.2.1.1: pixel (column ``i``, row ``j``) of a slice lies at

    ImagePositionPatient + i * column spacing * row direction + j * row spacing * column direction.

When the slice origins advance along the slice normal in equal steps, the slices are
stacked as they are: no resampling. Otherwise the stack is resampled onto a regular
grid with the slices' own row and column directions and the normal as the third axis
(the method of dcm2niix and of 3D Slicer's acquisition-geometry regularisation):

* **shear** (gantry tilt, or any in-plane drift of the slice origins): each slice is
  shifted within its own plane by linear interpolation, so every pixel lands where its
  header puts it; the grid grows to hold every slice;
* **uneven gaps**: planes every smallest gap along the normal, each linearly
  interpolated between the two slices around it;
* **missing slices** (gaps that are whole multiples of the regular spacing): the
  same, and the user is told how many slices were missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .discovery import Instance

SHEAR_TOLERANCE = 0.01      # in-plane drift below 1 % of a pixel is no shear
GAP_TOLERANCE = 0.01        # gaps within 1 % of each other are equal
MULTIPLE_TOLERANCE = 0.05   # a gap within 5 % of a whole multiple of the spacing is a missing run


@dataclass
class GridPlan:
    """A stack's slices sorted along the normal, and the grid they go onto."""

    instances: list                       # sorted by position along the normal
    affine_lps: np.ndarray                # file index (column i, row j, plane k) -> LPS mm
    shape: tuple                          # (columns, rows, planes)
    exact: bool                           # True: plane k is slice k, untouched
    # For each plane: [(slice index, weight, (row offset, column offset))] to interpolate from.
    sources: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple:
        return tuple(float(s) for s in np.linalg.norm(self.affine_lps[:3, :3], axis=0))


def pixel_position(instance: Instance, column: float, row: float) -> np.ndarray:
    """The patient position (LPS mm) of a pixel, by PS3.3 C.7.6.2.1.1."""
    row_direction = np.asarray(instance.orientation[:3], float)
    column_direction = np.asarray(instance.orientation[3:6], float)
    row_spacing, column_spacing = instance.pixel_spacing
    return (np.asarray(instance.position, float) + column * column_spacing * row_direction
            + row * row_spacing * column_direction)


def plan_grid(instances: list, name: str = "the series") -> GridPlan:
    """Sort a stack's slices and plan the grid (see the module docstring)."""
    from ..errors import NotAVolumeError

    missing = [i.path.name for i in instances if i.position is None or i.orientation is None
               or i.pixel_spacing is None]
    if missing:
        raise NotAVolumeError(f"{name}: '{missing[0]}' has no ImagePositionPatient, ImageOrientationPatient or "
                              "PixelSpacing, so its slices cannot be placed in patient space")
    first = instances[0]
    row_direction = np.asarray(first.orientation[:3], float)
    column_direction = np.asarray(first.orientation[3:6], float)
    row_direction /= np.linalg.norm(row_direction)
    column_direction /= np.linalg.norm(column_direction)
    normal = np.cross(row_direction, column_direction)
    normal /= np.linalg.norm(normal)
    row_spacing, column_spacing = (float(s) for s in first.pixel_spacing)
    positions = np.array([i.position for i in instances], float)
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    instances = [instances[k] for k in order]
    positions, distance = positions[order], distance[order]
    if len(instances) < 2:
        raise NotAVolumeError(f"{name} has a single slice: it is a 2D image, not a volume")
    rows, columns = first.rows, first.columns
    offsets = positions - positions[0]
    u = offsets @ row_direction                 # in-plane drift along the rows (mm)
    v = offsets @ column_direction              # ... and along the columns
    gaps = np.diff(distance)
    if np.any(gaps <= 1e-6):
        raise NotAVolumeError(f"{name}: two slices lie at the same position with different pixels")
    sheared = bool(np.max(np.abs(u)) > SHEAR_TOLERANCE * column_spacing
                   or np.max(np.abs(v)) > SHEAR_TOLERANCE * row_spacing)
    smallest, median = float(gaps.min()), float(np.median(gaps))
    uniform = bool(np.max(np.abs(gaps - median)) <= GAP_TOLERANCE * median)
    warnings: list = []
    info = {"slices": len(instances)}
    if uniform:
        spacing = float(np.mean(gaps))
    else:
        spacing = smallest
        multiples = gaps / smallest
        if np.all(np.abs(multiples - np.round(multiples)) <= MULTIPLE_TOLERANCE):
            count = int(np.sum(np.round(multiples) - 1))
            widest = float(gaps.max())
            warnings.append(f"{count} slice{'s are' if count > 1 else ' is'} missing (a gap of up to "
                            f"{widest:.2f} mm where slices are {smallest:.2f} mm apart); the missing "
                            "planes were interpolated from their neighbours")
            info["missing_slices"] = count
        else:
            values = sorted({round(float(g), 2) for g in gaps})
            shown = ", ".join(f"{g:g}" for g in values[:4]) + (", ..." if len(values) > 4 else "")
            warnings.append(f"the slices are unevenly spaced ({shown} mm apart); the volume was resampled "
                            f"every {smallest:.3g} mm along the slice normal")
            info["uneven_gaps_mm"] = values
    if sheared:
        drift = math.hypot(*np.polyfit(distance - distance[0], np.stack([u, v], 1), 1)[0])
        angle = math.degrees(math.atan(drift))
        warnings.append(f"the slices are sheared (gantry tilt of {angle:.1f} degrees); each slice was shifted "
                        "within its plane onto a regular grid, so every pixel lies where its header places it")
        info["tilt_degrees"] = round(angle, 2)
    if uniform and not sheared:
        affine = np.eye(4)
        affine[:3, 0] = row_direction * column_spacing
        affine[:3, 1] = column_direction * row_spacing
        affine[:3, 2] = normal * spacing
        affine[:3, 3] = positions[0]
        sources = [[(k, 1.0, (0.0, 0.0))] for k in range(len(instances))]
        return GridPlan(instances, affine, (columns, rows, len(instances)), True, sources, warnings, info)
    # A regular grid aligned with the first slice's pixels, large enough for every slice.
    low_i = math.floor(min(0.0, float(np.min(u / column_spacing))) + 1e-6)
    low_j = math.floor(min(0.0, float(np.min(v / row_spacing))) + 1e-6)
    high_i = math.ceil(max(0.0, float(np.max(u / column_spacing))) - 1e-6) + columns
    high_j = math.ceil(max(0.0, float(np.max(v / row_spacing))) - 1e-6) + rows
    planes = int(round((distance[-1] - distance[0]) / spacing)) + 1
    affine = np.eye(4)
    affine[:3, 0] = row_direction * column_spacing
    affine[:3, 1] = column_direction * row_spacing
    affine[:3, 2] = normal * spacing
    affine[:3, 3] = positions[0] + low_i * column_spacing * row_direction + low_j * row_spacing * column_direction
    sources = []
    relative = distance - distance[0]
    for plane in range(planes):
        depth = plane * spacing
        above = int(np.searchsorted(relative, depth - 1e-6 * spacing))
        above = min(above, len(instances) - 1)
        if abs(relative[above] - depth) <= 1e-3 * spacing or above == 0:
            picks = [(above, 1.0)]
        else:
            below = above - 1
            weight = (depth - relative[below]) / (relative[above] - relative[below])
            picks = [(below, 1.0 - weight), (above, weight)]
        sources.append([(k, w, (low_j - v[k] / row_spacing, low_i - u[k] / column_spacing)) for k, w in picks])
    return GridPlan(instances, affine, (high_i - low_i, high_j - low_j, planes), False, sources, warnings, info)


def assemble(plan: GridPlan, slices: list, fill: float) -> np.ndarray:
    """The grid's voxels in file order ``(columns, rows, planes)`` from the slices ``(rows, columns)``.

    An exact plan stacks the slices as they are; otherwise each plane is interpolated
    (linear in-plane shift, linear blend along the normal), with ``fill`` outside every slice.
    """
    from scipy import ndimage

    columns, rows, planes = plan.shape
    if plan.exact:
        return np.stack(slices).transpose(2, 1, 0)
    out = np.empty((planes, rows, columns), dtype=np.float32)
    for plane, picks in enumerate(plan.sources):
        total = np.zeros((rows, columns), dtype=np.float32)
        for index, weight, (row_offset, column_offset) in picks:
            if weight == 0:
                continue
            source = np.asarray(slices[index], dtype=np.float32)
            shifted = ndimage.affine_transform(source, np.eye(2), offset=(row_offset, column_offset),
                                               output_shape=(rows, columns), order=1, mode="grid-constant",
                                               cval=fill, prefilter=False)
            total += weight * shifted
        out[plane] = total
    return out.transpose(2, 1, 0)
