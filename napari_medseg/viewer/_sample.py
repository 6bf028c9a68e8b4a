"""Sample data: a real T1-weighted head MRI (see README, 'Sample data')."""

from __future__ import annotations

from importlib.resources import files

from ._layers import volume_to_layer_data
from ..core.io import read_volume


def sample_path() -> str:
    return str(files("napari_medseg") / "data" / "MNI152_T1_2mm.nii.gz")


def make_mni152_t1():
    volume = read_volume(sample_path())
    return [volume_to_layer_data(volume, name="MNI152 T1 head")]
