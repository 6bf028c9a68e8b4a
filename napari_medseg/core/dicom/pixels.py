"""Pixels: one slice's stored values, decoded and rescaled.

Uncompressed pixel data is read straight from the file offset that discovery kept (no
second header parse). Compressed transfer syntaxes (JPEG, JPEG 2000, RLE, deflate)
are decoded by GDCM through SimpleITK. RescaleSlope and RescaleIntercept are applied,
so CT arrives in Hounsfield units.
"""

from __future__ import annotations

import numpy as np

from ..privacy import native_messages, quiet_simpleitk
from .discovery import NATIVE_SYNTAXES, Instance


class PixelError(Exception):
    """A slice whose pixels cannot be read; the message says why, for the user."""


def _native(instance: Instance) -> np.ndarray:
    if instance.samples != 1:
        raise PixelError("it is a colour image")
    if instance.bits_allocated not in (8, 16, 32):
        raise PixelError(f"it stores {instance.bits_allocated}-bit pixels")
    kind = ("i" if instance.signed else "u") + str(instance.bits_allocated // 8)
    dtype = np.dtype(NATIVE_SYNTAXES[instance.transfer_syntax] + kind)
    count = instance.rows * instance.columns
    wanted = count * dtype.itemsize
    with open(instance.path, "rb") as handle:
        handle.seek(instance.pixel_offset)
        raw = handle.read(wanted)
    if len(raw) < wanted:
        raise PixelError(f"its pixel data is truncated ({len(raw)} of {wanted} bytes)")
    values = np.frombuffer(raw, dtype=dtype).reshape(instance.rows, instance.columns)
    values = values.astype(dtype.newbyteorder("="), copy=False)
    if instance.signed and instance.bits_stored < instance.bits_allocated:
        # Sign-extend values stored in fewer bits than allocated (e.g. 12 of 16).
        shift = instance.bits_allocated - instance.bits_stored
        values = (values.astype(np.int32) << shift).astype(values.dtype) >> shift
    return values


def _through_gdcm(instance: Instance) -> np.ndarray:
    sitk = quiet_simpleitk()
    try:
        with native_messages():
            image = sitk.ReadImage(str(instance.path))
    except RuntimeError:
        raise PixelError("its compressed pixel data could not be decoded") from None
    array = sitk.GetArrayFromImage(image)
    if array.ndim == 3:
        array = array[0]
    if array.shape != (instance.rows, instance.columns):
        raise PixelError(f"it decodes to {array.shape} pixels, not {instance.rows} x {instance.columns}")
    return array  # GDCM has applied the rescale already


def read_slice(instance: Instance) -> np.ndarray:
    """A slice ``(rows, columns)`` in real-world values (float32, or the stored integers when the
    rescale is the identity)."""
    try:
        if not instance.native_pixels:
            return _through_gdcm(instance)
        values = _native(instance)
    except OSError as exc:
        raise PixelError(f"it could not be read ({exc.strerror or exc})") from None
    if instance.slope == 1.0 and instance.intercept == 0.0:
        return values
    if instance.slope == 1.0 and float(instance.intercept).is_integer():
        return values.astype(np.int32) + int(instance.intercept)  # integers stay integers (CT in HU)
    return values.astype(np.float32) * np.float32(instance.slope) + np.float32(instance.intercept)
