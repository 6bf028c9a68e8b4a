"""Several input sequences: a 2-channel model fed from two scans on different grids, through
the core, the CLI (``predict T1 T2 -o OUT``) and the Segment dock's per-channel layers."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import card_dict
from napari_medseg.core.card import parse_card
from napari_medseg.core.errors import MedsegError
from napari_medseg.core.io import read_volume
from napari_medseg.core.models import ModelRegistry, load_model
from napari_medseg.core.network import build_network
from napari_medseg.core.predict import ScanImage, predict_scan, stack_channels
from napari_medseg.viewer._sample import sample_path


def cli(*args):
    return subprocess.run([sys.executable, "-m", "napari_medseg.cli", *map(str, args)], capture_output=True,
                          encoding="utf-8", errors="replace")


@pytest.fixture
def sequences(tmp_path):
    """The sample T1 head (2 mm) and a T2-like contrast of it (bright fluid, dark fat) on a
    3 mm grid with another axis order: the same anatomy on another grid."""
    from nibabel.processing import resample_from_to

    t1 = nib.load(sample_path())
    data = np.asarray(t1.dataobj, dtype=np.float32)
    inverted = np.where(data > 0, data.max() - data, 0).astype(np.float32)
    shape = tuple(int(np.ceil(n * 2 / 3)) for n in data.shape)[::-1]
    affine = np.zeros((4, 4))
    affine[0, 2], affine[1, 1], affine[2, 0], affine[3, 3] = -3.0, 3.0, 3.0, 1.0  # i: up, k: right to left
    affine[:3, 3] = t1.affine[:3, 3]
    t2 = resample_from_to(nib.Nifti1Image(inverted, t1.affine), (shape, affine), order=1)
    paths = {"T1": tmp_path / "head_T1.nii.gz", "T2": tmp_path / "head_T2.nii.gz"}
    nib.save(t1, paths["T1"])
    nib.save(nib.Nifti1Image(t2.get_fdata().astype(np.float32), affine), paths["T2"])
    return paths


@pytest.fixture
def two_channel_model(sequences):
    """A 2-channel network with a real forward pass, its output bias set so that about half of
    the head falls in each class (an untrained network otherwise gives one class everywhere)."""
    raw = card_dict(name="t1-t2", channels=(4, 8), patch=(32, 32, 32), spacing=(3.0, 3.0, 3.0),
                    roi={"kind": "body", "margin_mm": 5.0})
    raw["network"]["hparams"]["in_channels"] = 2
    card = parse_card({**raw, "channels": ["T1", "T2"]}, "t1-t2")
    torch.manual_seed(3)
    network = build_network(card.network.architecture, card.network.hparams).eval()
    scan = stack_channels([ScanImage.from_volume(read_volume(sequences[n])) for n in ("T1", "T2")], ("T1", "T2"))
    from napari_medseg.core.models import Model

    result = predict_scan(scan, Model(network, card), want_probabilities=True, force=True)
    foreground = result.segmentation.probabilities[1][scan.data[0] > 0]
    median = float(np.median(foreground))
    bias = [p for name, p in network.named_parameters() if name.endswith("bias") and p.shape == (2,)][-1]
    with torch.no_grad():
        bias[1] -= float(np.log(median / (1 - median)))
    return ModelRegistry().add_version(network, card, make_current=True)


def test_the_second_sequence_is_resampled_onto_the_first_ones_grid_through_the_affines(sequences):
    t1, t2 = (ScanImage.from_volume(read_volume(sequences[n])) for n in ("T1", "T2"))
    assert t1.data.shape != t2.data.shape
    stacked = stack_channels([t1, t2], ("T1", "T2"))
    assert stacked.data.shape == (2, *t1.data.shape)
    assert any("resampled onto" in w and "(T2)" in w for w in stacked.warnings)
    inside = t1.data > 0.2 * t1.data.max()
    # The inverted contrast lands on the same anatomy: strongly anti-correlated inside the head.
    assert np.corrcoef(stacked.data[0][inside], stacked.data[1][inside])[0, 1] < -0.8


def test_a_two_channel_model_uses_both_sequences_and_the_cli_takes_one_input_per_channel(
        sequences, two_channel_model, tmp_path):
    done = cli("predict", sequences["T1"], sequences["T2"], "-o", tmp_path / "mask.nii.gz", "--model", "t1-t2",
               "--force")
    assert done.returncode == 0, done.stderr
    assert "resampled onto" in done.stderr
    mask = nib.load(tmp_path / "mask.nii.gz")
    assert mask.shape == nib.load(sequences["T1"]).shape and np.allclose(mask.affine, nib.load(sequences["T1"]).affine)
    labels = np.asarray(mask.dataobj)
    assert 0.2 < (labels == 1).sum() / (np.asarray(nib.load(sequences["T1"]).dataobj) > 0).sum() < 0.8

    flat = tmp_path / "flat_T2.nii.gz"  # the second sequence carries nothing: the mask changes
    t2 = nib.load(sequences["T2"])
    nib.save(nib.Nifti1Image(np.zeros(t2.shape, np.float32) + 100, t2.affine), flat)
    other = cli("predict", sequences["T1"], flat, "-o", tmp_path / "other.nii.gz", "--model", "t1-t2", "--force")
    assert other.returncode == 0, other.stderr
    changed = (np.asarray(nib.load(tmp_path / "other.nii.gz").dataobj) != labels).mean()
    assert changed > 0.01

    one = cli("predict", sequences["T1"], "-o", tmp_path / "one.nii.gz", "--model", "t1-t2", "--force")
    assert one.returncode == 2 and not (tmp_path / "one.nii.gz").exists()
    assert one.stderr.strip().splitlines()[-1] == \
        "napari-medseg: error: t1-t2 v1.0.0 takes 2 input image(s) (T1, T2); got 1"


def test_a_single_channel_call_to_a_two_channel_model_is_refused_in_the_core(sequences, two_channel_model):
    t1 = ScanImage.from_volume(read_volume(sequences["T1"]))
    with pytest.raises(MedsegError, match=r"takes 2 input image\(s\) \(T1, T2\); got 1"):
        predict_scan(t1, load_model(two_channel_model.path), force=True)


def test_the_segment_dock_asks_for_a_layer_per_channel_on_different_grids(
        qtbot, make_napari_viewer, sequences, two_channel_model, tmp_path):
    from napari.layers import Labels

    from napari_medseg.viewer._reader import napari_get_reader
    from napari_medseg.viewer._widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    for name in ("T2", "T1"):  # the T2 layer first: the defaults follow names, not order
        path = str(sequences[name])
        for data, kwargs, kind in napari_get_reader(path)(path):
            getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    widget._model.value = str(two_channel_model.path)
    assert widget.channel_names() == ("T1", "T2")
    assert [w.label for w in widget.channel_layers_widgets()] == ["Image (T1)", "Image (T2)"]
    assert [layer.name for layer in widget.channel_layers()] == ["head_T1", "head_T2"]
    task = widget.run()
    qtbot.waitUntil(lambda: task is not None and not task.running, timeout=120000)
    assert task.error is None, task.error
    layer = widget.last_layer
    assert isinstance(layer, Labels) and layer.data.shape == viewer.layers["head_T1"].data.shape
    cli_run = cli("predict", sequences["T1"], sequences["T2"], "-o", tmp_path / "cli.nii.gz", "--model", "t1-t2",
                  "--force")
    assert cli_run.returncode == 0, cli_run.stderr
    from napari_medseg.core.io import read_volume as read

    assert np.array_equal(layer.data, read(tmp_path / "cli.nii.gz").layer_data())
    widget._model.value = next(v for v in widget._model.choices if "t1-t2" not in str(v))
    assert [w.label for w in widget.channel_layers_widgets()] == ["Image"]
    viewer.layers.remove(layer)


def test_the_worklist_takes_a_csv_with_one_column_per_channel(sequences, two_channel_model, tmp_path):
    from napari_medseg.core.inference import InferenceSettings
    from napari_medseg.core.worklist import Worklist, run_worklist
    from napari_medseg.core.workspace import Workspace

    table = tmp_path / "cases.csv"
    table.write_text(f"name,T1,T2\nhead,{sequences['T1'].name},{sequences['T2'].name}\n"
                     f"broken,{sequences['T1'].name},missing_T2.nii.gz\n", encoding="utf-8")
    workspace = Workspace(tmp_path / "ws")
    worklist = Worklist(workspace)
    added, _known = worklist.add([table])
    assert sorted(case.name for case in added) == ["broken", "head"]
    broken = next(case for case in added if case.name == "broken")
    assert broken.status == "failed" and broken.reason == "row 3 of 'cases.csv' has no readable T2 file"
    summary = run_worklist(workspace, load_model(two_channel_model.path), settings=InferenceSettings(device="cpu"))
    assert summary.predicted == 1, summary
    case = next(c for c in worklist.cases() if c.name == "head")
    assert case.status == "predicted" and len(case.sources) == 2
    done = cli("predict", sequences["T1"], sequences["T2"], "-o", tmp_path / "cli.nii.gz", "--model", "t1-t2",
               "--force")
    assert done.returncode == 0, done.stderr
    stored = np.asarray(nib.load(worklist.path(case, "mask")).dataobj)
    assert np.array_equal(stored, np.asarray(nib.load(tmp_path / "cli.nii.gz").dataobj))
    listing = cli("worklist", "list", "--workspace", tmp_path / "ws", "--json")
    assert listing.returncode == 0 and str(tmp_path) not in listing.stdout  # no paths printed
