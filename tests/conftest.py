"""Shared fixtures: real NIfTI/NRRD/DICOM files written to a temporary folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.core.geometry import axis_rotation

os.environ.setdefault("QT_API", "pyqt5")
# napari's settings (reader preferences among them) in a file of this test process, never the user's.
os.environ["NAPARI_CONFIG"] = os.path.join(tempfile.mkdtemp(prefix="napari-settings-"), "settings.yaml")
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _own_home(tmp_path_factory, monkeypatch):
    """Each test gets its own napari-medseg home (models, workspace, autosaves), never the user's."""
    if "NAPARI_MEDSEG_HOME" not in os.environ:
        monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path_factory.mktemp("home")))


def closed_by_user(viewer) -> None:
    """Finish napari's bookkeeping after a window was closed as its X button closes it.

    Qt6 bindings delete the closed main window (and its QtViewer) at once, and napari's own
    ``viewer.close()``, which ``make_napari_viewer`` calls at teardown, would then touch the
    deleted QtViewer; napari alone does the same. With PyQt5 the objects stay and nothing is needed.
    """
    from qtpy.QtCore import QCoreApplication, QEvent

    window = viewer.window
    if not hasattr(window, "_qt_window"):
        return
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    try:
        window._qt_viewer.objectName()
    except RuntimeError:  # deleted by Qt
        window._teardown()
        del window._qt_window


def answer_question(qtbot, answer: str, timeout: int = 10000):
    """Click ``answer`` on the next question box napari-medseg shows, as a user would."""
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication, QMessageBox

    import time

    asked = []
    deadline = time.monotonic() + timeout / 1000

    def click():
        box = QApplication.activeModalWidget()
        if isinstance(box, QMessageBox):
            for button in box.buttons():
                if button.text() == answer:
                    asked.append(box.text())
                    button.click()
                    return
        if time.monotonic() < deadline:
            QTimer.singleShot(50, click)

    QTimer.singleShot(50, click)
    return asked


def make_affine(linear: np.ndarray, spacing, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(linear) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


# Direction matrices a scanner can produce: axial, sagittal (permuted), flipped, oblique.
AFFINES = {
    "ras": make_affine(np.eye(3), (0.9, 1.1, 2.5), (-40, -60, -30)),
    "las_flipped": make_affine(np.diag([-1, 1, 1]), (1.0, 1.0, 1.5), (40, -50, -20)),
    "sagittal_permuted": make_affine(np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]]), (0.8, 1.2, 3.0), (30, -70, 60)),
    "coronal_permuted": make_affine(np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]]), (1.0, 2.0, 1.0), (-30, 10, 40)),
    "oblique": make_affine(axis_rotation(0, 17) @ axis_rotation(2, -23), (1.0, 1.3, 2.0), (-35, -45, -25)),
    "oblique_permuted": make_affine(axis_rotation(1, 31) @ np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]]), (1.5, 0.7, 1.0), (12, -8, 5)),
}


def random_volume(shape=(20, 24, 16), seed=0, dtype=np.int16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 2000, size=shape).astype(dtype)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, qform_code=1, sform_code=1) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=qform_code)
    img.set_sform(affine, code=sform_code)
    nib.save(img, str(path))
    return path


@pytest.fixture
def nifti_factory(tmp_path):
    def make(name="scan.nii.gz", affine="oblique", shape=(20, 24, 16), data=None, **kw):
        aff = AFFINES[affine] if isinstance(affine, str) else affine
        arr = random_volume(shape) if data is None else data
        return write_nifti(tmp_path / name, arr, aff, **kw)

    return make


def write_dicom_series(folder: Path, data_kji: np.ndarray, origin, spacing, direction,
                       series_uid="1.2.826.0.1.3680043.2.1125.1", series_number="3",
                       patient_name="DOE^JOHN", positions=None, modality="CT") -> Path:
    """Write a real DICOM series with SimpleITK (GDCM), one file per slice.

    ``positions``: optional per-slice index (float) along the slice normal, to make gaps.
    """
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n_slices = data_kji.shape[0]
    positions = np.arange(n_slices, dtype=float) if positions is None else np.asarray(positions, float)
    for k in range(n_slices):
        slice_img = sitk.GetImageFromArray(data_kji[k:k + 1])
        slice_img.SetSpacing([float(s) for s in spacing])
        slice_img.SetDirection(direction.ravel().tolist())
        pos = np.asarray(origin, float) + direction[:, 2] * spacing[2] * positions[k]
        slice_img.SetOrigin(pos.tolist())
        tags = {
            "0010|0010": patient_name,
            "0010|0020": "PID-12345",
            "0010|0030": "19610203",
            "0008|0060": modality,
            "0020|000e": series_uid,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.99",
            "0020|0011": series_number,
            "0008|103e": "AX SERIES",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in pos),
            "0020|0037": "\\".join(f"{v:.6f}" for v in np.concatenate([direction[:, 0], direction[:, 1]])),
            "0028|1053": "1",
            "0028|1052": "-1024",
            "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
        }
        for tag, value in tags.items():
            slice_img.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:04d}.dcm"))
        writer.Execute(slice_img)
    return folder


BRAIN_MASK = Path(__file__).parent / "data" / "MNI152_T1_2mm_brain_mask.nii.gz"


def card_dict(name="tiny", version="1.0.0", classes=2, channels=(4, 8), architecture="AttentionUNet3D",
              patch=(16, 16, 16), spacing=(2.0, 2.0, 2.0), **pipeline) -> dict:
    """A model card (format 2) for a small test network; ``pipeline`` overrides its steps."""
    names = ["background", "lesion", "organ", "other"][:classes]
    return {
        "format": "napari-medseg-model", "format_version": 2, "name": name, "version": version,
        "network": {"architecture": architecture,
                    "hparams": {"in_channels": 1, "out_channels": classes, "channels": list(channels)}},
        "labels": [{"value": i, "name": n, "color": [1, 0, 0, 1]} for i, n in enumerate(names)],
        "domain": {"modality": "MR"},
        "pipeline": {"axis_order": "SPL", "roi": {"kind": "none"},
                     "grid": {"kind": "spacing", "spacing": list(spacing), "interpolation": "area"},
                     "normalisation": {"kind": "mr_robust_zscore", "statistics": "region"},
                     "patch_size": list(patch), "output": "logits", **pipeline},
        "provenance": {"data": "unit test"}, "metrics": {},
    }


def make_card(**kwargs):
    from napari_medseg.core.card import parse_card

    return parse_card(card_dict(**kwargs), kwargs.get("name", "tiny"))


def head_copy(kind: str):
    """The sample head and its brain mask on another grid: (image, mask) nibabel images.

    ``permuted``: same voxels, axes permuted and flipped (a sagittal-style file).
    ``oblique``: resampled onto a rotated, anisotropic, shifted grid.
    ``thick``: 1 mm in-plane, 5 mm slices (a clinical axial series).
    """
    from nibabel.processing import resample_from_to

    from napari_medseg.viewer._sample import sample_path

    head = nib.load(sample_path())
    mask = nib.load(BRAIN_MASK)
    if kind == "permuted":
        data = np.flip(np.transpose(np.asarray(head.dataobj), (2, 0, 1)), 0)
        labels = np.flip(np.transpose(np.asarray(mask.dataobj), (2, 0, 1)), 0)
        base = head.affine[:, [2, 0, 1, 3]].copy()
        base[:, 0] *= -1
        base[:3, 3] = head.affine[:3, 3] + head.affine[:3, 2] * (data.shape[0] - 1)
        base[:3, 3] += (60.0, -35.0, 20.0)  # shifted in the scanner, too
        return nib.Nifti1Image(data.copy(), base), nib.Nifti1Image(labels.astype(np.uint8), base)
    if kind == "oblique":
        linear, spacing = axis_rotation(0, 25) @ axis_rotation(2, -20), (1.6, 1.3, 1.8)
    elif kind == "thick":
        linear, spacing = np.eye(3), (1.0, 1.0, 5.0)
    else:
        raise ValueError(kind)
    centre = head.affine @ np.r_[(np.array(head.shape) - 1) / 2, 1]
    shape = tuple(int(np.ceil(230 / s)) for s in spacing)
    affine = make_affine(linear, spacing, (0, 0, 0))
    affine[:3, 3] = centre[:3] - affine[:3, :3] @ ((np.array(shape) - 1) / 2) + (25.0, -40.0, 15.0)
    shifted_head = nib.Nifti1Image(np.asarray(head.dataobj, dtype=np.float32), head.affine.copy())
    shifted_head.affine[:3, 3] += (25.0, -40.0, 15.0)
    shifted_mask = nib.Nifti1Image(np.asarray(mask.dataobj, dtype=np.float32), mask.affine.copy())
    shifted_mask.affine[:3, 3] += (25.0, -40.0, 15.0)
    image = resample_from_to(nib.Nifti1Image(shifted_head.get_fdata(), shifted_head.affine), (shape, affine), order=1)
    labels = resample_from_to(nib.Nifti1Image(shifted_mask.get_fdata(), shifted_mask.affine), (shape, affine), order=1)
    return (nib.Nifti1Image(image.get_fdata().astype(np.float32), affine),
            nib.Nifti1Image((labels.get_fdata() > 0.5).astype(np.uint8), affine))


def sphere_case(seed: int, shape=(32, 32, 32), spacing=2.0):
    """A noisy image of a bright sphere and its label: (image float32, label uint8, affine)."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape)
    centre = rng.uniform(12, 20, 3)
    radius = rng.uniform(5, 8)
    label = (np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) < radius).astype(np.uint8)
    image = (rng.normal(100, 12, shape) + 180 * label).astype(np.float32)
    return image, label, np.diag([spacing, spacing, spacing, 1.0])


def write_sphere_scans(folder: Path, count: int, first_seed: int = 0) -> Path:
    """``count`` sphere scans as ``case00.nii.gz``, ... in ``folder`` (six distinct ones, repeating)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        image, _, affine = sphere_case((first_seed + n) % 6)
        write_nifti(folder / f"case{n:02d}.nii.gz", image, affine)
    return folder


@pytest.fixture(scope="session")
def sphere_model(tmp_path_factory):
    """A small attention U-Net trained on spheres (real training, a few seconds), saved as a model file."""
    import torch

    from napari_medseg.core.geometry import voxel_spacing
    from napari_medseg.core.models import save_model
    from napari_medseg.core.network import AttentionUNet3D
    from napari_medseg.core.training import Augmentation, ScanCase, TrainingConfig, grid_case, train

    torch.manual_seed(0)
    network = AttentionUNet3D(1, 2, (4, 8, 16))
    card = make_card(name="spheres", version="1.0.0", channels=(4, 8, 16), patch=(16, 16, 16),
                     roi={"kind": "none"})
    cases = []
    for seed in range(4):
        image, label, affine = sphere_case(seed)
        cases.append(grid_case(ScanCase(f"s{seed}", image, label, affine), card))
    config = TrainingConfig(steps=60, batch_size=2, patch_size=(16, 16, 16), learning_rate=1e-2, device="cpu",
                            augmentation=Augmentation(max_rotation_deg=5, max_shift_mm=6))
    train(network, card, cases, config)
    path = tmp_path_factory.mktemp("models") / "spheres.safetensors"
    save_model(path, network, card, half_precision=False)
    assert voxel_spacing(np.eye(4)) == (1.0, 1.0, 1.0)
    return path


def world_sphere(shape, affine, centre_ras, radius_mm):
    """The voxels (file order) whose centres lie within ``radius_mm`` of ``centre_ras``."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    ras = ijk @ affine[:3, :3].T + affine[:3, 3]
    return (np.linalg.norm(ras - centre_ras, axis=1) < radius_mm).reshape(shape)


def oblique_sphere_scan(folder: Path, shape=(56, 44, 30)):
    """A 14 mm sphere of another intensity, with noise, on an oblique 1 x 1.3 x 2 mm grid:
    ``(path, truth in file order, centre RAS, affine)``."""
    affine = AFFINES["oblique"]
    centre = affine[:3, :3] @ (np.array(shape) / 2) + affine[:3, 3]
    truth = world_sphere(shape, affine, centre, 14.0)
    rng = np.random.default_rng(3)
    image = np.where(truth, 140.0, 60.0) + rng.normal(0, 12, shape)
    path = write_nifti(folder / "scan.nii.gz", image.astype(np.float32), affine)
    return path, truth, centre, affine
