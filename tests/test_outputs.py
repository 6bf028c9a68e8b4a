"""Output safety: nothing a command writes may destroy its input, and outputs are all written or none."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import AFFINES, random_volume, write_nifti
from napari_medseg.viewer._sample import sample_path
from napari_medseg.core.errors import MedsegError
from napari_medseg.core.outputs import check_outputs, write_files


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "napari_medseg.cli", *map(str, args)], capture_output=True,
                          text=True, **kwargs)


@pytest.fixture
def scan(tmp_path):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(Path(sample_path()).read_bytes())
    return path


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "dot path"])
def test_predict_refuses_to_write_over_its_input(tmp_path, scan, how):
    before = scan.read_bytes()
    target = {"same path": scan, "dot path": tmp_path / "." / "scan.nii.gz",
              "symlink": tmp_path / "link.nii.gz", "hard link": tmp_path / "hard.nii.gz"}[how]
    if how == "symlink":
        target.symlink_to(scan)
    elif how == "hard link":
        os.link(scan, target)
    result = cli("predict", scan, "-o", target, "--quiet")
    assert result.returncode == 2 and "refusing to write -o" in result.stderr and "input file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert scan.read_bytes() == before


def test_probabilities_and_mask_may_not_be_the_same_file_or_the_input(tmp_path, scan):
    out = tmp_path / "out.nii.gz"
    result = cli("predict", scan, "-o", out, "--probabilities", out)
    assert result.returncode == 2 and "name the same file" in result.stderr and not out.exists()
    result = cli("predict", scan, "-o", out, "--probabilities", scan)
    assert result.returncode == 2 and "--probabilities" in result.stderr and "input file" in result.stderr


def test_a_file_inside_an_input_dicom_folder_is_refused(tmp_path):
    from dicom_factory import Sampler, write_series

    folder = tmp_path / "study"
    written = write_series(folder, Sampler(Path(sample_path())), shape=(24, 24, 6), modality="MR")
    with pytest.raises(MedsegError, match="inside the input folder 'study'"):
        check_outputs({"-o": written["paths"][2]}, [folder])
    check_outputs({"-o": folder / "new_mask.nii.gz"}, [folder])  # a new file beside the slices is fine


def test_a_missing_output_folder_is_refused_not_created(tmp_path, scan):
    out = tmp_path / "typo" / "mask.nii.gz"
    result = cli("predict", scan, "-o", out)
    assert result.returncode == 2 and "folder 'typo' does not exist" in result.stderr
    assert not (tmp_path / "typo").exists()
    (tmp_path / "models").mkdir()
    result = cli("train", "--data", tmp_path, "-o", tmp_path / "nope")
    assert result.returncode == 2 and "'nope' does not exist" in result.stderr and not (tmp_path / "nope").exists()


def test_proc_and_a_folder_as_output_are_refused_before_any_work(tmp_path, scan):
    result = cli("predict", scan, "-o", "/proc/mask.nii.gz")
    assert result.returncode == 2 and "cannot write -o 'mask.nii.gz'" in result.stderr
    assert "Traceback" not in result.stderr and "predict:" not in result.stderr  # no progress: nothing ran
    (tmp_path / "folder.nii.gz").mkdir()
    result = cli("predict", scan, "-o", tmp_path / "folder.nii.gz")
    assert result.returncode == 2 and "is a folder" in result.stderr


@pytest.fixture
def read_only_folder(tmp_path):
    """A real read-only file system: a read-only bind mount (needs root), else skipped."""
    source, target = tmp_path / "rw", tmp_path / "ro"
    source.mkdir()
    target.mkdir()
    (source / "old_mask.nii.gz").write_bytes(b"previous")
    mounted = subprocess.run(["mount", "-o", "bind,ro", str(source), str(target)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("a read-only bind mount needs root; covered by the permission test instead")
    yield target
    subprocess.run(["umount", str(target)], check=False)


def test_read_only_file_system_is_refused_before_the_network_runs(scan, read_only_folder):
    result = cli("predict", scan, "-o", read_only_folder / "mask.nii.gz", "--probabilities",
                 read_only_folder / "p.nii.gz")
    assert result.returncode == 2 and "Read-only file system" in result.stderr
    assert "predict:" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in read_only_folder.iterdir()) == ["old_mask.nii.gz"]


def test_a_folder_without_write_permission_is_refused(tmp_path, scan):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    command = [sys.executable, "-m", "napari_medseg.cli", "predict", str(scan), "-o", str(locked / "mask.nii.gz")]
    if os.geteuid() == 0:  # root ignores permission bits unless it drops the capability to
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
                   "-dac_override,-dac_read_search", "--", *command]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    finally:
        locked.chmod(0o700)
    assert result.returncode == 2 and "Permission denied" in result.stderr and "Traceback" not in result.stderr
    assert list(locked.iterdir()) == []


def test_outputs_are_all_written_or_none_when_the_disk_fills(tmp_path):
    """The second file of a pair fails (file-size limit, as on a full disk): neither changes."""
    script = textwrap.dedent(f"""
        import resource, signal
        import numpy as np
        from pathlib import Path
        from napari_medseg.core.outputs import write_files
        from napari_medseg.core.errors import MedsegError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        small = lambda tmp: Path(tmp).write_bytes(b"new mask")
        big = lambda tmp: Path(tmp).write_bytes(b"x" * 1_000_000)
        try:
            write_files([({str(tmp_path / 'mask.nii.gz')!r}, small, ".nii.gz"),
                         ({str(tmp_path / 'probs.nii.gz')!r}, big, ".nii.gz")])
        except MedsegError as exc:
            print("ERROR", exc)
    """)
    (tmp_path / "mask.nii.gz").write_bytes(b"old mask")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.startswith("ERROR could not write 'probs.nii.gz'"), result.stdout + result.stderr
    assert "no file was changed" in result.stdout
    assert (tmp_path / "mask.nii.gz").read_bytes() == b"old mask"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]


def test_a_failed_rename_puts_every_earlier_file_back(tmp_path):
    """The second target is a folder, so its rename fails after the first succeeded."""
    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "b.txt").mkdir()
    with pytest.raises(MedsegError, match="no file was changed"):
        write_files([(tmp_path / "a.txt", lambda t: Path(t).write_text("new a"), ".txt"),
                     (tmp_path / "b.txt", lambda t: Path(t).write_text("new b"), ".txt")])
    assert (tmp_path / "a.txt").read_text() == "old a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_check_outputs_accepts_new_files_in_existing_folders(tmp_path, scan):
    checked = check_outputs({"-o": tmp_path / "new.nii.gz", "--probabilities": None}, [scan])
    assert checked == {"-o": tmp_path / "new.nii.gz"}


def test_predict_writes_mask_and_probabilities_together(tmp_path):
    source = write_nifti(tmp_path / "small.nii.gz", (random_volume((40, 40, 40)) % 300).astype(np.int16),
                         AFFINES["ras"])
    result = cli("predict", source, "-o", tmp_path / "m.nii.gz", "--probabilities", tmp_path / "p.nii.gz",
                 "--model", "brain-t1-attention", "--force", "--quiet")
    assert result.returncode == 0, result.stderr
    assert nib.load(tmp_path / "m.nii.gz").shape == (40, 40, 40) and nib.load(tmp_path / "p.nii.gz").shape[-1] == 2
