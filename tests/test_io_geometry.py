"""Geometry: every voxel lands at its patient-space position, and masks go back exactly."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from napari.layers import Layer

from conftest import AFFINES, NIBABEL_DATA, random_volume, write_dicom_series, write_nifti
from napari_medseg.viewer._layers import volume_to_layer_data
from napari_medseg.viewer._sample import sample_path
from napari_medseg.core.geometry import RAS_TO_LPS, ScanGeometry
from napari_medseg.core.io import read_volume, write_mask

NIBABEL_FILES = ["anatomical.nii", "standard.nii.gz", "example_nifti2.nii.gz",
                 "reoriented_anat_moved.nii", "resampled_anat_moved.nii"]


def ras_to_world(ras: np.ndarray) -> np.ndarray:
    """The documented convention: napari world = LPS (z, y, x)."""
    x, y, z = ras
    return np.array([z, -y, -x])


def layer_index_of(geometry: ScanGeometry, ijk) -> np.ndarray:
    """Find where file voxel ijk lands in the layer array by marking it."""
    marker = np.zeros(geometry.file_shape, dtype=np.uint8)
    marker[tuple(ijk)] = 1
    return np.argwhere(geometry.to_layer(marker))[0]


def sample_voxels(shape, n=12, seed=0):
    rng = np.random.default_rng(seed)
    corners = [(0, 0, 0), tuple(s - 1 for s in shape)]
    return corners + [tuple(int(rng.integers(0, s)) for s in shape) for _ in range(n)]


def assert_world_matches_nibabel(path, nib_affine=None):
    is_4d = len(nib.load(str(path)).shape) > 3
    volume = read_volume(path, volume_index=1 if is_4d else None)
    data, kwargs, kind = volume_to_layer_data(volume)
    layer = Layer.create(data, kwargs, kind)
    affine = nib.load(str(path)).affine if nib_affine is None else nib_affine
    for ijk in sample_voxels(volume.geometry.file_shape):
        expected = ras_to_world(nib.affines.apply_affine(affine, ijk))
        got = np.asarray(layer.data_to_world(layer_index_of(volume.geometry, ijk)))
        np.testing.assert_allclose(got, expected, atol=1e-4)
        # The layer shows the very voxel the file holds at ijk.
        assert layer.data[tuple(layer_index_of(volume.geometry, ijk))] == volume.data[ijk]
    if is_4d:
        np.testing.assert_array_equal(volume.data, np.asanyarray(nib.load(str(path)).dataobj)[..., 1])


@pytest.mark.parametrize("name", NIBABEL_FILES)
def test_nibabel_bundled_images_land_where_nibabel_puts_them(name):
    assert_world_matches_nibabel(NIBABEL_DATA / name)


def test_sample_scan_world_coordinates():
    assert_world_matches_nibabel(sample_path())


@pytest.mark.parametrize("affine_name", sorted(AFFINES))
def test_generated_oblique_and_permuted_affines(tmp_path, affine_name):
    path = write_nifti(tmp_path / f"{affine_name}.nii.gz", random_volume(), AFFINES[affine_name])
    assert_world_matches_nibabel(path)


@pytest.mark.parametrize("affine_name", ["ras", "sagittal_permuted", "las_flipped"])
def test_axis_aligned_scans_get_a_diagonal_layer_affine(tmp_path, affine_name):
    """Permuted and flipped scans are re-ordered (not resampled) so 2D slices are exact."""
    path = write_nifti(tmp_path / "s.nii.gz", random_volume(), AFFINES[affine_name])
    world = read_volume(path).geometry.world_affine
    off_diagonal = world[:3, :3] - np.diag(np.diag(world[:3, :3]))
    assert np.abs(off_diagonal).max() < 1e-9
    assert np.all(np.diag(world)[:3] > 0)


@pytest.mark.parametrize("affine_name", sorted(AFFINES))
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_round_trip_nifti_scan_to_mask_keeps_geometry(tmp_path, affine_name, suffix):
    src = write_nifti(tmp_path / "scan.nii.gz", random_volume(), AFFINES[affine_name], qform_code=1, sform_code=2)
    volume = read_volume(src)
    mask_layer = (volume.layer_data() > 500).astype(np.uint8)
    mask_layer[0, 0, 0] = 3
    out = write_mask(tmp_path / f"mask{suffix}", mask_layer, volume.geometry)
    back = read_volume(out)
    assert back.is_label_map
    np.testing.assert_array_equal(back.layer_data(), mask_layer)
    np.testing.assert_allclose(back.geometry.world_affine, volume.geometry.world_affine, atol=1e-5)
    if suffix.startswith(".nii"):
        src_img, out_img = nib.load(str(src)), nib.load(str(out))
        assert out_img.shape == src_img.shape
        np.testing.assert_array_equal(out_img.affine, src_img.affine)
        np.testing.assert_array_equal(out_img.get_qform(), src_img.get_qform())
        np.testing.assert_array_equal(out_img.get_sform(), src_img.get_sform())
        assert int(out_img.header["qform_code"]) == 1 and int(out_img.header["sform_code"]) == 2
        # Third trip: reading the written mask and writing it again changes nothing.
        again = write_mask(tmp_path / f"again{suffix}", back.layer_data(), back.geometry)
        assert np.array_equal(nib.load(str(again)).affine, out_img.affine)


def test_round_trip_nrrd_scan(tmp_path):
    import SimpleITK as sitk

    arr = random_volume((12, 14, 10))
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.7, 0.8, 3.0))
    image.SetOrigin((-20.0, 15.0, 7.5))
    direction = (AFFINES["oblique_permuted"][:3, :3] / np.linalg.norm(AFFINES["oblique_permuted"][:3, :3], axis=0))
    image.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(image, str(tmp_path / "scan.nrrd"))
    volume = read_volume(tmp_path / "scan.nrrd")
    # ITK LPS geometry and our RAS affine agree voxel by voxel.
    for ijk in sample_voxels(volume.geometry.file_shape):
        lps = np.array(image.TransformIndexToPhysicalPoint([int(v) for v in ijk]))
        ras = nib.affines.apply_affine(volume.geometry.affine_ras, ijk)
        np.testing.assert_allclose(RAS_TO_LPS[:3, :3] @ ras, lps, atol=1e-4)
    assert volume.data[3, 4, 5] == arr[5, 4, 3]
    mask = (volume.layer_data() > 0).astype(np.uint8)
    out = write_mask(tmp_path / "mask.nrrd", mask, volume.geometry)
    written = sitk.ReadImage(str(out))
    assert written.GetSize() == image.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(written.GetSpacing(), image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(written.GetDirection(), image.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), (arr > 0).astype(np.uint8))


def test_dicom_series_written_from_nifti_has_the_same_world_geometry(tmp_path):
    import SimpleITK as sitk

    nifti = write_nifti(tmp_path / "scan.nii.gz", random_volume((16, 18, 12)), AFFINES["oblique"])
    nifti_volume = read_volume(nifti)
    image = sitk.ReadImage(str(nifti))  # SimpleITK converts the NIfTI to LPS itself
    folder = write_dicom_series(
        tmp_path / "dicom", sitk.GetArrayFromImage(image), image.GetOrigin(), image.GetSpacing(),
        image.GetDirection())
    dicom_volume = read_volume(folder)
    np.testing.assert_allclose(dicom_volume.geometry.world_affine, nifti_volume.geometry.world_affine, atol=1e-4)
    np.testing.assert_array_equal(dicom_volume.layer_data(), nifti_volume.layer_data())
    assert dicom_volume.modality == "CT" and not dicom_volume.modality_guessed
    # The files store RescaleIntercept -1024, so matching values prove it was applied.
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(folder / "slice0000.dcm"))
    reader.ReadImageInformation()
    assert float(reader.GetMetaData("0028|1052")) == -1024
    # A mask drawn on the DICOM scan lands on the same voxels as on the NIfTI.
    mask = (dicom_volume.layer_data() > 1000).astype(np.uint8)
    out = write_mask(tmp_path / "mask.nii.gz", mask, dicom_volume.geometry)
    np.testing.assert_allclose(read_volume(out).geometry.world_affine, nifti_volume.geometry.world_affine, atol=1e-4)


def test_dicom_slices_are_sorted_by_position_not_file_name(tmp_path):
    data = random_volume((8, 10, 12))
    # Slice files named in reverse order of their positions.
    folder = write_dicom_series(tmp_path / "d", data, (0, 0, 0), (1, 1, 2), np.eye(3),
                                positions=np.arange(8)[::-1].astype(float))
    volume = read_volume(folder)
    np.testing.assert_array_equal(volume.data.T, data[::-1])


def test_dicom_missing_slice_is_reported(tmp_path):
    data = random_volume((8, 10, 12))
    positions = [0, 1, 2, 3, 5, 6, 7, 8]  # slice 4 missing
    folder = write_dicom_series(tmp_path / "d", data, (0, 0, 0), (1, 1, 2), np.eye(3), positions=positions)
    volume = read_volume(folder)
    assert any("missing" in w for w in volume.warnings), volume.warnings


def test_dicom_uneven_spacing_is_reported(tmp_path):
    data = random_volume((6, 10, 12))
    positions = [0, 1, 2.2, 3.2, 4.3, 5.3]
    folder = write_dicom_series(tmp_path / "d", data, (0, 0, 0), (1, 1, 2), np.eye(3), positions=positions)
    assert any("uneven" in w for w in read_volume(folder).warnings)


def test_dicom_identifiers_never_reach_the_volume(tmp_path):
    folder = write_dicom_series(tmp_path / "d", random_volume((5, 8, 8)), (0, 0, 0), (1, 1, 1), np.eye(3),
                                patient_name="SMITH^JANE")
    volume = read_volume(folder)
    text = repr(volume.describe()) + repr(volume.info) + repr(volume.warnings) + volume.name
    assert "SMITH" not in text and "PID-12345" not in text
    assert volume.info["dicom"]["SeriesNumber"] == "3"


def test_dicom_progress_is_reported(tmp_path):
    folder = write_dicom_series(tmp_path / "d", random_volume((20, 8, 8)), (0, 0, 0), (1, 1, 1), np.eye(3))
    seen = []
    read_volume(folder, progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0 and len(seen) >= 3 and seen == sorted(seen)


def test_integer_label_file_is_a_label_map(tmp_path):
    labels = np.zeros((10, 12, 8), np.uint8)
    labels[2:5, 3:6, 1:4] = 2
    path = write_nifti(tmp_path / "labels.nii.gz", labels, AFFINES["ras"])
    assert read_volume(path).is_label_map
    assert not read_volume(write_nifti(tmp_path / "ct.nii.gz", random_volume(), AFFINES["ras"])).is_label_map


def test_uncompressed_nifti_is_memory_mapped_not_copied(tmp_path):
    path = write_nifti(tmp_path / "big.nii", random_volume((64, 64, 40)), AFFINES["ras"])
    volume = read_volume(path)
    layer = volume.layer_data()
    assert isinstance(volume.data, np.memmap) or isinstance(volume.data.base, np.memmap)
    assert np.shares_memory(layer, volume.data)


@pytest.mark.parametrize("name", ["standard.nii.gz", "example4d.nii.gz", "example_nifti2.nii.gz"])
def test_fast_gzip_path_reads_exactly_what_nibabel_reads(name):
    """The zlib-ng reader (big-endian, 4D and NIfTI-2 files too) matches nibabel voxel for voxel."""
    from napari_medseg.core.io import _fast_gzip_voxels

    img = nib.load(str(NIBABEL_DATA / name))
    fast = _fast_gzip_voxels(NIBABEL_DATA / name, img)
    expected = np.asanyarray(img.dataobj)
    assert fast is not None and fast.dtype == expected.dtype.newbyteorder("=")
    np.testing.assert_array_equal(fast, expected)


def test_fast_gzip_path_detects_truncation(tmp_path):
    from napari_medseg.core.io import _fast_gzip_voxels

    raw = (NIBABEL_DATA / "example4d.nii.gz").read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[: len(raw) - 2000])
    with pytest.raises((EOFError, OSError)):
        _fast_gzip_voxels(cut, nib.load(str(cut)))
