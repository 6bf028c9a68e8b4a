"""napari-medseg: 3D medical image segmentation for radiologists in napari."""

__version__ = "0.2.0"
