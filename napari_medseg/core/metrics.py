"""Overlap metrics: the one Dice used by tests, training, the gate and the benchmarks."""

from __future__ import annotations

import numpy as np


def dice(prediction: np.ndarray, reference: np.ndarray, value: int | None = 1) -> float:
    """Dice overlap of one label (``value``), or of all foreground (``value=None``); 1.0 when both are empty."""
    a = np.asarray(prediction)
    b = np.asarray(reference)
    a, b = (a != 0, b != 0) if value is None else (a == value, b == value)
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def mean_dice(prediction: np.ndarray, reference: np.ndarray, n_classes: int) -> float:
    """Mean Dice over the foreground labels 1..n_classes-1."""
    return float(np.mean([dice(prediction, reference, value) for value in range(1, n_classes)]))
