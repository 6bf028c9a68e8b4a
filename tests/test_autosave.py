"""The autosave journal on its own: snapshots, journal records, compaction, torn records, recovery, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np

from napari_medseg.core import autosave
from napari_medseg.core.geometry import ScanGeometry
from napari_medseg.core.io import read_volume


def _geometry(shape=(20, 30, 40)):
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = (-10, 20, 5)
    # layer order is (z, y, x) of a file (x, y, z)
    return ScanGeometry(affine, shape[::-1])


def _store(tmp_path, shape=(40, 30, 20), scan=None):
    mask = np.zeros(shape, np.uint8)
    scan = np.random.default_rng(0).normal(size=shape).astype(np.float32) if scan is None else scan
    geometry = _geometry(shape)
    return autosave.MaskAutosave(tmp_path / "autosave", mask,
                                 scan=lambda pause=0.0: autosave.scan_identity(scan, geometry, pause), geometry=geometry,
                                 label_names={"1": "lesion"}), mask, scan


def test_nothing_is_written_until_a_change_then_every_change_comes_back(tmp_path):
    store, mask, _scan = _store(tmp_path)
    assert store.update(mask) == 0 and autosave.list_sessions(tmp_path / "autosave") == []
    mask[5:10, 5:10, 5:10] = 1
    assert store.update(mask) == 125
    mask[20:22, 0:3, 0:3] = 2
    mask[6, 6, 6] = 0
    assert store.update(mask) == 19
    [session] = autosave.list_sessions(tmp_path / "autosave")
    assert session.edited_voxels == 125 + 18 - 1 and session.owner_alive and not session.crashed
    restored, meta = autosave.load_session(session.folder)
    np.testing.assert_array_equal(restored, mask)
    assert meta["label_names"] == {"1": "lesion"} and len(meta["scan"]["sha256"]) == 64
    assert meta["scan"]["spacing_mm"] == [2.5, 0.9, 0.8]
    store.finish()
    [session] = autosave.list_sessions(tmp_path / "autosave")
    assert session.crashed  # the owner let go without a clean close


def test_the_edited_count_follows_the_original_not_the_number_of_strokes(tmp_path):
    store, mask, _scan = _store(tmp_path)
    mask[0:4, 0:4, 0:4] = 1
    store.update(mask)
    mask[0:4, 0:4, 0:4] = 0  # painted, then erased again: nothing is edited any more
    store.update(mask)
    assert store.edited == 0 and store.unsaved


def test_a_record_cut_short_by_a_crash_gives_the_last_complete_autosave(tmp_path):
    store, mask, _scan = _store(tmp_path)
    states = []
    for k in range(4):
        mask[k * 5:(k + 1) * 5, 3:9, 2:7] = k + 1
        store.update(mask)
        states.append(mask.copy())
    folder = store.session.folder
    journal = next(folder.glob("journal-*.log"))
    full = journal.read_bytes()
    store.finish()
    for cut in (len(full) - 1, len(full) - 10, len(full) // 2 + 3):
        journal.write_bytes(full[:cut])
        restored, _meta = autosave.load_session(folder)
        assert any(np.array_equal(restored, state) for state in states[-3:])
    journal.write_bytes(full[:-1])
    np.testing.assert_array_equal(autosave.load_session(folder)[0], states[-2])  # the one before the last


def test_the_journal_is_compacted_into_snapshots(tmp_path, monkeypatch):
    monkeypatch.setattr(autosave, "JOURNAL_LIMIT", 4000)
    store, mask, _scan = _store(tmp_path)
    rng = np.random.default_rng(1)
    for _ in range(200):
        z, y, x = rng.integers(0, 18, 3)
        mask[z:z + 3, y:y + 3, x:x + 3] = rng.integers(0, 4)
        store.update(mask)
    folder = store.session.folder
    assert store.session.generation > 3
    assert len(list(folder.glob("snapshot-*.bin"))) == 1 and len(list(folder.glob("journal-*.log"))) == 1
    np.testing.assert_array_equal(autosave.load_session(folder)[0], mask)


def test_clean_up_keeps_what_may_still_be_needed(tmp_path):
    root = tmp_path / "autosave"
    kinds = {}
    for state in ("open", "saved", "discarded", "recovered"):
        store, mask, _scan = _store(tmp_path)
        mask[1, 1, 1] = 1
        store.update(mask)
        kinds[state] = store.session.meta["id"]
        store.finish(state=None if state == "open" else state)
    live, mask, _scan = _store(tmp_path)
    mask[2, 2, 2] = 1
    live.update(mask)
    discarded_now = kinds["discarded"]
    removed = autosave.clean_up(root, keep={discarded_now})
    assert sorted(removed) == sorted([kinds["saved"], kinds["recovered"]])
    left = {s.id for s in autosave.list_sessions(root)}
    assert left == {kinds["open"], discarded_now, live.session.meta["id"]}
    autosave.clean_up(root)  # the next clean close: the discard goes too
    assert {s.id for s in autosave.list_sessions(root)} == {kinds["open"], live.session.meta["id"]}


def test_nothing_in_an_autosave_names_the_patient(tmp_path):
    patient = tmp_path / "Smith^John_MRN998877"
    patient.mkdir()
    store, mask, _scan = _store(patient)
    mask[3:6, 3:6, 3:6] = 1
    store.update(mask)
    for path in (patient / "autosave").rglob("*"):
        if path.is_file():
            assert b"Smith" not in path.read_bytes() and b"998877" not in path.read_bytes()


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "napari_medseg.cli", *map(str, args)], capture_output=True,
                          text=True, env=env)


def test_cli_lists_and_restores_in_the_scan_geometry(tmp_path):
    shape = (40, 30, 20)
    store, mask, _scan = _store(tmp_path / "ws", shape)
    mask[10:20, 5:15, 4:9] = 1
    store.update(mask)
    store.finish()
    listed = _cli("recover", "--list", "--json", "--workspace", tmp_path / "ws")
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert entry["edited_voxels"] == 500 and entry["state"] == "open" and not entry["in_use"]
    text = _cli("recover", "--list", "--workspace", tmp_path / "ws")
    assert entry["id"] in text.stdout and "500" in text.stdout
    out = tmp_path / "restored.nii.gz"
    done = _cli("recover", entry["id"][:12], "-o", out, "--workspace", tmp_path / "ws")
    assert done.returncode == 0, done.stderr
    restored = read_volume(out)
    np.testing.assert_array_equal(np.asarray(restored.layer_data()), mask)
    np.testing.assert_allclose(nib.load(out).affine, _geometry(shape).affine_ras)
    # Refused: a missing id, writing over a file the command reads, a missing folder.
    missing = _cli("recover", "nope", "-o", tmp_path / "x.nii.gz", "--workspace", tmp_path / "ws")
    assert missing.returncode == 2 and "no autosave" in missing.stderr and "Traceback" not in missing.stderr
    nowhere = _cli("recover", entry["id"], "-o", tmp_path / "missing" / "x.nii.gz", "--workspace", tmp_path / "ws")
    assert nowhere.returncode == 2 and len(nowhere.stderr.strip().splitlines()) == 1


def test_cli_without_workspace_uses_the_viewers_default(tmp_path):
    import os

    env = {**os.environ, "NAPARI_MEDSEG_HOME": str(tmp_path / "home")}
    store = autosave.MaskAutosave(tmp_path / "home" / "workspace" / "autosave", np.zeros((4, 5, 6), np.uint8),
                                  geometry=_geometry((4, 5, 6)))
    store.update(np.ones((4, 5, 6), np.uint8))
    store.finish()
    listed = _cli("recover", "--list", "--json", env=env)
    assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 1

