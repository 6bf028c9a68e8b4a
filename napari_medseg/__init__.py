"""napari-medseg: 3D medical image segmentation for radiologists in napari."""

__version__ = "0.1.0"
