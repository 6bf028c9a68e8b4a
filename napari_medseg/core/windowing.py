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
