"""Window/level presets: CT in Hounsfield units, MR by percentiles."""

from __future__ import annotations

import numpy as np

# (width, level) in HU; values as commonly taught (e.g. Radiopaedia's tables).
CT_PRESETS = {
    "CT brain": (80, 40),
    "CT subdural": (215, 75),
    "CT stroke": (40, 40),
    "CT bone": (1800, 400),
    "CT lung": (1500, -600),
    "CT soft tissue": (400, 50),
    "CT liver": (150, 30),
}
MR_AUTO = "MR auto (percentiles)"
PRESET_NAMES = tuple(CT_PRESETS) + (MR_AUTO,)


def window_to_limits(width: float, level: float) -> tuple[float, float]:
    return level - width / 2.0, level + width / 2.0


def auto_window(data: np.ndarray, lower: float = 0.5, upper: float = 99.5,
                max_voxels: int = 1_000_000) -> tuple[float, float]:
    """Percentile window over non-background voxels of a strided subsample."""
    step = max(1, int(np.ceil((data.size / max_voxels) ** (1 / data.ndim))))
    sample = np.asarray(data[(slice(None, None, step),) * data.ndim], dtype=np.float32).ravel()
    foreground = sample[sample > sample.min()]
    if foreground.size < 16:
        foreground = sample
    lo, hi = np.percentile(foreground, [lower, upper])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def preset_limits(name: str, data: np.ndarray | None = None) -> tuple[float, float]:
    """Contrast limits for a preset name; ``MR auto`` needs the data."""
    if name in CT_PRESETS:
        return window_to_limits(*CT_PRESETS[name])
    if name == MR_AUTO:
        if data is None:
            raise ValueError("MR auto-windowing needs the image data")
        return auto_window(data)
    raise KeyError(f"unknown window preset '{name}'; choose from {', '.join(PRESET_NAMES)}")


def default_preset(modality: str) -> str:
    return "CT soft tissue" if modality.upper().startswith("CT") else MR_AUTO


# Words in label names that pick a CT model's reading window (checked in this order).
_LUNG_WORDS = ("lung", "airway", "trachea", "bronch", "nodule")
_BONE_WORDS = ("bone", "vertebra", "rib", "skull", "femur", "humerus", "pelvis", "sacrum", "spine", "clavicula",
               "scapula", "sternum", "hip", "costal")
_BRAIN_WORDS = ("brain", "hemorrhage", "haemorrhage", "bleed", "ventricle")


def preset_for_model(modality: str, label_names) -> str | None:
    """The window a CT model's result is read in, from the card: lung labels in the lung
    window, bone labels alone in the bone window, brain labels in the brain window, other
    CT models in the soft-tissue window. None for models that are not CT models."""
    if not str(modality).upper().startswith("CT"):
        return None
    names = [str(n).lower() for v, n in dict(label_names).items() if int(v) != 0]
    if any(word in name for name in names for word in _LUNG_WORDS) and len(names) <= 8:
        return "CT lung"
    if names and all(any(word in name for word in _BONE_WORDS) for name in names):
        return "CT bone"
    if names and all(any(word in name for word in _BRAIN_WORDS) for name in names):
        return "CT brain"
    return "CT soft tissue"
