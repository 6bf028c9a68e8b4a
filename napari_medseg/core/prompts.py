"""Correction by prompts: clicks, strokes and a box become a 3D mask of one label.

No weights are needed. Each prompt re-decides a region around it by geodesic distance
(``scipy.sparse.csgraph.dijkstra`` on the voxel graph, edges costing their length in mm
times the intensity step): every voxel takes the side of the nearest seed. The seeds are
all prompts so far, and the region's border, which keeps the current mask's values. Of
what changes, only the part connected to the new prompt is kept, so correct edges
elsewhere stay as they are. Where that part reaches the region's border, the region
doubles and the prompt is decided again (the region grows with the error, as
nnInteractive's AutoZoom does). Other labels are barriers and never change, and nothing
outside the region changes.

A large region is decided on a coarser grid first; then only a band around the coarse
outline is decided again at full resolution, so a 256³ region costs about one 64³ one.

Arrays are indexed in any fixed axis order; ``spacing`` is the voxel size in mm in the
same order. :class:`PromptSession` keeps the state, so each click costs only its own
update, and every prompt can be undone on its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .errors import MedsegError
from .progress import Progress, report

# Half-size of the first region around a prompt, and the most it may grow to (mm).
START_HALF_MM = 16.0
MAX_HALF_MM = 128.0
# A region with more voxels than this is decided on a coarser grid first.
FULL_RESOLUTION_VOXELS = 72 ** 3
# An edge costs its length times (EPSILON + (intensity step / typical step)²).
EPSILON = 0.05


@dataclass
class Point:
    """A click at a voxel index (may be fractional), for the label or against it."""

    index: tuple
    positive: bool = True


@dataclass
class Update:
    """What one prompt did."""

    seconds: float
    changed_voxels: int
    region: tuple          # slices of the region decided last
    grew: int = 0          # how often the region doubled


@dataclass
class _Prompt:
    kind: str                       # "point", "strokes" or "box"
    foreground: np.ndarray          # (n, 3) voxel indices
    background: np.ndarray
    anchor: np.ndarray              # voxels the kept change must touch
    lo: np.ndarray                  # bounding box of the prompt (voxel indices)
    hi: np.ndarray


@dataclass
class _Step:
    region: tuple
    before: np.ndarray              # the labels of the region before this prompt


def _empty() -> np.ndarray:
    return np.zeros((0, 3), dtype=np.int64)


class PromptSession:
    """Prompts on one scan for one label, applied one at a time.

    ``image`` is the scan, ``mask`` the labels before the prompts (``None``: nothing yet),
    ``label`` the value the prompts decide. :attr:`labels` is the current result.
    """

    def __init__(self, image: np.ndarray, spacing: tuple, mask: np.ndarray | None = None, label: int = 1,
                 start_half_mm: float = START_HALF_MM, max_half_mm: float = MAX_HALF_MM,
                 other_labels_fixed: bool = True):
        image = np.asarray(image)
        if image.ndim != 3:
            raise MedsegError(f"prompts need a 3D scan, got {image.ndim} dimensions")
        if mask is not None and tuple(np.shape(mask)) != image.shape:
            raise MedsegError(f"the mask has shape {tuple(np.shape(mask))}, but the scan has {image.shape}")
        if int(label) < 1:
            raise MedsegError(f"the label to refine must be 1 or more, got {label}")
        self.image = image.astype(np.float32, copy=False)
        self.spacing = tuple(float(s) for s in spacing)
        self.label = int(label)
        self.labels = (np.zeros(image.shape, np.uint16) if mask is None
                       else np.asarray(mask).astype(np.uint16, copy=True))
        self.start_half_mm = float(start_half_mm)
        self.max_half_mm = float(max_half_mm)
        self.other_labels_fixed = bool(other_labels_fixed)
        self._prompts: list[_Prompt] = []
        self._steps: list[_Step] = []

    # -- prompts ---------------------------------------------------------------
    def add_point(self, index, positive: bool = True, progress: Progress | None = None) -> Update:
        voxel = self._voxel(index)
        seed = voxel[None, :]
        prompt = _Prompt("point", seed if positive else _empty(), _empty() if positive else seed,
                         seed, voxel, voxel)
        return self._apply(prompt, progress)

    def add_strokes(self, strokes: np.ndarray, progress: Progress | None = None) -> Update:
        """Painted strokes on the scan's grid: 1 is "this label", 2 is "not this label"."""
        strokes = np.asarray(strokes)
        if strokes.shape != self.image.shape:
            raise MedsegError(f"the strokes have shape {strokes.shape}, but the scan has {self.image.shape}")
        foreground, background = np.argwhere(strokes == 1), np.argwhere(strokes == 2)
        if not len(foreground) and not len(background):
            raise MedsegError("the strokes hold no voxel of 1 (this label) or 2 (not this label)")
        both = np.concatenate([foreground, background])
        return self._apply(_Prompt("strokes", foreground, background, both, both.min(0), both.max(0)), progress)

    def add_box(self, lo, hi, progress: Progress | None = None) -> Update:
        """A box around the target: its centre is the label, its outside is not."""
        lo, hi = self._voxel(lo), self._voxel(hi)
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
        centre = ((lo + hi) // 2)[None, :]
        shell = _box_shell(lo, hi, self.image.shape)
        return self._apply(_Prompt("box", centre, shell, centre, lo, hi), progress)

    def undo(self) -> tuple | None:
        """Take back the last prompt: the region it had changed, or ``None`` when there is none."""
        if not self._steps:
            return None
        step = self._steps.pop()
        self._prompts.pop()
        self.labels[step.region] = step.before
        return step.region

    @property
    def prompt_count(self) -> int:
        return len(self._prompts)

    def record(self) -> dict:
        """The prompts so far, in voxel indices of the scan's grid (nothing that identifies
        the patient): ``{"label", "points": [{"index", "positive"}], "boxes": [{"index_min",
        "index_max"}], "strokes": uint8 volume (1 this label, 2 not) or None}``."""
        points, boxes, strokes = [], [], None
        for prompt in self._prompts:
            if prompt.kind == "point":
                points.append({"index": prompt.anchor[0].tolist(), "positive": bool(len(prompt.foreground))})
            elif prompt.kind == "box":
                boxes.append({"index_min": prompt.lo.tolist(), "index_max": prompt.hi.tolist()})
            else:
                strokes = np.zeros(self.image.shape, np.uint8) if strokes is None else strokes
                strokes[tuple(prompt.background.T)] = 2
                strokes[tuple(prompt.foreground.T)] = 1
        return {"label": self.label, "points": points, "boxes": boxes, "strokes": strokes}

    # -- the update ------------------------------------------------------------
    def _voxel(self, index) -> np.ndarray:
        index = np.asarray(index, dtype=float).reshape(-1)
        if index.shape != (3,) or not np.all(np.isfinite(index)):
            raise MedsegError(f"a prompt needs three finite coordinates, got {index.tolist()}")
        voxel = np.round(index).astype(np.int64)
        if np.any(voxel < 0) or np.any(voxel >= self.image.shape):
            raise MedsegError(f"the prompt at voxel {voxel.tolist()} lies outside the scan "
                              f"(shape {list(self.image.shape)})")
        return voxel

    def _apply(self, prompt: _Prompt, progress: Progress | None) -> Update:
        began = time.perf_counter()
        self._prompts.append(prompt)
        half = self.start_half_mm
        if prompt.kind == "box":  # the box itself, with a margin
            extent = (prompt.hi - prompt.lo + 1) * np.asarray(self.spacing)
            half = max(half, float(extent.max()) * 0.6)
        grew = 0
        while True:
            region = self._region(prompt, half)
            report(progress, min(0.9, 0.2 * (grew + 1)), f"deciding a region of {_size(region)} voxels")
            keep, foreground = self._decide(region, prompt)
            if not (_touches_border(keep, region, self.image.shape) and half * 2 <= self.max_half_mm):
                break
            half *= 2
            grew += 1
        before = self.labels[region].copy()
        view = self.labels[region]
        view[keep & foreground] = self.label
        view[keep & ~foreground & (view == self.label)] = 0
        changed = int(np.count_nonzero(before != view))
        self._steps.append(_Step(region, before))
        report(progress, 1.0, f"{changed} voxels changed")
        return Update(time.perf_counter() - began, changed, region, grew)

    def _region(self, prompt: _Prompt, half_mm: float) -> tuple:
        half = np.ceil(half_mm / np.asarray(self.spacing)).astype(np.int64)
        lo = np.maximum(prompt.lo - half, 0)
        hi = np.minimum(prompt.hi + half + 1, self.image.shape)
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

    def _decide(self, region: tuple, prompt: _Prompt) -> tuple:
        """(voxels whose change is kept, the decided label) inside ``region``."""
        from scipy import ndimage

        labels = self.labels[region]
        current = labels == self.label
        barrier = ((labels != 0) & ~current) if self.other_labels_fixed else np.zeros(labels.shape, bool)
        seeds = np.zeros(labels.shape, np.int8)   # 1: label, 2: not the label
        border = region_border(labels.shape)
        seeds[border] = np.where(current[border], 1, 2)
        origin = np.array([s.start for s in region])
        if prompt.kind == "point":
            self._soft_seeds(seeds, current, barrier, prompt, origin, self.image[region], border)
        for earlier in self._prompts:  # prompts win over the mask; the newest goes last and wins ties
            for points, value in ((earlier.background, 2), (earlier.foreground, 1)):
                inside = points - origin
                inside = inside[np.all((inside >= 0) & (inside < labels.shape), axis=1)]
                seeds[tuple(inside.T)] = value
        seeds[barrier] = 0
        foreground = _geodesic_decision(self.image[region], self.spacing, seeds, barrier)
        change = (foreground != current) & ~barrier
        parts, _count = ndimage.label(change)
        anchor = prompt.anchor - origin
        anchor = anchor[np.all((anchor >= 0) & (anchor < labels.shape), axis=1)]
        touched = np.unique(parts[tuple(anchor.T)])
        touched = touched[touched > 0]
        return np.isin(parts, touched), foreground


    def _soft_seeds(self, seeds: np.ndarray, current: np.ndarray, barrier: np.ndarray, prompt: _Prompt,
                    origin: np.ndarray, image: np.ndarray, border: np.ndarray) -> None:
        """The current mask as seeds, freed around a click.

        The side the click agrees with keeps all its voxels as seeds. The other side keeps
        only those farther from the click than three times the click's distance to the agreeing
        side: the error the click points at is freed, the rest stays as it was. Where the
        click is negative and its intensity stands out from the label's, the part of the label
        that looks like the click (nearer the click's intensity than the label's median) and is
        connected to it is freed too: a leak along a bar of background is freed along it.
        The region's border seeds are freed there as well, so the change can reach the
        border and the region grows.
        """
        from scipy import ndimage

        positive = len(prompt.foreground) > 0
        agreeing = current if positive else ~current & ~barrier
        other = ~agreeing & ~barrier
        click = tuple(prompt.anchor[0] - origin)
        if not agreeing.any():
            return
        distance = ndimage.distance_transform_edt(~agreeing, sampling=self.spacing)[click]
        grid = np.ogrid[tuple(slice(0, n) for n in current.shape)]
        from_click = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, click, self.spacing))
        free = from_click <= (3.0 * distance + 2.0 * max(self.spacing)) ** 2
        if not positive and other[click]:
            # Only against a leak: for a positive click the background that looks like the
            # click is often tissue the label must not flood (measured on a brain's rim).
            smooth = _smoothed(image, self.spacing)
            at_click = float(smooth[click])
            # the label as a whole: a leak's region may hold more of the leak than of the label
            step = max(1, int(round((self.labels.size / 64 ** 3) ** (1 / 3))))
            sample = self.labels[::step, ::step, ::step] == self.label
            typical = float(np.median(self.image[::step, ::step, ::step][sample]))
            if abs(at_click - typical) > 3.0 * _contrast(smooth):
                alike, _count = ndimage.label(other & (np.abs(smooth - at_click) < np.abs(smooth - typical)))
                if alike[click]:
                    free |= alike == alike[click]
        seeds[border & free & other] = 0
        keep = seeds == 0
        seeds[agreeing & keep] = 1 if positive else 2
        seeds[other & ~free & keep] = 2 if positive else 1
        seeds[click] = 1 if positive else 2


def refine(image: np.ndarray, spacing: tuple, points: list, mask: np.ndarray | None = None, label: int = 1,
           strokes: np.ndarray | None = None, box: tuple | None = None, other_labels_fixed: bool = True,
           progress: Progress | None = None) -> tuple:
    """All prompts at once, in order (points, then strokes, then the box): ``(labels, updates)``.

    The same as adding them one at a time to a :class:`PromptSession`.
    """
    if not points and strokes is None and box is None:
        raise MedsegError("no prompts: give at least one point")
    session = PromptSession(image, spacing, mask, label, other_labels_fixed=other_labels_fixed)
    updates = []
    total = len(points) + (strokes is not None) + (box is not None)
    for n, point in enumerate(points):
        report(progress, n / total, f"prompt {n + 1} of {total}")
        updates.append(session.add_point(point.index, point.positive))
    if strokes is not None:
        updates.append(session.add_strokes(strokes))
    if box is not None:
        updates.append(session.add_box(*box))
    report(progress, 1.0, f"{total} prompts applied")
    return session.labels, updates


# -- geodesic decision ------------------------------------------------------------
def _contrast(image: np.ndarray) -> float:
    """The intensity step that costs one unit: the typical step between neighbours (mostly
    noise), floored at 1% of the region's spread so that flat regions stay connected."""
    stride = max(1, int(round((image.size / 64 ** 3) ** (1 / 3))))  # a sample is enough
    steps = []
    for axis in range(3):
        lo, hi = [slice(None, None, stride)] * 3, [slice(None, None, stride)] * 3
        lo[axis] = slice(0, image.shape[axis] - 1, stride)
        hi[axis] = slice(1, image.shape[axis], stride)
        steps.append(np.abs(image[tuple(hi)] - image[tuple(lo)]).reshape(-1))
    sample = image[::stride, ::stride, ::stride]
    typical = float(np.median(np.concatenate(steps)))
    spread = float(np.percentile(sample, 95) - np.percentile(sample, 5))
    return max(typical, spread * 0.01, 1e-6)


def _geodesic_decision(image: np.ndarray, spacing: tuple, seeds: np.ndarray, barrier: np.ndarray) -> np.ndarray:
    """The side of the nearest seed for every voxel (``True``: the label)."""
    if image.size <= FULL_RESOLUTION_VOXELS:
        smooth = _smoothed(image, spacing)
        return _nearest_seed(smooth, spacing, seeds, barrier, _contrast(smooth))
    from scipy import ndimage

    factor = int(np.ceil((image.size / FULL_RESOLUTION_VOXELS) ** (1 / 3)))
    coarse_spacing = tuple(s * factor for s in spacing)
    coarse_image = _smoothed(_block_mean(image, factor), coarse_spacing)
    coarse = _nearest_seed(coarse_image, coarse_spacing, _block_seeds(seeds, factor), _block_all(barrier, factor),
                           _contrast(coarse_image))
    decided = _upsample(coarse, factor, image.shape)
    # Decide again at full resolution in a band around the coarse outline: the band's
    # neighbours keep the coarse decision as seeds, everything further away is fixed.
    # (The band is found on the coarse grid: morphology at full resolution costs more.)
    coarse_edge = coarse ^ ndimage.binary_erosion(coarse, border_value=1)
    band = _upsample(ndimage.binary_dilation(coarse_edge), factor, image.shape) & ~barrier
    if not band.any():
        return decided
    found = np.argwhere(band)
    box = tuple(slice(max(int(a) - 1, 0), int(b) + 2) for a, b in zip(found.min(0), found.max(0)))
    band_box, decided_box = band[box], decided[box]
    ring = ndimage.binary_dilation(band_box) & ~band_box
    seeds_box = np.zeros(band_box.shape, np.int8)
    seeds_box[ring] = np.where(decided_box[ring], 1, 2)
    seeds_box[band_box] = seeds[box][band_box]
    smooth = _smoothed(image[box], spacing)
    fine = _nearest_seed(smooth, spacing, seeds_box, ~(band_box | ring), _contrast(smooth))
    decided_box[band_box] = fine[band_box]
    return decided


def _nearest_seed(image: np.ndarray, spacing: tuple, seeds: np.ndarray, barrier: np.ndarray,
                  contrast: float) -> np.ndarray:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import dijkstra

    shape = image.shape
    decided = np.zeros(shape, bool)
    voxels = np.flatnonzero(~barrier.reshape(-1))   # the graph's nodes, as flat indices
    n = len(voxels)
    if not n:
        return decided
    node = np.full(image.size, -1, dtype=np.int64)
    node[voxels] = np.arange(n)
    flat_image = image.reshape(-1)
    coordinates = np.unravel_index(voxels, shape)
    strides = (shape[1] * shape[2], shape[2], 1)
    rows, cols, weights = [], [], []
    for axis in range(3):
        inside = coordinates[axis] < shape[axis] - 1
        here = voxels[inside]
        there = node[here + strides[axis]]
        linked = there >= 0
        here, there = here[linked], there[linked]
        step = (flat_image[here + strides[axis]] - flat_image[here]) / contrast
        rows.append(node[here])
        cols.append(there)
        weights.append(spacing[axis] * (EPSILON + step * step))
    graph = csr_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    flat_seeds = seeds.reshape(-1)[voxels]
    sources = np.flatnonzero(flat_seeds)
    if not len(sources):
        return decided
    _dist, _pred, nearest = dijkstra(graph, directed=False, indices=sources, min_only=True,
                                     return_predecessors=True)
    reached = nearest >= 0
    side = np.zeros(n, bool)
    side[reached] = flat_seeds[nearest[reached]] == 1
    decided.reshape(-1)[voxels] = side
    return decided


def _smoothed(image: np.ndarray, spacing: tuple) -> np.ndarray:
    """Gaussian smoothing over about 1 mm (at least half a voxel), so that noise does not
    add up along a path while edges stay."""
    from scipy import ndimage

    sigma = [max(0.5, 1.0 / s) if s < 2.0 else 0.5 for s in spacing]
    return ndimage.gaussian_filter(image, sigma, mode="nearest", truncate=2.5)


# -- grids ------------------------------------------------------------------------
def region_border(shape: tuple) -> np.ndarray:
    """The voxels on the faces of a box of ``shape``."""
    border = np.zeros(shape, bool)
    for axis in range(3):
        index = [slice(None)] * 3
        index[axis] = 0
        border[tuple(index)] = True
        index[axis] = -1
        border[tuple(index)] = True
    return border


def _touches_border(keep: np.ndarray, region: tuple, shape: tuple) -> bool:
    """Whether the kept change reaches a face of the region that is not the scan's edge
    (the face itself holds seeds, so the layer inside it counts)."""
    for axis, part in enumerate(region):
        size = keep.shape[axis]
        inner = (0, 1) if size > 2 else (0,)
        if part.start > 0 and any(np.take(keep, k, axis=axis).any() for k in inner):
            return True
        if part.stop < shape[axis] and any(np.take(keep, size - 1 - k, axis=axis).any() for k in inner):
            return True
    return False


def _box_shell(lo: np.ndarray, hi: np.ndarray, shape: tuple) -> np.ndarray:
    """The voxels just outside the box (inside the scan)."""
    outer_lo = np.maximum(lo - 1, 0)
    outer_hi = np.minimum(hi + 1, np.asarray(shape) - 1)
    box = np.zeros(tuple(outer_hi - outer_lo + 1), bool)
    box[...] = True
    inner = tuple(slice(int(a - o), int(b - o + 1)) for a, b, o in zip(lo, hi, outer_lo))
    box[inner] = False
    return np.argwhere(box) + outer_lo


def _size(region: tuple) -> str:
    return " x ".join(str(s.stop - s.start) for s in region)


def _padded(array: np.ndarray, factor: int, value) -> np.ndarray:
    pad = [(0, (-n) % factor) for n in array.shape]
    return np.pad(array, pad, mode="edge") if value is None else np.pad(array, pad, constant_values=value)


def _blocks(array: np.ndarray, factor: int) -> np.ndarray:
    s = array.shape
    return array.reshape(s[0] // factor, factor, s[1] // factor, factor, s[2] // factor, factor)


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    return _blocks(_padded(image, factor, None), factor).mean(axis=(1, 3, 5), dtype=np.float32)


def _block_all(mask: np.ndarray, factor: int) -> np.ndarray:
    return _blocks(_padded(mask, factor, True), factor).all(axis=(1, 3, 5))


def _block_seeds(seeds: np.ndarray, factor: int) -> np.ndarray:
    """A coarse voxel is a seed of the label or not where any of its voxels is (the
    label's seeds win, so a click is never lost)."""
    blocks = _blocks(_padded(seeds, factor, 0), factor)
    coarse = np.where((blocks == 2).any(axis=(1, 3, 5)), 2, 0).astype(np.int8)
    coarse[(blocks == 1).any(axis=(1, 3, 5))] = 1
    return coarse


def _upsample(coarse: np.ndarray, factor: int, shape: tuple) -> np.ndarray:
    full = coarse.repeat(factor, 0).repeat(factor, 1).repeat(factor, 2)
    return np.ascontiguousarray(full[:shape[0], :shape[1], :shape[2]])


@dataclass
class ParsedPrompts:
    """A prompts file, in voxel indices of the scan's grid."""

    points: list = field(default_factory=list)
    strokes: np.ndarray | None = None
    box: tuple | None = None


def read_prompts(path, scan_geometry) -> ParsedPrompts:
    """``PROMPTS.json`` (points in RAS mm, an optional strokes volume and box) on the grid
    of the scan whose layer order ``scan_geometry`` (a ``ScanGeometry``) gives."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        text = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MedsegError(f"cannot read the prompts '{path.name}': {exc.strerror or exc}") from None
    except ValueError as exc:
        raise MedsegError(f"the prompts '{path.name}' are not valid JSON: {exc}") from None
    if not isinstance(text, dict):
        raise MedsegError(f"the prompts '{path.name}' must be a JSON object with \"points\"")
    points = text.get("points")
    if not isinstance(points, list) or not points:
        raise MedsegError(f"the prompts '{path.name}' hold no points: \"points\" must list at least one "
                          f"{{\"ras\": [x, y, z], \"positive\": true}}")
    to_voxel = np.linalg.inv(scan_geometry.layer_affine_ras)
    shape = scan_geometry.layer_shape

    def voxel_of(ras, what: str) -> np.ndarray:
        try:
            ras = np.asarray(ras, dtype=float).reshape(3)
        except (TypeError, ValueError):
            raise MedsegError(f"{what} in '{path.name}' needs three numbers in RAS mm, got {ras!r}") from None
        index = (to_voxel @ np.r_[ras, 1.0])[:3]
        if np.any(np.round(index) < 0) or np.any(np.round(index) >= shape) or not np.all(np.isfinite(index)):
            raise MedsegError(f"{what} at RAS {ras.round(2).tolist()} mm lies outside the scan")
        return index

    parsed = ParsedPrompts()
    for n, point in enumerate(points):
        if not isinstance(point, dict) or "ras" not in point:
            raise MedsegError(f"point {n + 1} in '{path.name}' needs \"ras\": [x, y, z]")
        parsed.points.append(Point(tuple(voxel_of(point["ras"], f"point {n + 1}")),
                                   bool(point.get("positive", True))))
    if text.get("box") is not None:
        box = text["box"]
        if not isinstance(box, dict) or "ras_min" not in box or "ras_max" not in box:
            raise MedsegError(f"the box in '{path.name}' needs \"ras_min\" and \"ras_max\"")
        parsed.box = (voxel_of(box["ras_min"], "the box's ras_min"), voxel_of(box["ras_max"], "the box's ras_max"))
    if text.get("scribbles"):
        from .io import read_volume

        strokes_path = Path(text["scribbles"])
        if not strokes_path.is_absolute():
            strokes_path = path.parent / strokes_path
        strokes = read_volume(strokes_path)
        if tuple(strokes.geometry.file_shape) != tuple(scan_geometry.file_shape):
            raise MedsegError(f"the scribbles '{strokes_path.name}' have shape {tuple(strokes.geometry.file_shape)}, "
                              f"but the scan has {tuple(scan_geometry.file_shape)}")
        if not np.allclose(strokes.geometry.affine_ras, scan_geometry.affine_ras, atol=1e-3):
            raise MedsegError(f"the scribbles '{strokes_path.name}' are not on the scan's grid (their affine differs)")
        parsed.strokes = scan_geometry.to_layer(np.rint(strokes.data).astype(np.int8))
    return parsed
