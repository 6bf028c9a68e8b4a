"""Bad input: a clear one-line message, a non-zero CLI exit, napari keeps running, nothing lost."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

from conftest import AFFINES, random_volume, write_dicom_series, write_nifti
from napari_medseg.viewer import _reader
from napari_medseg.core.errors import (MedsegError, MultipleSeriesError, MultiVolumeError,
                                       NotAVolumeError, UnreadableScanError)
from napari_medseg.core.io import read_volume, write_mask


def _truncated(tmp_path):
    full = write_nifti(tmp_path / "full.nii.gz", random_volume((40, 40, 30)), AFFINES["ras"])
    raw = full.read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _text_as_nifti(tmp_path):
    path = tmp_path / "notes.nii"
    path.write_text("this is a text file, not a scan\n" * 20)
    return path


def _two_d(tmp_path):
    return write_nifti(tmp_path / "slice.nii.gz", random_volume((32, 32)), AFFINES["ras"])


def _flat_3d(tmp_path):
    return write_nifti(tmp_path / "flat.nii.gz", random_volume((32, 32, 1)), AFFINES["ras"])


def _zero_axis(tmp_path):
    img = nib.Nifti1Image(np.zeros((10, 0, 5), np.int16), AFFINES["ras"])
    path = tmp_path / "empty_axis.nii"
    nib.save(img, str(path))
    return path


def _singular(tmp_path):
    img = nib.Nifti1Image(random_volume(), np.eye(4))
    img.header.set_qform(None, code=0)
    img.header["sform_code"] = 1
    img.header["srow_z"] = [0, 0, 0, 5]  # the k axis goes nowhere
    img.update_header = lambda: None  # keep the header exactly as written above
    path = tmp_path / "singular.nii.gz"
    nib.save(img, str(path))
    return path


def _empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


BROKEN = {
    "truncated": (_truncated, UnreadableScanError, "truncated"),
    "text file": (_text_as_nifti, UnreadableScanError, "not a valid NIfTI"),
    "2D": (_two_d, NotAVolumeError, "2D"),
    "2D as 3D": (_flat_3d, NotAVolumeError, "2D"),
    "zero-length axis": (_zero_axis, NotAVolumeError, "zero-length"),
    "singular affine": (_singular, NotAVolumeError, "singular"),
    "empty folder": (_empty_folder, UnreadableScanError, "no DICOM"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_core_raises_a_clear_error(tmp_path, case):
    make, error, words = BROKEN[case]
    with pytest.raises(error) as info:
        read_volume(make(tmp_path))
    message = str(info.value)
    assert words in message and "\n" not in message and str(tmp_path) not in message


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_cli_prints_one_line_and_exits_nonzero(tmp_path, case):
    make, _error, words = BROKEN[case]
    result = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "info", str(make(tmp_path))],
                            capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("napari-medseg: error:") and words in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_napari_reader_never_raises(tmp_path, case):
    make, _error, _words = BROKEN[case]
    path = make(tmp_path)
    reader = _reader.napari_get_reader(str(path))
    assert reader is not None
    assert reader(str(path)) == _reader.NOTHING_OPENED


def test_reader_declines_files_it_does_not_handle(tmp_path):
    other = tmp_path / "picture.png"
    other.write_bytes(b"\x89PNG\r\n")
    assert _reader.napari_get_reader(str(other)) is None
    assert _reader.napari_get_reader([str(other), str(other)]) is None


def test_four_d_asks_for_a_volume(tmp_path):
    data = np.stack([random_volume(seed=s) for s in range(3)], axis=-1)
    path = write_nifti(tmp_path / "dwi.nii.gz", data, AFFINES["oblique"])
    with pytest.raises(MultiVolumeError) as info:
        read_volume(path)
    assert info.value.n_volumes == 3
    np.testing.assert_array_equal(read_volume(path, volume_index=2).data, data[..., 2])
    layers = _reader.read_scan(str(path))  # napari: each volume becomes a layer
    assert len(layers) == 3 and all(np.array_equal(l[1]["affine"], layers[0][1]["affine"]) for l in layers)
    cli = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "info", str(path)], capture_output=True, text=True)
    assert cli.returncode == 2 and "--volume" in cli.stderr
    ok = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "info", str(path), "--volume", "1"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "1 of 3" in ok.stdout


def test_nan_and_inf_are_replaced_with_a_warning(tmp_path):
    data = random_volume().astype(np.float32)
    data[1, 2, 3], data[4, 5, 6], data[7, 8, 9] = np.nan, np.inf, -np.inf
    volume = read_volume(write_nifti(tmp_path / "nan.nii.gz", data, AFFINES["ras"]))
    assert np.isfinite(volume.data).all()
    assert volume.data[1, 2, 3] == np.nanmin(data[np.isfinite(data)])
    assert any("3 voxels were NaN or infinite" in w for w in volume.warnings)


def test_mixed_dicom_folder_lets_the_user_choose(tmp_path):
    folder = tmp_path / "study"
    write_dicom_series(folder / "a", random_volume((4, 8, 8)), (0, 0, 0), (1, 1, 1), np.eye(3),
                       series_uid="1.2.3.1", series_number="1")
    write_dicom_series(folder / "b", random_volume((6, 8, 8), seed=2), (0, 0, 0), (1, 1, 1), np.eye(3),
                       series_uid="1.2.3.2", series_number="2", modality="MR")
    with pytest.raises(MultipleSeriesError) as info:
        read_volume(folder)
    assert [s["images"] for s in info.value.series] == [6, 4]
    assert read_volume(folder, series="1.2.3.1").data.shape[2] == 4
    assert read_volume(folder, series=0).modality == "MR"
    # info lists the series (the answer for a study folder); predict must be told which.
    cli = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "info", str(folder)], capture_output=True, text=True)
    assert cli.returncode == 0 and "--series" in cli.stdout and "DOE" not in cli.stdout + cli.stderr
    assert "#0 MR series 2" in cli.stdout and "#1 CT series 1" in cli.stdout
    out = tmp_path / "m.nii.gz"
    cli = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "predict", str(folder), "-o", str(out)],
                         capture_output=True, text=True)
    assert cli.returncode == 2 and "--series" in cli.stderr and not out.exists()


def test_wrong_mask_shape_is_refused(tmp_path):
    volume = read_volume(write_nifti(tmp_path / "s.nii.gz", random_volume(), AFFINES["ras"]))
    with pytest.raises(MedsegError, match="does not match"):
        write_mask(tmp_path / "m.nii.gz", np.zeros((3, 4, 5), np.uint8), volume.geometry)
    with pytest.raises(MedsegError, match="integer"):
        write_mask(tmp_path / "m.nii.gz", np.zeros(volume.layer_data().shape, np.float32), volume.geometry)
    assert not list(tmp_path.glob("m.nii.gz*"))


def test_full_disk_loses_nothing(tmp_path):
    """The write fails part-way (file-size limit, as on a full disk): the old mask survives."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np
        from napari_medseg.core.io import read_volume, write_mask
        from napari_medseg.core.errors import MedsegError
        volume = read_volume({str(tmp_path / 'scan.nii')!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            write_mask({str(tmp_path / 'mask.nii')!r}, np.ones(volume.layer_data().shape, np.uint8), volume.geometry)
        except MedsegError as exc:
            print("ERROR", exc)
    """)
    write_nifti(tmp_path / "scan.nii", random_volume((64, 64, 32)), AFFINES["ras"])
    old = tmp_path / "mask.nii"
    old.write_bytes(b"previous mask")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.startswith("ERROR could not write 'mask.nii'"), result.stdout + result.stderr
    assert "no file was changed" in result.stdout
    assert old.read_bytes() == b"previous mask"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii", "scan.nii"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "napari_medseg.cli", *map(str, args)], capture_output=True, text=True)


def test_volume_on_a_3d_file_and_series_on_a_file_are_refused(tmp_path):
    path = write_nifti(tmp_path / "scan.nii.gz", random_volume(), AFFINES["ras"])
    result = _cli("info", path, "--volume", "1")
    assert result.returncode == 2 and "single 3D volume; there is no volume 1" in result.stderr
    result = _cli("info", path, "--series", "5")
    assert result.returncode == 2 and "a series can only be chosen in a folder" in result.stderr
    assert _cli("info", path, "--volume", "0").returncode == 0


def test_the_oblique_note_is_for_the_viewer_only(tmp_path):
    from napari.utils.notifications import notification_manager

    path = write_nifti(tmp_path / "oblique.nii.gz", random_volume(), AFFINES["oblique"])
    result = _cli("info", path)
    assert result.returncode == 0 and "2D slices are shown" not in result.stdout + result.stderr
    before = len(notification_manager.records)
    _reader.read_scan(str(path))
    assert any("2D slices are shown" in str(n.message) for n in notification_manager.records[before:])


def test_a_pickled_model_prints_only_our_refusal(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"state_dict": Payload(), "card": "{}"}))
    result = _cli("models", "import", path)
    assert result.returncode == 2 and "ran" not in result.stdout
    assert result.stderr.strip().splitlines() == [
        "napari-medseg: error: refused to load 'evil.pt': it contains pickled code or objects, not plain weights "
        "(only safetensors or weights-only torch files load)"]


def test_the_four_d_message_reads_as_one_sentence(tmp_path):
    data = np.stack([random_volume(seed=s) for s in range(2)], axis=-1)
    path = write_nifti(tmp_path / "dwi.nii.gz", data, AFFINES["ras"])
    result = _cli("info", path)
    assert result.stderr.strip() == ("napari-medseg: error: 'dwi.nii.gz' is 4D with 2 volumes, numbered 0 to 1; "
                                     "choose one (pass --volume N)")


def test_importing_an_installed_model_again_says_so(tmp_path):
    from napari_medseg.core.models import BUNDLED_DIR

    env = {**__import__("os").environ, "NAPARI_MEDSEG_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "models", "import",
                             str(BUNDLED_DIR / "brain-t1.safetensors")], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "already installed (bundled, same content hash)" in result.stdout
    listing = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "models", "list"], capture_output=True,
                             text=True, env=env)
    assert listing.stdout.count("brain-t1 ") == 1


def test_every_train_option_has_a_description_and_its_default():
    import argparse

    from napari_medseg.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    train = commands["train"]
    for action in train._actions:
        if action.dest in ("help",):
            continue
        assert action.help, action.dest
    text = " ".join(train.format_help().split())
    assert "(default: 1000)" in text and "(default: [80, 96, 80])" in text and "(default: auto)" in text
    models = next(a for a in commands["models"]._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert "Verify a model file" in models["import"].format_help()
    assert "mps" in commands["predict"].format_help()


def test_the_overlap_box_shows_the_engine_default(make_napari_viewer):
    from napari_medseg.viewer._widgets.segment import SegmentWidget
    from napari_medseg.core.inference import DEFAULT_OVERLAP

    widget = SegmentWidget(make_napari_viewer())
    assert widget._overlap.native.text() == "0.125" and widget._overlap.value == DEFAULT_OVERLAP
