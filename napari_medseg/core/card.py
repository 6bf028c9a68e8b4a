"""The model card: a typed, validated description of what a model is and how to run it.

The card travels inside the model file (see :mod:`.models`) and is checked on every
load. It declares the whole prediction pipeline, so that ``predict``, the Segment
widget, explanation maps and fine-tuning all run a model the same way:

* ``network`` (and an optional ``roi_network``): architecture and hyperparameters;
* ``labels``: value, name, colour, and optionally the plausible volume range in mL;
* ``domain``: the modality, contrast and body part the model was made for;
* ``pipeline``: the input axis order, the region of interest (none, the imaged body's
  extent plus a margin, or a first-stage network), the grid (a voxel size, or a fixed
  shape over the region), the intensity normalisation and where its statistics come
  from, the patch size, the output kind, the threshold and the post-processing;
* ``checks``: what makes a result implausible (total volume, share of the body);
* ``explain``: the explanation maps the network supports;
* provenance, metrics, licence and citation, for people.

Cards written by napari-medseg 0.1 (``format_version`` 1, flat fields) are read and
converted on load; files are never rewritten behind the user's back.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from .errors import MedsegError

FORMAT = "napari-medseg-model"
FORMAT_VERSION = 2
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The direction each working axis runs toward, one letter per axis: SPL is napari's layer
# order, RAS nibabel's canonical voxel order, SAR SimpleITK's array of a RAS image.
AXIS_PAIRS = ("SI", "PA", "LR")
ROI_KINDS = ("none", "body", "network", "nonzero")
GRID_KINDS = ("spacing", "shape")
INTERPOLATIONS = ("area", "linear", "nearest", "spline")
NORMALISATIONS = ("ct", "mr_robust_zscore", "quantile_zscore", "ct_zscore", "zscore")
WINDOW_PLANS = ("ours", "step")
# Who runs the pipeline: our engine, or a MONAI bundle's own transforms and inferer (see .bundle).
PIPELINE_KINDS = ("ours", "monai_bundle")
STATISTICS = ("region", "field_of_view")
OUTPUTS = ("logits", "probabilities")
POSTPROCESSING = ("inside_body", "largest_component", "fill_holes")
EXPLAIN_METHODS = ("attention", "gradcam", "entropy", "tta", "activation")
WITH_ATTENTION_GATES = ("AttentionUNet3D",)


PALETTE = [(0, 0, 0, 0), (0.95, 0.35, 0.2, 1), (0.2, 0.6, 1.0, 1), (0.3, 0.85, 0.3, 1),
           (0.95, 0.8, 0.2, 1), (0.7, 0.4, 0.9, 1), (0.2, 0.85, 0.85, 1), (0.95, 0.5, 0.75, 1)]


def default_color(value: int) -> list:
    """A label's colour: a fixed palette for the first few, then a fixed colour per value."""
    if value < len(PALETTE):
        return list(PALETTE[value])
    import numpy as np

    rng = np.random.default_rng(value)
    return [*map(float, rng.uniform(0.3, 1.0, 3)), 1.0]


def labels_matching(names: dict, query: str) -> set:
    """The label values a filter such as ``"lung, airway"`` or ``"1, 5-7"`` shows: every value
    whose name contains one of the comma-separated words (any case), or that a number or
    range names. An empty filter shows every label."""
    terms = [term.strip().lower() for term in str(query or "").split(",") if term.strip()]
    if not terms:
        return set(names)
    shown = set()
    for term in terms:
        low, dash, high = term.partition("-")
        if low.strip().isdigit() and (not dash or high.strip().isdigit()):
            first, last = int(low), int(high) if dash else int(low)
            shown |= {value for value in names if first <= value <= last}
        else:
            shown |= {value for value, name in names.items() if term in str(name).lower()}
    return shown


def explain_methods_for(architecture: str) -> list:
    """The maps a network of ``architecture`` can give: attention maps need attention gates."""
    return [method for method in EXPLAIN_METHODS
            if method != "attention" or architecture in WITH_ATTENTION_GATES]


class ModelError(MedsegError):
    """A model file is missing, unsafe, corrupt or inconsistent."""


def _positive(values, what: str, where: str, integer: bool = False, count: int = 3) -> tuple:
    try:
        values = tuple(int(v) if integer else float(v) for v in values)
    except (TypeError, ValueError):
        raise ModelError(f"'{where}': {what} must be {count} numbers, got {values!r}") from None
    if len(values) != count or any(not (v > 0) for v in values):
        raise ModelError(f"'{where}': {what} must be {count} positive numbers, got {list(values)}")
    return values


@dataclass(frozen=True)
class NetworkSpec:
    architecture: str
    hparams: dict

    @classmethod
    def parse(cls, data, where: str, what: str = "network") -> "NetworkSpec":
        if not isinstance(data, dict) or not isinstance(data.get("architecture"), str) \
                or not isinstance(data.get("hparams"), dict):
            raise ModelError(f"'{where}': the card's {what} needs an architecture and hparams")
        return cls(data["architecture"], dict(data["hparams"]))

    def to_dict(self) -> dict:
        return {"architecture": self.architecture, "hparams": dict(self.hparams)}


@dataclass(frozen=True)
class Label:
    value: int
    name: str
    color: tuple
    expected_ml: tuple | None = None   # plausible volume range for this label

    def to_dict(self) -> dict:
        out = {"value": self.value, "name": self.name, "color": list(self.color)}
        if self.expected_ml is not None:
            out["expected_ml"] = list(self.expected_ml)
        return out


@dataclass(frozen=True)
class Domain:
    modality: str                       # "MR", "CT", or "any"
    contrast: str | None = None         # e.g. "T1"
    body_part: str | None = None        # e.g. "head"
    description: str = ""

    def to_dict(self) -> dict:
        return {"modality": self.modality, "contrast": self.contrast, "body_part": self.body_part,
                "description": self.description}


@dataclass(frozen=True)
class RegionOfInterest:
    """Where the model looks: the whole field of view, the imaged body, or a first network's box."""

    kind: str = "none"
    margin_mm: float = 0.0              # added around the region on every side
    margin_fraction: float = 0.0        # or a share of the region's size (deepbet: 0.1)
    input_shape: tuple | None = None    # the first-stage network's input grid
    threshold: float = 0.5              # of the first stage's foreground probability

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "margin_mm": self.margin_mm, "margin_fraction": self.margin_fraction,
               "threshold": self.threshold}
        if self.input_shape is not None:
            out["input_shape"] = list(self.input_shape)
        return out


def axis_order_error(order) -> str | None:
    """Why ``order`` is not an axis order (one letter of S/I, P/A and L/R each), or None."""
    if not isinstance(order, str) or len(order) != 3 or \
            sorted(next((i for i, pair in enumerate(AXIS_PAIRS) if c in pair), 9) for c in order) != [0, 1, 2]:
        return f"the axis order must name one direction of S/I, P/A and L/R each (such as SPL or RAS), got {order!r}"
    return None


@dataclass(frozen=True)
class Grid:
    """The network's input grid: a voxel size over the region, or a fixed shape.

    ``spline`` is nnU-Net's resampling: B-splines of ``order`` (scikit-image's resize),
    except along an anisotropic axis (spacing ratio above ``anisotropy_threshold``),
    which is resampled slice by slice in-plane and with ``order_z`` across; maps come
    back with ``back_order`` / ``back_order_z`` the same way. ``separate_z`` forces
    (True) or forbids (False) the separate axis; None decides from the spacings.
    """

    kind: str
    spacing: tuple | None = None
    shape: tuple | None = None
    interpolation: str = "area"         # anti-aliased downsampling, linear upsampling
    order: int = 3
    order_z: int = 0
    back_order: int = 1
    back_order_z: int = 0
    separate_z: bool | None = None
    anisotropy_threshold: float = 3.0

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "interpolation": self.interpolation}
        if self.spacing is not None:
            out["spacing"] = list(self.spacing)
        if self.shape is not None:
            out["shape"] = list(self.shape)
        if self.interpolation == "spline":
            out.update(order=self.order, order_z=self.order_z, back_order=self.back_order,
                       back_order_z=self.back_order_z, separate_z=self.separate_z,
                       anisotropy_threshold=self.anisotropy_threshold)
        return out


@dataclass(frozen=True)
class Windows:
    """How the network's windows tile the grid, and the mirroring of test-time augmentation.

    ``ours``: as few voxels as possible within a budget (see :mod:`.inference`).
    ``step``: nnU-Net's tiling: windows of the patch size whose starts are ``step`` of a
    patch apart, spread evenly, the grid padded (centred, with ``pad_value``) up to one
    patch, and nnU-Net's Gaussian weights. ``mirror_axes``: test-time augmentation
    averages every combination of flips of these axes; none named: our four flips.
    ``mirror_by_default``: whether a prediction mirrors unless told otherwise.
    ``blend_dtype``: what the ``step`` plan blends in (nnU-Net: float16, half the memory).
    ``blend_folds_apart``: an ensemble's folds are blended one by one and then averaged
    (nnU-Net's order, which float16 rounding makes visible at the patch corners), rather
    than averaged per window.
    """

    plan: str = "ours"
    step: float = 0.5
    pad_value: float = 0.0
    mirror_axes: tuple = ()
    mirror_by_default: bool = False
    blend_dtype: str = "float32"
    blend_folds_apart: bool = False

    def to_dict(self) -> dict:
        return {"plan": self.plan, "step": self.step, "pad_value": self.pad_value,
                "mirror_axes": list(self.mirror_axes), "mirror_by_default": self.mirror_by_default,
                "blend_dtype": self.blend_dtype, "blend_folds_apart": self.blend_folds_apart}


@dataclass(frozen=True)
class Normalisation:
    """Intensity normalisation and where its statistics come from.

    ``ct``: clip HU to ``window`` and map it to [-1, 1]. ``mr_robust_zscore``: clip to
    the 0.5/99.5 percentiles, z-score with the median and IQR of the bright voxels.
    ``quantile_zscore`` (deepbet's): scale the ``quantiles`` to [0, 1], clip, z-score
    with the network input's own mean and SD, then map to ``mean`` and ``std``.
    ``ct_zscore`` (nnU-Net's CTNormalization): clip HU to ``window`` (the training set's
    foreground 0.5/99.5 percentiles), then subtract ``mean`` and divide by ``std`` (its
    foreground mean and SD), all fixed in the card.
    ``zscore`` (nnU-Net's ZScoreNormalization): the region's own mean and SD; with
    ``use_mask``, taken over the non-zero region only, and only its voxels change.
    ``statistics``: ``region`` (the region of interest, so air padding does not move
    them) or ``field_of_view`` (the whole scan, as deepbet's own code does).
    """

    kind: str
    window: tuple | None = None
    quantiles: tuple = (0.5, 99.5)
    mean: float = 0.0
    std: float = 1.0
    statistics: str = "region"
    use_mask: bool = False

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "statistics": self.statistics}
        if self.kind in ("ct", "ct_zscore"):
            out["window"] = list(self.window)
        if self.kind == "ct_zscore":
            out.update(mean=self.mean, std=self.std)
        if self.kind == "quantile_zscore":
            out.update(quantiles=list(self.quantiles), mean=self.mean, std=self.std)
        if self.kind == "zscore":
            out["use_mask"] = self.use_mask
        return out


@dataclass(frozen=True)
class Pipeline:
    axis_order: str
    roi: RegionOfInterest
    grid: Grid
    normalisation: Normalisation
    patch_size: tuple
    output: str = "logits"              # what the network returns
    threshold: float | None = None      # binary models: foreground above this probability
    postprocessing: tuple = ()
    windows: Windows = field(default_factory=Windows)
    normalise_first: bool = False       # normalise before resampling (nnU-Net's order)
    kind: str = "ours"
    bundle: dict | None = None          # a bundle's prediction sections, rebuilt through the allow-list
    # A model in parts (TotalSegmentator's split tasks): per part, (its class, the merged label) pairs.
    parts: tuple = ()
    # Several input channels normalised each its own way (nnU-Net's per-channel schemes);
    # empty: every channel uses ``normalisation``.
    channel_normalisations: tuple = ()
    # A region-based model (nnU-Net's regions_class_order): one sigmoid output per region,
    # each written, in this order, as this label value where its probability exceeds 0.5;
    # a later region (inside an earlier one) overwrites it. Empty: one softmax class per label.
    regions: tuple = ()
    # The network reads the voxels in the file's stored order (nnU-Net's SimpleITK reader
    # does not reorient), so a scan with a known source geometry is prepared in that order;
    # ``axis_order`` then names that order as if it were the layer's.
    file_order: bool = False

    def normalisation_of(self, channel: int) -> "Normalisation":
        return self.channel_normalisations[channel] if self.channel_normalisations else self.normalisation

    def to_dict(self) -> dict:
        extra = {"kind": self.kind, "bundle": copy.deepcopy(self.bundle)} if self.kind != "ours" else {}
        if self.parts:
            extra["parts"] = [[list(pair) for pair in table] for table in self.parts]
        if self.channel_normalisations:
            extra["channel_normalisations"] = [n.to_dict() for n in self.channel_normalisations]
        if self.regions:
            extra["regions"] = list(self.regions)
        if self.file_order:
            extra["file_order"] = True
        return {**extra, "axis_order": self.axis_order, "roi": self.roi.to_dict(), "grid": self.grid.to_dict(),
                "normalisation": self.normalisation.to_dict(), "patch_size": list(self.patch_size),
                "output": self.output, "threshold": self.threshold,
                "postprocessing": list(self.postprocessing), "windows": self.windows.to_dict(),
                "normalise_first": self.normalise_first}


@dataclass(frozen=True)
class Checks:
    """What makes a result look like a failure, to be shown to the user (never hidden)."""

    max_foreground_ml: float | None = None      # e.g. the all-head failure of a brain model
    max_body_fraction: float | None = None      # share of the imaged body labelled foreground

    def to_dict(self) -> dict:
        return {"max_foreground_ml": self.max_foreground_ml, "max_body_fraction": self.max_body_fraction}


@dataclass
class ModelCard:
    name: str
    version: str
    network: NetworkSpec
    labels: tuple
    domain: Domain
    pipeline: Pipeline
    roi_network: NetworkSpec | None = None
    checks: Checks = field(default_factory=Checks)
    explain: tuple = ()
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    licence: str | None = None
    citation: str | None = None
    content_sha256: str | None = None
    channels: tuple = ("image",)        # the input images the network takes, by name

    # -- convenient views ----------------------------------------------------------
    @property
    def title(self) -> str:
        return f"{self.name} v{self.version}"

    @property
    def label_names(self) -> dict:
        return {label.value: label.name for label in self.labels}

    @property
    def label_colors(self) -> dict:
        return {label.value: tuple(label.color) for label in self.labels}

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    @property
    def modality(self) -> str:
        return self.domain.modality

    def channel_mismatch(self, given: int) -> str | None:
        """Why ``given`` input images do not fit this model, or None when they do."""
        if given == len(self.channels):
            return None
        return f"{self.title} takes {len(self.channels)} input image(s) ({', '.join(self.channels)}); got {given}"

    def to_dict(self) -> dict:
        out = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "name": self.name, "version": self.version,
            "network": self.network.to_dict(),
            "labels": [label.to_dict() for label in self.labels],
            "domain": self.domain.to_dict(),
            "pipeline": self.pipeline.to_dict(),
            "checks": self.checks.to_dict(),
            "explain": list(self.explain),
            "provenance": copy.deepcopy(self.provenance),
            "metrics": copy.deepcopy(self.metrics),
            "licence": self.licence, "citation": self.citation,
        }
        if tuple(self.channels) != ("image",):
            out["channels"] = list(self.channels)
        if self.roi_network is not None:
            out["roi_network"] = self.roi_network.to_dict()
        if self.content_sha256:
            out["content_sha256"] = self.content_sha256
        return out

    def replace(self, **changes) -> "ModelCard":
        data = self.to_dict()
        data.pop("content_sha256", None)
        data.update(changes)
        return parse_card(data, self.name)

    # -- parsing ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, where: str) -> "ModelCard":
        return parse_card(data, where)


def _labels(raw, where: str, gaps: bool = False) -> tuple:
    """The card's labels: values 0..N-1 in order, one per network output; with ``gaps`` (a
    model whose postprocessing writes the values, such as BraTS's 0, 1, 2, 4), increasing from 0."""
    if not isinstance(raw, list) or len(raw) < 2:
        raise ModelError(f"'{where}': the card must name at least two labels (background and one more)")
    labels = []
    previous = -1
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or "name" not in item or "value" not in item:
            raise ModelError(f"'{where}': label {index} needs a value and a name")
        value = int(item["value"])
        if (value != index and not gaps) or value <= previous or (index == 0 and value != 0):
            raise ModelError(f"'{where}': label values must be 0..N-1 in order, got "
                             f"{[i.get('value') for i in raw if isinstance(i, dict)]}")
        previous = value
        color = tuple(float(c) for c in item.get("color", (1.0, 1.0, 1.0, 1.0)))
        expected = item.get("expected_ml")
        if expected is not None:
            expected = tuple(float(v) for v in expected)
            if len(expected) != 2 or not 0 <= expected[0] < expected[1]:
                raise ModelError(f"'{where}': label '{item['name']}' has an impossible expected volume {expected}")
        labels.append(Label(value, str(item["name"]), color, expected))
    return tuple(labels)


def _upgrade_v1(data: dict) -> dict:
    """A version-1 card (flat fields, napari-medseg 0.1) in the version-2 layout."""
    post = data.get("postprocessing") or {}
    normalisation = dict(data.get("normalisation") or {})
    normalisation.setdefault("statistics", "field_of_view")
    return {
        **data,
        "network": {"architecture": data.get("architecture"), "hparams": data.get("hparams")},
        "domain": {"modality": data.get("modality", "any")},
        "pipeline": {
            "axis_order": "SPL",
            "roi": {"kind": "none"},
            "grid": {"kind": "spacing", "spacing": data.get("target_spacing"), "interpolation": "area"},
            "normalisation": normalisation,
            "patch_size": data.get("patch_size"),
            "output": "logits",
            "postprocessing": [step for step, on in post.items() if on] if isinstance(post, dict) else list(post),
        },
        "explain": explain_methods_for(data.get("architecture")),
    }


def _choice(value, allowed: tuple, what: str, where: str):
    if value not in allowed:
        raise ModelError(f"'{where}': {what} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _pipeline(raw, where: str) -> Pipeline:
    if not isinstance(raw, dict):
        raise ModelError(f"'{where}': the card has no pipeline")
    roi_raw = raw.get("roi") or {"kind": "none"}
    roi = RegionOfInterest(
        kind=_choice(roi_raw.get("kind", "none"), ROI_KINDS, "the region of interest", where),
        margin_mm=float(roi_raw.get("margin_mm", 0.0)),
        margin_fraction=float(roi_raw.get("margin_fraction", 0.0)),
        input_shape=_positive(roi_raw["input_shape"], "the first stage's input shape", where, integer=True)
        if roi_raw.get("input_shape") is not None else None,
        threshold=float(roi_raw.get("threshold", 0.5)),
    )
    if roi.margin_mm < 0 or roi.margin_fraction < 0:
        raise ModelError(f"'{where}': the region's margin cannot be negative")
    if roi.kind == "network" and roi.input_shape is None:
        raise ModelError(f"'{where}': a first-stage network needs its input shape")
    grid_raw = raw.get("grid") or {}
    kind = _choice(grid_raw.get("kind"), GRID_KINDS, "the grid kind", where)
    separate_z = grid_raw.get("separate_z")
    grid = Grid(
        kind=kind,
        spacing=_positive(grid_raw.get("spacing"), "the voxel size (target spacing)", where)
        if kind == "spacing" else None,
        shape=_positive(grid_raw.get("shape"), "the grid shape", where, integer=True) if kind == "shape" else None,
        interpolation=_choice(grid_raw.get("interpolation", "area"), INTERPOLATIONS, "the interpolation", where),
        order=int(grid_raw.get("order", 3)), order_z=int(grid_raw.get("order_z", 0)),
        back_order=int(grid_raw.get("back_order", 1)), back_order_z=int(grid_raw.get("back_order_z", 0)),
        separate_z=None if separate_z is None else bool(separate_z),
        anisotropy_threshold=float(grid_raw.get("anisotropy_threshold", 3.0)),
    )
    if grid.interpolation == "spline" and not (0 <= grid.order <= 5 and grid.order_z in (0, 1)
                                               and grid.back_order in (0, 1) and grid.back_order_z in (0, 1)):
        raise ModelError(f"'{where}': spline resampling takes order 0-5, and orders 0 or 1 across the "
                         "anisotropic axis and back onto the scan")
    normalisation = _normalisation(raw.get("normalisation"), where)
    channel_normalisations = tuple(_normalisation(n, where) for n in raw.get("channel_normalisations") or ())
    threshold = raw.get("threshold")
    if threshold is not None and not 0 < float(threshold) < 1:
        raise ModelError(f"'{where}': the threshold must lie between 0 and 1, got {threshold}")
    post = tuple(raw.get("postprocessing") or ())
    for step in post:
        _choice(step, POSTPROCESSING, "a post-processing step", where)
    windows_raw = raw.get("windows") or {}
    windows = Windows(
        plan=_choice(windows_raw.get("plan", "ours"), WINDOW_PLANS, "the window plan", where),
        step=float(windows_raw.get("step", 0.5)), pad_value=float(windows_raw.get("pad_value", 0.0)),
        mirror_axes=tuple(int(a) for a in windows_raw.get("mirror_axes") or ()),
        mirror_by_default=bool(windows_raw.get("mirror_by_default", False)),
        blend_dtype=_choice(windows_raw.get("blend_dtype", "float32"), ("float32", "float16"),
                            "the blending precision", where),
        blend_folds_apart=bool(windows_raw.get("blend_folds_apart", False)),
    )
    if not 0 < windows.step <= 1 or any(a not in (0, 1, 2) for a in windows.mirror_axes):
        raise ModelError(f"'{where}': the window step must lie in (0, 1] and mirror axes be 0, 1 or 2")
    kind = _choice(raw.get("kind", "ours"), PIPELINE_KINDS, "the pipeline kind", where)
    bundle = raw.get("bundle") if kind == "monai_bundle" else None
    if kind == "monai_bundle" and not (isinstance(bundle, dict) and "preprocessing" in bundle and "inferer" in bundle):
        raise ModelError(f"'{where}': a MONAI bundle's pipeline needs its preprocessing and inferer")
    parts = _parts(raw.get("parts") or (), where)
    axis_order = raw.get("axis_order", "SPL")
    if axis_order_error(axis_order):
        raise ModelError(f"'{where}': {axis_order_error(axis_order)}")
    return Pipeline(
        axis_order=axis_order,
        roi=roi, grid=grid, normalisation=normalisation,
        patch_size=_positive(raw.get("patch_size"), "the patch size", where, integer=True),
        output=_choice(raw.get("output", "logits"), OUTPUTS, "the network output", where),
        threshold=None if threshold is None else float(threshold),
        postprocessing=post, windows=windows, normalise_first=bool(raw.get("normalise_first", False)),
        kind=kind, bundle=bundle, parts=parts, channel_normalisations=channel_normalisations,
        regions=tuple(int(v) for v in raw.get("regions") or ()), file_order=bool(raw.get("file_order", False)),
    )


def _normalisation(norm_raw, where: str) -> Normalisation:
    norm_raw = norm_raw or {}
    norm_kind = _choice(norm_raw.get("kind"), NORMALISATIONS, "the intensity normalisation", where)
    window = None
    if norm_kind in ("ct", "ct_zscore"):
        window = tuple(float(v) for v in norm_raw.get("window", (-1000.0, 1000.0)))
        if len(window) != 2 or window[0] >= window[1]:
            raise ModelError(f"'{where}': the CT window must be [low, high] with low < high")
    quantiles = tuple(float(v) for v in norm_raw.get("quantiles", (0.5, 99.5)))
    if len(quantiles) != 2 or not 0 <= quantiles[0] < quantiles[1] <= 100:
        raise ModelError(f"'{where}': the normalisation quantiles must be two percentiles, low < high")
    normalisation = Normalisation(
        kind=norm_kind, window=window, quantiles=quantiles,
        mean=float(norm_raw.get("mean", 0.0)), std=float(norm_raw.get("std", 1.0)),
        statistics=_choice(norm_raw.get("statistics", "region"), STATISTICS, "the statistics' source", where),
        use_mask=bool(norm_raw.get("use_mask", False)),
    )
    if normalisation.std <= 0:
        raise ModelError(f"'{where}': the normalisation SD must be positive")
    return normalisation


def _parts(raw, where: str) -> tuple:
    """Each part's class-to-label table; a part's classes run 0..N-1, its background first."""
    try:
        parts = tuple(tuple((int(a), int(b)) for a, b in table) for table in raw)
    except (TypeError, ValueError):
        raise ModelError(f"'{where}': the pipeline's parts must list [class, label] pairs") from None
    for index, table in enumerate(parts):
        if [a for a, _ in table] != list(range(len(table))) or (table and table[0][1] != 0):
            raise ModelError(f"'{where}': part {index + 1}'s classes must run 0..N-1 with background 0 first")
    return parts


def parse_card(data, where: str) -> ModelCard:
    """Validate a card read from a file (any supported format version) into a :class:`ModelCard`."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelError(f"'{where}' is not a napari-medseg model (no model card in the file)")
    version = data.get("format_version", 1)
    if version == 1:
        data = _upgrade_v1(data)
    elif version != FORMAT_VERSION:
        raise ModelError(f"'{where}' was written by a newer napari-medseg (model format {version}); "
                         "update napari-medseg to use it")
    missing = [key for key in ("name", "version", "network", "labels", "pipeline") if key not in data]
    if missing:
        raise ModelError(f"'{where}' has an incomplete model card: missing {', '.join(missing)}")
    if not NAME_PATTERN.match(str(data["name"])):
        raise ModelError(f"'{where}' has an invalid model name {data['name']!r}")
    network = NetworkSpec.parse(data["network"], where)
    regions = (data.get("pipeline") or {}).get("regions") or ()
    written = ((data.get("pipeline") or {}).get("bundle") or {}).get("label_values")
    labels = _labels(data["labels"], where, gaps=bool(regions) or written is not None)
    outputs = len(regions) if regions else len(labels)     # regions: no background output
    if written is not None:   # a bundle whose postprocessing writes the labels from its regions
        if sorted(int(v) for v in written) != sorted(label.value for label in labels):
            raise ModelError(f"'{where}': the bundle writes the labels {written}, which the card must name")
    elif network.hparams.get("out_channels") != outputs:
        raise ModelError(f"'{where}': the network has {network.hparams.get('out_channels')} outputs "
                         f"but the card names {outputs} {'regions' if regions else 'labels'}")
    if regions and sorted({int(v) for v in regions} | {0}) != sorted(label.value for label in labels):
        raise ModelError(f"'{where}': the regions write the values {list(regions)}, which the labels must name")
    channels = tuple(str(c) for c in data.get("channels") or ("image",))
    if int(network.hparams.get("in_channels", len(channels))) != len(channels):
        raise ModelError(f"'{where}': the network takes {network.hparams.get('in_channels')} input channels "
                         f"but the card names {len(channels)} ({', '.join(channels)})")
    pipeline = _pipeline(data["pipeline"], where)
    if pipeline.channel_normalisations and len(pipeline.channel_normalisations) != len(channels):
        raise ModelError(f"'{where}': the pipeline normalises {len(pipeline.channel_normalisations)} channels "
                         f"but the card names {len(channels)}")
    if pipeline.parts:
        part_specs = network.hparams.get("parts") or []
        values = {label.value for label in labels}
        if len(part_specs) != len(pipeline.parts) or any(
                int(spec.get("out_channels", -1)) != len(table) for spec, table in zip(part_specs, pipeline.parts)):
            raise ModelError(f"'{where}': the network's parts do not match the pipeline's parts")
        if any(label not in values for table in pipeline.parts for _, label in table):
            raise ModelError(f"'{where}': a part maps a class onto a label the card does not name")
    roi_network = NetworkSpec.parse(data["roi_network"], where, "first-stage network") \
        if data.get("roi_network") else None
    if pipeline.roi.kind == "network" and roi_network is None:
        raise ModelError(f"'{where}': the pipeline names a first-stage network that the file does not hold")
    domain_raw = data.get("domain") or {}
    checks_raw = data.get("checks") or {}
    explain = tuple(data.get("explain") or ())
    for method in explain:
        _choice(method, EXPLAIN_METHODS, "an explanation method", where)
    return ModelCard(
        name=str(data["name"]), version=str(data["version"]), network=network, labels=labels,
        domain=Domain(str(domain_raw.get("modality") or "any"), domain_raw.get("contrast"),
                      domain_raw.get("body_part"), str(domain_raw.get("description") or "")),
        pipeline=pipeline, roi_network=roi_network,
        checks=Checks(checks_raw.get("max_foreground_ml"), checks_raw.get("max_body_fraction")),
        explain=explain, provenance=dict(data.get("provenance") or {}), metrics=dict(data.get("metrics") or {}),
        licence=data.get("licence"), citation=data.get("citation"),
        content_sha256=data.get("content_sha256"),
        channels=channels,
    )


def evaluation_rows(card: ModelCard) -> list:
    """The held-out evaluation stored in the card (``benchmarks/eval_brain_model.py --write-cards``)."""
    return list((card.metrics or {}).get("evaluation") or [])


LOSS_MARGIN = 0.005


def losing_rows(card: ModelCard, margin: float = LOSS_MARGIN) -> list:
    """Evaluation rows where the model loses: below its peer's Dice on the same scan by more than ``margin``."""
    return [row for row in evaluation_rows(card)
            if row.get("deepbet_package_dice") is not None and row["dice"] < row["deepbet_package_dice"] - margin]


def where_it_loses(card: ModelCard) -> list:
    """Lines that say where the model is weakest: rows that lose to the peer, and its three lowest rows."""
    rows = evaluation_rows(card)
    if not rows:
        return []
    lines = []
    if any(row.get("deepbet_package_dice") is not None for row in rows):
        losses = losing_rows(card)
        lines.append(f"Rows where its Dice is more than {LOSS_MARGIN} below deepbet's own package on the same scan:")
        lines += [f"  {row['head']} / {row['copy']}: {row['dice']:.4f} against {row['deepbet_package_dice']:.4f}"
                  for row in losses] or ["  none"]
    lines.append("Its lowest Dice:")
    lines += [f"  {row['head']} / {row['copy']}: {row['dice']:.4f}"
              for row in sorted(rows, key=lambda row: row["dice"])[:3]]
    return lines


def card_text(card: ModelCard) -> str:
    """A model card for people to read (``napari-medseg models show``): what it is for, what it
    was trained on, its licence and citation, its evaluation, and where it loses."""
    provenance = card.provenance or {}
    training = provenance.get("training_data") or provenance.get("data") or "-"
    domain = card.domain
    lines = [
        f"{card.title}",
        f"  intended use:   {domain.description or '-'} "
        f"({domain.modality}{' ' + domain.contrast if domain.contrast else ''}"
        f"{', ' + domain.body_part if domain.body_part else ''})",
        f"  labels:         {', '.join(f'{label.value} {label.name}' for label in card.labels)}",
        f"  training data:  {training}",
        f"  source:         {provenance.get('source') or provenance.get('weights') or '-'}",
        f"  licence:        {card.licence or '-'}",
        f"  citation:       {card.citation or '-'}",
        f"  network:        {card.network.architecture}"
        + (f" (first stage {card.roi_network.architecture})" if card.roi_network else ""),
        f"  explanation:    {', '.join(card.explain) or '-'}",
        f"  content hash:   {card.content_sha256 or '-'}",
    ]
    rows = evaluation_rows(card)
    if not rows:
        lines += ["", "evaluation: none stored in this card"]
    else:
        metrics = card.metrics
        lines += ["", f"evaluation ({metrics.get('date', 'undated')}, {metrics.get('method', '-')}, "
                      f"{metrics.get('machine', '-')}):",
                  f"  {'scan':<40} {'copy':<38} {'Dice':>7} {'peer':>7} {'s':>6}"]
        for row in rows:
            peer = row.get("deepbet_package_dice")
            lines.append(f"  {row['head'][:40]:<40} {row['copy'][:38]:<38} {row['dice']:7.4f} "
                         f"{'' if peer is None else format(peer, '7.4f'):>7} {row.get('seconds', 0):6.1f}")
        lines += ["", "where it loses:"] + ["  " + line for line in where_it_loses(card)]
    return "\n".join(lines)
