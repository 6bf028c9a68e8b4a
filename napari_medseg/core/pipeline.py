"""One prediction pipeline for every model, read from its card (see :mod:`.card`).

``prepare`` brings a scan onto the network's grid, and ``to_scan`` / ``labels_to_scan``
bring any map back. ``predict``, the Segment widget, explanation maps and fine-tuning
all go through these functions, so a change of pipeline changes one place.

The steps, each declared in ``card.pipeline``:

1. **Axis order.** The scan arrives in napari layer order (S, P, L). A model made
   for RAS voxel order (nibabel's ``as_closest_canonical``) gets the same voxels
   transposed and flipped: a view, never a resample.
2. **Region of interest.** ``none``: the whole field of view. ``body``: the imaged
   body's extent (an Otsu threshold, the largest part) plus a margin, so that air
   padding, a neck or a second object do not change what the network sees.
   ``network``: the body region first, then a first-stage network finds the target's
   box at a coarse grid, plus a margin (deepbet's two stages).
3. **Grid.** A voxel size, or a fixed shape over the region. ``area`` interpolation
   averages blocks before it shrinks (no aliasing of thin bright structures) and is
   linear when it enlarges; ``nearest`` is what deepbet's own code does.
4. **Normalisation,** with statistics from the region (never the whole field of view,
   unless the card says ``field_of_view`` to reproduce a published tool exactly).
5. The network runs on the grid (:mod:`.inference`); its maps come back onto the
   scan's grid by linear interpolation (nearest for ``nearest`` grids), inside the
   region; outside it, every map takes its background value.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from .card import AXIS_PAIRS, ModelCard, Normalisation
from .errors import MedsegError
from .geometry import voxel_spacing as layer_spacing
from .sampling import strided_sample, subsample_step

# Resample only when the scan's voxel size differs from the model's by more than this.
SPACING_TOLERANCE = 0.01
# Body detection runs on a copy with about this many voxels (fast, and the box is coarse anyway).
BODY_VOXELS = 2_000_000


# -- axis order --------------------------------------------------------------------

LAYER_ORDER = "SPL"


def _axes(axis_order: str) -> tuple[tuple, tuple]:
    """For each working axis, the layer axis it comes from and whether it runs the other way."""
    source = tuple(next(i for i, pair in enumerate(AXIS_PAIRS) if c in pair) for c in axis_order)
    reversed_ = tuple(c != LAYER_ORDER[i] for c, i in zip(axis_order, source))
    return source, reversed_


def to_working(array, axis_order: str):
    """Layer order (S, P, L) -> the model's axis order (a view). Leading channel axes stay."""
    if axis_order == LAYER_ORDER:
        return array
    source, reversed_ = _axes(axis_order)
    lead = array.ndim - 3
    order = tuple(range(lead)) + tuple(lead + a for a in source)
    flips = tuple(lead + i for i, r in enumerate(reversed_) if r)
    if isinstance(array, torch.Tensor):
        array = array.permute(order)
        return array.flip(flips) if flips else array
    array = np.transpose(array, order)
    return np.flip(array, axis=flips) if flips else array


def from_working(array, axis_order: str):
    """The inverse of :func:`to_working`."""
    if axis_order == LAYER_ORDER:
        return array
    source, reversed_ = _axes(axis_order)
    lead = array.ndim - 3
    flips = tuple(lead + i for i, r in enumerate(reversed_) if r)
    inverse = tuple(range(lead)) + tuple(lead + source.index(a) for a in range(3))
    if isinstance(array, torch.Tensor):
        return (array.flip(flips) if flips else array).permute(inverse)
    return np.transpose(np.flip(array, axis=flips) if flips else array, inverse)


def spacing_to_working(spacing: tuple, axis_order: str) -> tuple:
    source, _ = _axes(axis_order)
    return tuple(spacing[a] for a in source)


def working_axis(axis_order: str, layer_axis: int) -> int:
    """Which working axis runs along ``layer_axis`` (0 superior, 1 posterior, 2 left)."""
    return _axes(axis_order)[0].index(layer_axis)


# -- resampling ------------------------------------------------------------------------

def resample(tensor: torch.Tensor, shape: tuple, mode: str = "area") -> torch.Tensor:
    """Resample a ``(C, D, H, W)`` or ``(D, H, W)`` tensor to ``shape`` over the same extent.

    Voxel centres follow the half-voxel convention (``align_corners=False``), so the
    grid keeps the field of view exactly. ``area`` averages blocks before shrinking by
    2 or more (anti-aliasing) and is trilinear otherwise; ``linear`` is trilinear;
    ``nearest`` takes the nearest voxel (``nearest-exact``).
    """
    squeeze = tensor.ndim == 3
    x = tensor[None, None] if squeeze else tensor[None]
    shape = tuple(int(n) for n in shape)
    if tuple(x.shape[2:]) == shape:
        return tensor
    if mode == "nearest":
        y = F.interpolate(x, size=shape, mode="nearest-exact")
    else:
        factors = [int(np.floor(n / m)) for n, m in zip(x.shape[2:], shape)]
        if mode == "area" and max(factors) >= 2:
            kernel = [max(1, f) for f in factors]
            x = F.avg_pool3d(x, kernel_size=kernel, stride=kernel, ceil_mode=True, count_include_pad=False)
        y = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)
    return y[0, 0] if squeeze else y[0]


def grid_shape(region_shape: tuple, spacing: tuple, card: ModelCard) -> tuple:
    """The network grid's shape for a region of ``region_shape`` voxels of ``spacing`` mm."""
    grid = card.pipeline.grid
    if grid.kind == "shape":
        return tuple(grid.shape)
    # nnU-Net rounds every axis (compute_new_shape); our own grids keep a size within 1 %.
    tolerance = 0.0 if grid.interpolation == "spline" else SPACING_TOLERANCE
    out = []
    for n, s, t in zip(region_shape, spacing, grid.spacing):
        out.append(n if abs(s / t - 1) <= tolerance else max(1, int(round(n * s / t))))
    return tuple(out)


# -- nnU-Net's resampling ('spline' grids) ------------------------------------------------

def separate_axis(current: tuple, new: tuple, grid) -> int | None:
    """The axis that nnU-Net resamples on its own, going from ``current`` to ``new`` spacing:
    the coarsest axis of whichever spacing is anisotropic (ratio above the threshold),
    unless the card forces or forbids it; none when two or three axes tie for coarsest."""
    def coarsest(spacing):
        return [i for i, s in enumerate(spacing) if s == max(spacing)]

    if grid.separate_z is not None:
        axes = coarsest(current) if grid.separate_z else []
    elif max(current) / min(current) > grid.anisotropy_threshold:
        axes = coarsest(current)
    elif max(new) / min(new) > grid.anisotropy_threshold:
        axes = coarsest(new)
    else:
        axes = []
    return axes[0] if len(axes) == 1 else None


def _source_positions(n_out: int, n_in: int) -> np.ndarray:
    """Where output voxel centres fall on the input axis (half-voxel convention), clamped to it."""
    # In nnU-Net's order of operations (scale first): at exact ties, rounding depends on it.
    return np.clip(float(n_in) / n_out * (np.arange(n_out) + 0.5) - 0.5, 0, n_in - 1)


def _along_first(array, n_out: int, order: int):
    """Resample axis 0 of a numpy array or tensor to ``n_out``: nearest (rounding half up, as
    scipy's map_coordinates) or linear, with edge values past the ends."""
    n_in = array.shape[0]
    if n_in == n_out:
        return array
    return _at_positions(array, _source_positions(n_out, n_in), order)


def _at_positions(array, c: np.ndarray, order: int):
    """Axis 0 of ``array`` sampled at positions ``c`` (nearest or linear)."""
    n_in = array.shape[0]
    if order == 0:
        return array[np.floor(c + 0.5).astype(np.intp)]
    i0 = np.floor(c).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (c - i0).reshape((-1,) + (1,) * (array.ndim - 1))
    w = torch.from_numpy(w).to(array.dtype) if isinstance(array, torch.Tensor) else w.astype(array.dtype)
    return array[i0] * (1 - w) + array[i1] * w


def spline_resample(array: np.ndarray, shape: tuple, axis: int | None, order: int, order_z: int,
                    dtype=np.float32) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg`` for an image: scikit-image's resize with B-splines
    of ``order`` (edge mode, no anti-aliasing), or, with a separate ``axis``, slice by slice
    in-plane and with ``order_z`` across (nearest with ``order_z`` 0); computed in float64
    and stored as ``dtype``."""
    from skimage.transform import resize

    shape = tuple(int(n) for n in shape)
    if tuple(array.shape) == shape:
        return np.asarray(array, dtype=dtype)
    data = np.asarray(array, dtype=np.float64)
    if axis is None:
        return resize(data, shape, order, mode="edge", anti_aliasing=False).astype(dtype)
    moved = np.moveaxis(data, axis, 0)
    plane = tuple(n for i, n in enumerate(shape) if i != axis)
    inplane = np.stack([resize(part, plane, order, mode="edge", anti_aliasing=False) for part in moved])
    return np.ascontiguousarray(np.moveaxis(_along_first(inplane, shape[axis], order_z), 0, axis), dtype=dtype)


# -- the imaged body ---------------------------------------------------------------------

def _subsample_step(shape: tuple) -> int:
    return subsample_step(shape, BODY_VOXELS)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest part of a boolean mask, parts touching at a face, edge or corner joined
    (26-connectivity, as deepbet's ``cc3d``); the mask itself if it has one part."""
    from scipy import ndimage

    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == sizes.argmax()


_body_cache: dict = {}


def _array_key(values: np.ndarray) -> tuple:
    flat = values.reshape(-1) if values.flags.c_contiguous or values.flags.f_contiguous else None
    checksum = float(flat[::1009].astype(np.float64).sum()) if flat is not None else None
    return id(values), values.shape, values.dtype.str, values.strides, checksum


def body_mask(array, coarse: bool = False) -> np.ndarray:
    """Voxels inside the imaged body: above an Otsu threshold, the largest part, holes filled.

    Computed on a strided copy of about two million voxels (and kept for the same array,
    which the domain check, the result checks and post-processing all ask for).
    ``coarse=True`` returns that coarse mask and its step; otherwise it is expanded back
    to the full grid.
    """
    from scipy import ndimage

    values = np.asarray(array)
    key = _array_key(values)
    if _body_cache.get("key") == key:
        mask, step = _body_cache["value"]
    else:
        step = _subsample_step(values.shape)
        small = np.asarray(values[::step, ::step, ::step], dtype=np.float32)
        if float(small.max()) <= float(small.min()):
            mask = np.ones(small.shape, dtype=bool)
        else:
            mask = small > _otsu_above_air(small)
            mask = largest_component(ndimage.binary_opening(mask, iterations=1)) if mask.any() else mask
            if not mask.any():
                mask = small > small.min()
            # Close gaps in the outline before filling, so dark enclosed parts (CSF, sinuses) count.
            mask = ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=3))
        _body_cache.update(key=key, value=(mask, step))
    if coarse:
        return mask, step
    full = np.repeat(np.repeat(np.repeat(mask, step, 0), step, 1), step, 2)
    return full[:values.shape[0], :values.shape[1], :values.shape[2]]


def _otsu_above_air(values: np.ndarray) -> float:
    """Otsu's threshold over every voxel brighter than the darkest value: padding with air
    (the darkest value) leaves it unchanged, so the body's box does not depend on the field of view.

    One histogram pass over the array (no copies), clipped at the 95th percentile, so
    that a small very bright object (a marker, metal) cannot pull the threshold above the
    whole body.
    """
    from skimage.filters import threshold_otsu

    low, top = float(values.min()), float(values.max())
    if top <= low:
        return low
    counts, edges = np.histogram(values, bins=4096, range=(low, top))
    counts[0] -= int(np.count_nonzero(values == low))  # the air itself does not count
    if np.count_nonzero(counts) <= 1:  # one tissue value above air: halfway is the threshold
        return (low + float(edges[int(np.argmax(counts))])) / 2 if counts.sum() > 0 else low
    cumulative = np.cumsum(counts)
    last = int(np.searchsorted(cumulative, 0.95 * cumulative[-1])) + 1
    clipped = counts[:last].copy()
    clipped[-1] += int(cumulative[-1] - cumulative[last - 1])
    centres = (edges[:last] + edges[1:last + 1]) / 2
    return float(threshold_otsu(hist=(clipped, centres)))


def body_box(array, spacing: tuple, margin_mm: float, threshold: float | None = None) -> tuple:
    """The imaged body's bounding box plus ``margin_mm``, as index slices of ``array``.

    The body is found on a coarse copy (threshold, opening, largest part), then its
    edges are refined on the full grid with the same threshold, which is taken over all
    voxels brighter than air. So a padded scan and the scan itself give the same box.
    The box may reach past the array where the body touches its edge: the region is
    then filled with air, exactly as if the scan had been padded.
    """
    from scipy import ndimage

    values = np.asarray(array)
    threshold = _otsu_above_air(values) if threshold is None else threshold
    step = _subsample_step(values.shape)
    small = values[::step, ::step, ::step] > threshold
    if small.any():
        opened = ndimage.binary_opening(small, iterations=1)
        small = largest_component(opened) if opened.any() else small
    if not small.any():
        return tuple(slice(0, n) for n in values.shape)
    around = []
    for axis, (n, s) in enumerate(zip(values.shape, spacing)):
        # The coarse box, enlarged by its own quantisation and 10 mm: the full-grid edges lie
        # well inside it, whatever the coarse step was.
        present = np.flatnonzero(small.any(axis=tuple(a for a in range(3) if a != axis)))
        extra = step + int(math.ceil(10.0 / s))
        around.append(slice(max(0, int(present[0]) * step - extra), min(n, (int(present[-1]) + 1) * step + extra)))
    inside = values[tuple(around)] > threshold
    box = []
    for axis, (outer, s) in enumerate(zip(around, spacing)):
        present = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        margin = int(math.ceil(margin_mm / s - 1e-9))
        box.append(slice(outer.start + int(present[0]) - margin, outer.start + int(present[-1]) + 1 + margin))
    return tuple(box)


def nonzero_box(array) -> tuple:
    """nnU-Net's crop: the bounding box of the non-zero voxels, holes filled (the whole
    array when every voxel is zero)."""
    return nonzero_mask_and_box(array)[1]


def nonzero_mask_and_box(array) -> tuple[np.ndarray, tuple]:
    """nnU-Net's non-zero mask (holes filled) and its bounding box."""
    from scipy import ndimage

    mask = ndimage.binary_fill_holes(np.asarray(array) != 0)
    box = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1) if present.size else slice(0, mask.shape[axis]))
    return mask, tuple(box)


def crop(array, region: tuple, fill: float) -> np.ndarray:
    """``array[region]`` as float32, where parts of the region outside the array are ``fill``."""
    shape = tuple(s.stop - s.start for s in region)
    inside = tuple(slice(max(0, s.start), min(n, s.stop)) for s, n in zip(region, np.shape(array)))
    part = np.asarray(array[inside], dtype=np.float32)
    if part.shape == shape:
        return np.ascontiguousarray(part)
    out = np.full(shape, fill, dtype=np.float32)
    out[tuple(slice(i.start - s.start, i.stop - s.start) for i, s in zip(inside, region))] = part
    return out


def crop_working(layer_array, region: tuple, axis_order: str, fill: float) -> np.ndarray:
    """:func:`crop` of the working (model-axis) view, read as one block of the layer array:
    the same values, without gathering through a transposed, flipped view."""
    if axis_order == LAYER_ORDER:
        return crop(layer_array, region, fill)
    shape = np.shape(layer_array)
    source, reversed_ = _axes(axis_order)
    layer_region = [None, None, None]
    for part, axis, flipped in zip(region, source, reversed_):
        n = shape[axis]
        layer_region[axis] = slice(n - part.stop, n - part.start) if flipped else part
    block = crop(layer_array, tuple(layer_region), fill)
    return np.ascontiguousarray(to_working(block, axis_order))


def paste(full: np.ndarray, values: np.ndarray, region: tuple) -> None:
    """Put region-shaped ``values`` into ``full`` (its last three axes), where the region lies inside it."""
    lead = full.ndim - 3
    inside = tuple(slice(max(0, s.start), min(n, s.stop)) for s, n in zip(region, full.shape[lead:]))
    source = tuple(slice(i.start - s.start, i.stop - s.start) for i, s in zip(inside, region))
    full[(slice(None),) * lead + inside] = values[(slice(None),) * lead + source]


# -- normalisation --------------------------------------------------------------------

def intensity_statistics(sample: np.ndarray, normalisation: Normalisation) -> dict:
    """The statistics a normalisation needs, from a sample of the region (or field of view)."""
    kind = normalisation.kind
    if kind in ("ct", "ct_zscore"):
        low, high = normalisation.window
        return {"low": low, "high": high}
    if kind == "mr_robust_zscore":
        low, high = np.percentile(sample, [0.5, 99.5])
        clipped = np.clip(sample, low, high)
        foreground = clipped[clipped > clipped.mean()]
        if foreground.size < 16:
            foreground = clipped
        q25, median, q75 = np.percentile(foreground, [25, 50, 75])
        scale = float(q75 - q25) / 1.349
        if not np.isfinite(scale) or scale <= 1e-6:
            scale = float(clipped.std()) or 1.0
        return {"low": float(low), "high": float(high), "offset": float(median), "scale": scale}
    if kind == "zscore":
        values = np.asarray(sample, dtype=np.float32)
        return {"low": -np.inf, "high": np.inf, "offset": float(values.mean()), "scale": float(values.std())}
    if kind == "quantile_zscore":
        # Linear interpolation between order statistics, as deepbet's torch.quantile.
        low, high = np.percentile(np.asarray(sample, dtype=np.float32).ravel(), normalisation.quantiles)
        return {"low": float(low), "high": float(high)}
    raise MedsegError(f"unknown intensity normalisation {kind!r} in the model file")


def normalise(tensor: torch.Tensor, normalisation: Normalisation, stats: dict) -> torch.Tensor:
    """Apply a normalisation with precomputed ``stats`` to a network input (a new tensor)."""
    kind = normalisation.kind
    low, high = stats["low"], stats["high"]
    if kind == "ct":
        return (tensor.clamp(low, high) - (low + high) / 2) / ((high - low) / 2)
    if kind == "ct_zscore":
        return (tensor.clamp(low, high) - normalisation.mean) / max(normalisation.std, 1e-8)
    if kind == "mr_robust_zscore":
        return (tensor.clamp(low, high) - stats["offset"]) / stats["scale"]
    if kind == "zscore":
        return (tensor - stats["offset"]) / max(stats["scale"], 1e-8)
    # quantile_zscore: deepbet's normalize(): scale, clip, z-score on the input, remap.
    x = tensor.sub(low).div_(max(high - low, 1e-6)).clamp_(0, 1)
    std, mean = torch.std_mean(x)
    scale = normalisation.std / (float(std) if float(std) > 0 else 1.0)
    return x.sub_(float(mean)).mul_(scale).add_(normalisation.mean)


# -- the whole preparation ---------------------------------------------------------------

@dataclass
class PreparedScan:
    """A scan on the network's grid, and what is needed to bring maps back."""

    tensor: torch.Tensor          # (D, H, W) float32, normalised, on the network grid
    layer_shape: tuple            # the scan's shape in layer order
    axis_order: str
    region: tuple                 # index slices of the region in working (model-axis) order
    working_shape: tuple          # the scan's shape in working order
    spacing: tuple                # the scan's voxel size in working order
    interpolation: str
    info: dict = field(default_factory=dict)
    # 'spline' grids: the axis resampled on its own on the way back, and the orders (in-plane, across).
    back_axis: int | None = None
    back_orders: tuple = (1, 1)

    @property
    def model_shape(self) -> tuple:
        return tuple(self.tensor.shape[-3:])

    @property
    def region_shape(self) -> tuple:
        return tuple(s.stop - s.start for s in self.region)

    @property
    def resampled(self) -> bool:
        return self.region_shape != self.model_shape


def _network_box(probability: torch.Tensor, region_shape: tuple, margin: float, threshold: float) -> tuple:
    """deepbet's box from a first-stage foreground map: the slabs where more than 2 % of the
    voxels are foreground, scaled to the region, enlarged by ``margin`` of its size on each side."""
    mask = largest_component((probability > threshold).numpy())
    if not mask.any():
        return tuple(slice(0, n) for n in region_shape)
    mask = torch.from_numpy(mask.astype(np.float32))
    box = []
    for axis, n in enumerate(region_shape):
        others = tuple(a for a in range(3) if a != axis)
        rows = torch.where(mask.mean(others) > 0.02)[0]
        if rows.numel() == 0:
            rows = torch.where(mask.sum(others) > 0)[0]
        scale = n / mask.shape[axis]
        centre = scale * float(rows.max() + 1 + rows.min()) / 2
        size = scale * float(rows.max() + 1 - rows.min()) * (1 + 2 * margin)
        centre, size = round(centre), round(size)
        box.append(slice(max(0, int(centre - size / 2)), min(n, int(centre + size / 2))))
    return tuple(box)


def prepare(layer_array, layer_affine_ras: np.ndarray, card: ModelCard,
            roi_network: torch.nn.Module | None = None, device: torch.device | None = None,
            amp: bool | None = None) -> PreparedScan:
    """Bring a layer-order scan onto ``card``'s network grid (see the module's steps).
    ``amp``: the mixed precision of a first-stage network (see :func:`~.devices.autocast`).

    A model with several input channels takes ``(C, D, H, W)``, every channel on one grid
    (see :func:`~.predict.stack_channels`): the first channel finds the region, and each
    channel is cropped, normalised with its own statistics and resampled the same way.
    """
    channels = np.asarray(layer_array) if np.ndim(layer_array) == 4 else None
    mismatch = card.channel_mismatch(len(channels) if channels is not None else 1)
    if mismatch:
        raise MedsegError(mismatch)
    if channels is None:
        return _prepare_channel(layer_array, layer_affine_ras, card, roi_network, device, amp=amp)
    nonzero = region = None
    if card.pipeline.roi.kind == "nonzero":
        # nnU-Net's crop of several channels: the voxels that are non-zero in any of them.
        union = np.zeros(to_working(channels[0], card.pipeline.axis_order).shape, dtype=bool)
        for channel in channels:
            union |= to_working(channel, card.pipeline.axis_order) != 0
        nonzero, region = nonzero_mask_and_box(union)
    first = _prepare_channel(channels[0], layer_affine_ras, card, roi_network, device, region, 0, nonzero, amp)
    rest = [_prepare_channel(c, layer_affine_ras, card, roi_network, device, first.region, index, nonzero).tensor
            for index, c in enumerate(channels[1:], start=1)]
    return replace(first, tensor=torch.stack([first.tensor, *rest]).contiguous())


def _prepare_channel(layer_array, layer_affine_ras, card, roi_network, device, region=None, channel: int = 0,
                     nonzero: np.ndarray | None = None, amp: bool | None = None) -> PreparedScan:
    """One channel onto the network grid; ``region`` (working-order voxels) is the first
    channel's, when given, instead of one found on this channel; ``nonzero``: the non-zero
    mask of all channels (nnU-Net's), in working order. The channel's normalisation is
    the card's for that channel."""
    if np.ndim(layer_array) != 3 or min(np.shape(layer_array)) < 2:
        raise MedsegError(f"segmentation needs a 3D scan; this one has shape {tuple(np.shape(layer_array))}")
    pipeline = card.pipeline
    working = to_working(np.asarray(layer_array), pipeline.axis_order)
    spacing = spacing_to_working(layer_spacing(layer_affine_ras), pipeline.axis_order)
    shape = tuple(working.shape)
    roi = pipeline.roi
    mode = pipeline.grid.interpolation
    info: dict = {}
    given = region is not None
    region = region if given else tuple(slice(0, n) for n in shape)
    normalisation = pipeline.normalisation_of(channel)
    if not given and roi.kind in ("body", "network") and normalisation.statistics == "region":
        # The threshold does not depend on the axis order: take it on the contiguous layer array.
        region = body_box(working, spacing, roi.margin_mm if roi.kind == "body" else max(roi.margin_mm, 10.0),
                          _otsu_above_air(np.asarray(layer_array)))
    # Intensity statistics: the region (or, to reproduce a published tool, the whole field
    # of view); the first stage's coarse grid is the sample, as in deepbet.
    air = float(np.min(layer_array))
    if roi.kind == "network" and not given:
        if roi_network is None:
            raise MedsegError(f"the model {card.title} needs its first-stage network, which was not loaded")
        region_tensor = torch.from_numpy(crop_working(layer_array, region, pipeline.axis_order, air))
        coarse = resample(region_tensor, roi.input_shape, mode)
        stats = intensity_statistics(coarse.numpy(), normalisation)
        stage_one = normalise(coarse, normalisation, stats)
        device = device or torch.device("cpu")
        roi_network = roi_network.to(device).eval()
        began = time.perf_counter()
        from .devices import autocast

        with torch.inference_mode(), autocast(device, amp):
            output = roi_network(stage_one[None, None].to(device)).float().cpu()[0]
        info["first_stage_seconds"] = time.perf_counter() - began
        foreground = output[1:].sum(0)
        inner = _network_box(foreground, tuple(region_tensor.shape), roi.margin_fraction, roi.threshold)
        region = tuple(slice(outer.start + box.start, outer.start + box.stop) for outer, box in zip(region, inner))
        info["first_stage_box"] = [[s.start, s.stop] for s in inner]
    mask = None
    if roi.kind == "nonzero" and not given:
        nonzero, region = nonzero_mask_and_box(working)
    region_tensor = torch.from_numpy(crop_working(layer_array, region, pipeline.axis_order, air))
    if normalisation.kind == "zscore" and normalisation.use_mask:
        # nnU-Net's mask rule: the non-zero mask of the whole scan, within the crop.
        mask = np.ascontiguousarray(nonzero[region]) if nonzero is not None else \
            nonzero_mask_and_box(region_tensor.numpy())[0]
    if roi.kind != "network" or given:
        if normalisation.kind == "zscore":   # nnU-Net's statistics: every voxel (or the mask's)
            sample = region_tensor.numpy()[mask] if mask is not None else region_tensor.numpy()
        else:
            sample = strided_sample(region_tensor.numpy(), BODY_VOXELS, np.float32)
        stats = intensity_statistics(sample, normalisation)
    model_shape = grid_shape(tuple(region_tensor.shape), spacing, card)
    back_axis, back_orders = None, (1, 1)
    if mode == "spline":
        grid = pipeline.grid
        forward_axis = separate_axis(spacing, grid.spacing, grid)
        back_axis = separate_axis(grid.spacing, spacing, grid)
        back_orders = (grid.back_order, grid.back_order_z if back_axis is not None else grid.back_order)
    if pipeline.normalise_first:
        region_tensor = _normalised(region_tensor, normalisation, stats, mask)
    if mode == "spline":
        tensor = torch.from_numpy(spline_resample(region_tensor.numpy(), model_shape, forward_axis,
                                                  pipeline.grid.order, pipeline.grid.order_z))
    else:
        tensor = resample(region_tensor, model_shape, mode)
    if not pipeline.normalise_first:
        tensor = _normalised(tensor, normalisation, stats, None)
    tensor = tensor.contiguous()
    info.update(region=[[s.start, s.stop] for s in region], statistics=stats)
    return PreparedScan(tensor, tuple(np.shape(layer_array)), pipeline.axis_order, region, shape, spacing,
                        mode, info, back_axis, back_orders)


def _normalised(tensor: torch.Tensor, normalisation: Normalisation, stats: dict, mask) -> torch.Tensor:
    """:func:`normalise`; with a mask (nnU-Net's ``use_mask_for_norm``), voxels outside it keep their value."""
    out = normalise(tensor, normalisation, stats)
    if mask is not None:
        out = torch.where(torch.from_numpy(mask), out, tensor)
    return out


# -- back onto the scan -------------------------------------------------------------------

def onto_grid_nearest(layer_array, prepared: PreparedScan) -> torch.Tensor:
    """A layer-order scan-grid array (labels, masks) carried onto the network grid by nearest voxel."""
    region = crop_working(np.asarray(layer_array, dtype=np.float32), prepared.region, prepared.axis_order, 0.0)
    return resample(torch.from_numpy(region), prepared.model_shape, "nearest")


def _back_mode(prepared: PreparedScan) -> str:
    return "nearest" if prepared.interpolation == "nearest" else "linear"


def _spline_back_slabs(maps: torch.Tensor, prepared: PreparedScan, slab: int = 16, dtype=None):
    """nnU-Net's way back for 'spline' grids, a slab at a time: maps ``(C, d, h, w)`` resampled
    in-plane and then across the separate axis (or axis 0: linear is separable), with the
    card's back orders. Yields ``(axis, start, stop, part)``, ``part`` being ``(C, k, P, Q)``
    for region slices ``start:stop`` along ``axis``. With ``dtype`` (reproducing nnU-Net):
    nnU-Net's own computation, rounded to ``dtype`` as it stores the result."""
    axis = prepared.back_axis if prepared.back_axis is not None else 0
    in_plane, across = prepared.back_orders
    if dtype is not None:
        # Reproducing nnU-Net: its own resampling, whole, in float64, stored in its precision.
        # Torch's interpolation differs in the last bits, and at the many exact float16 ties
        # a logit then rounds the other way (2e-3 in a probability, measured).
        stored = np.float16 if dtype == torch.float16 else np.float32
        part = np.stack([spline_resample(channel, prepared.region_shape, prepared.back_axis, in_plane, across,
                                         stored) for channel in maps.double().numpy()])
        yield 0, 0, prepared.region_shape[0], torch.from_numpy(part.astype(np.float32))
        return
    moved = maps.float().movedim(axis + 1, 1)
    n_in = moved.shape[1]
    n_out = prepared.region_shape[axis]
    plane = tuple(n for i, n in enumerate(prepared.region_shape) if i != axis)
    positions = _source_positions(n_out, n_in)
    for start in range(0, n_out, slab):
        stop = min(n_out, start + slab)
        c = positions[start:stop]
        lo = int(np.floor(c.min()))
        hi = min(n_in, int(np.floor(c.max())) + 2)
        source = moved[:, lo:hi].transpose(0, 1)          # (k, C, h, w): slices as the batch
        if tuple(source.shape[2:]) != plane:
            source = F.interpolate(source, size=plane, mode="bilinear" if in_plane == 1 else "nearest-exact",
                                   **({"align_corners": False} if in_plane == 1 else {}))
        # Without resampling across, the slab is its own slices (``source`` holds one more).
        part = _at_positions(source, c - lo, across) if n_in != n_out else source[start - lo:stop - lo]
        yield axis, start, stop, part.transpose(0, 1)


def _place(target: np.ndarray, axis: int, start: int, stop: int, values: np.ndarray) -> None:
    """``values`` (..., k, P, Q) into slices ``start:stop`` of ``target``'s ``axis`` (of its last three)."""
    lead = target.ndim - 3
    index = [slice(None)] * target.ndim
    index[lead + axis] = slice(start, stop)
    target[tuple(index)] = np.moveaxis(values, lead, lead + axis)


def probabilities_to_scan(scores: torch.Tensor, prepared: PreparedScan, output: str = "logits",
                          dtype=None, regions: tuple = ()) -> np.ndarray:
    """Class probabilities on the scan grid (layer order) from the network grid's scores.

    Our grids turn logits into probabilities and resample those; 'spline' grids resample
    the logits and take the softmax after, as nnU-Net does. Outside the region the
    background's probability is 1. With ``regions``: each channel's sigmoid, 0 outside.
    """
    channels = scores.shape[0]
    background = [0.0] * channels if regions else [1.0] + [0.0] * (channels - 1)
    nonlinearity = torch.sigmoid if regions else (lambda x: torch.softmax(x, 0))
    if prepared.interpolation != "spline":
        return to_scan(nonlinearity(scores) if output == "logits" else scores, prepared, background)
    inside = np.empty((channels, *prepared.region_shape), dtype=np.float32)
    for axis, start, stop, part in _spline_back_slabs(scores, prepared, dtype=dtype):
        _place(inside, axis, start, stop, (nonlinearity(part) if output == "logits" else part).numpy())
    full = np.empty((channels, *prepared.working_shape), dtype=np.float32)
    full[:] = np.asarray(background, dtype=np.float32)[:, None, None, None]
    paste(full, inside, prepared.region)
    return np.ascontiguousarray(from_working(full, prepared.axis_order))


def to_scan(maps: torch.Tensor, prepared: PreparedScan, background=0.0) -> np.ndarray:
    """Maps ``(C, d, h, w)`` (or ``(d, h, w)``) on the network grid -> layer order on the scan grid.

    Resampled linearly (nearest for ``nearest`` grids) into the region; outside it each
    channel takes ``background`` (a number, or one value per channel).
    """
    squeeze = maps.ndim == 3
    maps = maps[None] if squeeze else maps
    channels = maps.shape[0]
    inside = resample(maps.float(), prepared.region_shape, _back_mode(prepared))
    fill = np.broadcast_to(np.asarray(background, dtype=np.float32), (channels,))
    full = np.empty((channels, *prepared.working_shape), dtype=np.float32)
    full[:] = fill[:, None, None, None]
    paste(full, inside.numpy(), prepared.region)
    out = from_working(full, prepared.axis_order)
    return np.ascontiguousarray(out[0] if squeeze else out)


def regions_to_labels(logits: torch.Tensor, regions: tuple) -> torch.Tensor:
    """nnU-Net's labels of a region-based model: each region's value where its sigmoid
    exceeds 0.5, in the card's order (a later region overwrites an earlier one)."""
    labels = torch.zeros(logits.shape[1:], dtype=torch.uint8)
    for channel, value in enumerate(regions):
        labels[torch.sigmoid(logits[channel].float()) > 0.5] = int(value)
    return labels


def labels_to_scan(scores: torch.Tensor, prepared: PreparedScan, threshold: float | None = None,
                   slab: int = 16, dtype=None, regions: tuple = ()) -> np.ndarray:
    """Labels on the scan grid (layer order) from per-class scores on the network grid.

    ``scores`` are probabilities or logits ``(C, d, h, w)``. They are resampled (linearly,
    or nearest for ``nearest`` grids) one slab of scan slices at a time, so the
    full-resolution float maps never exist at once; then the argmax, or for a binary
    model with a ``threshold``, foreground where class 1 (or the one channel given, the
    foreground probability) exceeds it; with ``regions`` (spline grids), see
    :func:`regions_to_labels`. Outside the region everything is background.
    """
    region_shape = prepared.region_shape
    labels = np.zeros(prepared.working_shape, dtype=np.uint8)
    inside = np.zeros(region_shape, dtype=np.uint8)
    if prepared.interpolation == "spline":  # the argmax of the resampled logits, as nnU-Net's
        for axis, start, stop, part in _spline_back_slabs(scores, prepared, slab, dtype):
            chosen = regions_to_labels(part, regions) if regions else part.argmax(0).to(torch.uint8)
            _place(inside, axis, start, stop, chosen.numpy())
        paste(labels, inside, prepared.region)
        return np.ascontiguousarray(from_working(labels, prepared.axis_order))
    depth = scores.shape[1]
    mode = _back_mode(prepared)
    x = scores[None].float()
    rest = tuple(region_shape[1:])
    scale = depth / region_shape[0]
    for start in range(0, region_shape[0], slab):
        stop = min(region_shape[0], start + slab)
        if mode == "nearest":
            source = np.minimum(np.floor((np.arange(start, stop) + 0.5) * scale).astype(int), depth - 1)
            part = F.interpolate(x[:, :, source], size=(stop - start,) + rest, mode="nearest-exact")[0]
        else:
            centres = (np.arange(start, stop) + 0.5) * scale - 0.5
            lo = max(0, int(np.floor(centres.min())))
            hi = min(depth - 1, int(np.ceil(centres.max()))) + 1
            part = F.interpolate(x[:, :, lo:hi], size=(hi - lo,) + rest, mode="trilinear", align_corners=False)
            c = np.clip(centres, 0, depth - 1) - lo
            i0 = np.floor(c).astype(int)
            i1 = np.minimum(i0 + 1, hi - lo - 1)
            w = torch.from_numpy((c - i0).astype(np.float32)).view(1, 1, -1, 1, 1)
            part = (part[:, :, i0] * (1 - w) + part[:, :, i1] * w)[0]
        if threshold is not None and part.shape[0] in (1, 2):
            inside[start:stop] = (part[-1] > threshold).to(torch.uint8).numpy()
        else:
            inside[start:stop] = part.argmax(0).to(torch.uint8).numpy()
    paste(labels, inside, prepared.region)
    return np.ascontiguousarray(from_working(labels, prepared.axis_order))
