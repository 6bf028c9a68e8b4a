"""Explanation maps: sanity checks (Adebayo et al. 2018), an independent Grad-CAM, the engine's
outputs, the doubtful-region list, and the Explain widget in a real viewer."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from napari_medseg.viewer._sample import sample_path
from napari_medseg.core.errors import MedsegError
from napari_medseg.core.explain import GradCamPredictor, default_layer, explain, uncertain_regions
from napari_medseg.core.inference import InferenceSettings, NetworkPredictor, segment, sliding_window
from napari_medseg.core.io import read_volume
from napari_medseg.core.models import Model, ModelRegistry


@pytest.fixture(scope="module")
def registry():
    return ModelRegistry(home="/nonexistent-medseg-home")


@pytest.fixture(scope="module")
def head():
    volume = read_volume(sample_path())
    return volume.layer_data(), volume.geometry.layer_affine_ras, volume.geometry.layer_spacing


def randomised(model) -> Model:
    torch.manual_seed(0)
    network = type(model.network)(**model.card.network.hparams).eval()
    return Model(network, model.card, None, model.roi_network)


@pytest.mark.parametrize("name", ["brain-t1-attention", "brain-t1"])
def test_gradcam_passes_the_sanity_checks(registry, head, name):
    image, affine, spacing = head
    model = registry.load(name)
    cam = explain(image, affine, model, "gradcam").map
    predicted = segment(image, affine, model).labels == 1
    # Randomising the parameters changes the map (model-parameter randomisation test).
    random_cam = explain(image, affine, randomised(model), "gradcam").map
    rho = stats.spearmanr(cam.ravel(), random_cam.ravel()).correlation
    # The map's positive mass lies on the predicted brain, give or take 5 mm.
    near = ndimage.binary_dilation(predicted, iterations=int(np.ceil(5 / min(spacing))))
    mass = float(cam[near].sum() / cam.sum())
    print(f"{name}: Spearman against a randomised model {rho:.3f}, mass within 5 mm {mass:.3f}")
    assert rho < 0.5 and mass >= 0.7
    assert cam.shape == image.shape and float(cam.max()) == pytest.approx(1.0, abs=1e-5)


def test_entropy_is_highest_on_the_boundary(registry, head):
    image, affine, spacing = head
    model = registry.load("brain-t1-attention")
    entropy = explain(image, affine, model, "entropy").map
    mask = segment(image, affine, model).labels == 1
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    voxel = min(spacing)
    band = (mask & (inside <= 2 * voxel)) | (~mask & (outside <= 2 * voxel))
    deep, far = inside > 4 * voxel, outside > 4 * voxel
    assert entropy[band].mean() > 3 * entropy[deep].mean() and entropy[band].mean() > 3 * entropy[far].mean()
    assert 0.0 <= float(entropy.min()) and float(entropy.max()) <= 1.0


@pytest.mark.parametrize("name, size", [("brain-t1-attention", (48, 56, 48)), ("brain-t1", (64, 64, 64))])
def test_gradcam_agrees_with_captum_on_one_window(registry, name, size):
    from captum.attr import LayerAttribution, LayerGradCam

    model = registry.load(name)
    network = model.network
    torch.manual_seed(1)
    x = torch.randn(1, 1, *size)
    x[..., size[0] // 4: 3 * size[0] // 4, size[1] // 4: 3 * size[1] // 4, :] += 2.0
    layer = default_layer(network, model.card.network.architecture)
    ours = GradCamPredictor(network, layer, 1, output=model.card.pipeline.output)(x)["gradcam"][0, 0]
    logits = lambda t: network(t, return_logits=True) if hasattr(network, "logits") else network(t)  # noqa: E731
    with torch.no_grad():
        region = (logits(x).argmax(1) == 1).float()
    assert region.sum() > 0
    captum = LayerGradCam(lambda t: (logits(t)[:, 1] * region).sum(dim=(1, 2, 3)),
                          dict(network.named_modules())[layer])
    theirs = LayerAttribution.interpolate(captum.attribute(x, relu_attributions=True), size, "trilinear")[0, 0]
    correlation = np.corrcoef(ours.detach().numpy().ravel(), theirs.detach().numpy().ravel())[0, 1]
    print(f"{name} at {layer}: correlation with captum's LayerGradCam {correlation:.5f}")
    assert correlation >= 0.99


def test_the_opened_engine_gives_the_same_labels_with_any_extra_outputs(registry, head):
    from napari_medseg.core.explain import _ActivationPredictor, _AttentionPredictor
    from napari_medseg.core.pipeline import prepare

    image, affine, _ = head
    model = registry.load("brain-t1-attention")
    prepared = prepare(image, affine, model.card)
    settings = InferenceSettings(device="cpu", window_voxels=40 * 48 * 40)  # several windows
    plain = sliding_window(prepared.tensor, NetworkPredictor(model.network), model.card.pipeline.patch_size,
                           settings)
    assert plain.info["windows"] > 1
    for predictor, keep in ((_AttentionPredictor(model.network), ("attention",)),
                            (_ActivationPredictor(model.network, "decoders.2", 3), ("activation",))):
        opened = sliding_window(prepared.tensor, predictor, model.card.pipeline.patch_size, settings, keep=keep)
        np.testing.assert_array_equal(opened.labels, plain.labels)
        assert opened.maps[keep[0]].shape[1:] == prepared.tensor.shape


@pytest.mark.parametrize("method", ["attention", "gradcam", "entropy", "tta", "activation"])
def test_cli_maps_share_the_scans_geometry(tmp_path, method):
    out, regions = tmp_path / "map.nii.gz", tmp_path / "regions.json"
    result = subprocess.run([sys.executable, "-m", "napari_medseg.cli", "explain", str(sample_path()), "--method",
                             method, "--model", "brain-t1-attention", "-o", str(out), "--regions", str(regions),
                             "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    written, source = nib.load(out), nib.load(sample_path())
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    expected = source.shape + ((3,) if method == "attention" else ())
    assert written.shape == expected and written.get_data_dtype() == np.float32
    listing = json.loads(regions.read_text())
    assert listing["method"] == method and isinstance(listing["regions"], list)
    for region in listing["regions"]:
        assert {"ml", "mean", "centre_lps_mm", "centre_ras_mm", "centre_file_voxel"} <= set(region)


def test_doubtful_regions_are_sorted_and_placed_in_millimetres():
    values = np.zeros((30, 40, 50), np.float32)
    values[2:8, 2:8, 2:8] = 0.9          # 216 voxels, very uncertain
    values[15:27, 20:30, 30:45] = 0.6    # 1,800 voxels, less so
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (10, 20, 30)
    by_size = uncertain_regions(values, affine, threshold=0.5)
    assert [r["voxels"] for r in by_size] == [1800, 216]
    assert by_size[0]["ml"] == pytest.approx(1800 * 8 / 1000)
    assert by_size[0]["centre_ras_mm"] == pytest.approx([10 + 2 * 20.5, 20 + 2 * 24.5, 30 + 2 * 37.0])
    assert by_size[0]["centre_lps_mm"][:2] == pytest.approx([-by_size[0]["centre_ras_mm"][0],
                                                             -by_size[0]["centre_ras_mm"][1]])
    by_mean = uncertain_regions(values, affine, threshold=0.5, order="mean")
    assert [r["voxels"] for r in by_mean] == [216, 1800]


def test_maps_are_reused_but_never_for_another_network(registry, head):
    image, affine, _ = head
    model = registry.load("brain-t1-attention")
    first = explain(image, affine, model, "entropy")
    assert explain(image, affine, model, "entropy") is first
    assert explain(image, affine, randomised(model), "entropy") is not first


def test_clear_errors_for_what_a_model_cannot_explain(registry, head):
    image, affine, _ = head
    default = registry.load("brain-t1")
    with pytest.raises(MedsegError, match="does not offer attention maps"):
        explain(image, affine, default, "attention")
    attention = registry.load("brain-t1-attention")
    with pytest.raises(MedsegError, match="no class 'tumour'"):
        explain(image, affine, attention, "gradcam", target="tumour")
    with pytest.raises(MedsegError, match="no layer 'decoders.9'"):
        explain(image, affine, attention, "activation", layer="decoders.9")
    with pytest.raises(MedsegError, match="channels 0 to"):
        explain(image, affine, attention, "activation", channel=999)


# -- the widget --------------------------------------------------------------------------

@pytest.fixture
def explain_widget(make_napari_viewer, monkeypatch, tmp_path):
    from napari_medseg.viewer._reader import read_scan
    from napari_medseg.viewer._widgets.explain import ExplainWidget

    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    viewer = make_napari_viewer()
    for data, kwargs, kind in read_scan(str(sample_path())):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explain")
    widget._model.value = next(path for path in widget._model.choices if "attention" in str(path))
    return viewer, widget


def run(qtbot, widget):
    task = widget.run()
    assert task is not None
    qtbot.waitUntil(lambda: not task.running, timeout=120000)
    assert task.error is None, task.error
    return task


@pytest.mark.parametrize("method", ["attention", "gradcam", "entropy", "tta", "activation"])
def test_each_method_overlays_the_scan(qtbot, explain_widget, method):
    viewer, widget = explain_widget
    widget._method.value = method
    run(qtbot, widget)
    scan = viewer.layers["MNI152_T1_2mm"]
    maps = [layer for layer in viewer.layers if layer.name.startswith(f"MNI152_T1_2mm {method}")]
    assert len(maps) == (3 if method == "attention" else 1)
    for layer in maps:
        assert layer.data.shape == scan.data.shape and layer.blending == "additive"
        np.testing.assert_allclose(layer.affine.affine_matrix, scan.affine.affine_matrix)
        assert layer.colormap.name in ("inferno", "turbo")
    assert "dark" in widget._legend.value and "bright" in widget._legend.value
    widget._opacity.value = 0.3
    assert widget.last_layer.opacity == pytest.approx(0.3)


def test_the_region_list_moves_the_viewer_to_a_region(qtbot, explain_widget):
    viewer, widget = explain_widget
    widget._method.value = "entropy"
    run(qtbot, widget)
    assert widget.regions and widget._regions.value["data"]
    widget._order.value = "mean uncertainty"
    means = [row[2] for row in widget._regions.value["data"]]
    assert means == sorted(means, reverse=True)
    target = widget.regions[-1]
    widget._regions.native.cellClicked.emit(len(widget.regions) - 1, 0)
    world = viewer.layers["MNI152_T1_2mm"].data_to_world(target["centre_index"])
    np.testing.assert_allclose(viewer.dims.point[-3:], world, atol=2.5)  # to the nearest slice (2 mm)
    np.testing.assert_allclose(viewer.camera.center[-3:], world, atol=1e-3)


def test_gradcam_on_a_drawn_region(qtbot, explain_widget):
    viewer, widget = explain_widget
    widget._method.value = "gradcam"
    # An encoder block: its receptive field is small enough that the region changes the
    # channel weights (measured on this model: correlation 0.945 at encoders.1, but
    # 0.99999 from the bottleneck on, where every voxel sees the whole brain).
    widget._layer.value = "encoders.1"
    run(qtbot, widget)
    whole = widget.last_layer.data.copy()
    scan = viewer.layers["MNI152_T1_2mm"]
    viewer.add_points([scan.data_to_world([45, 60, 45])], name="here")
    widget._region_kind.value = "a shapes or points layer"
    widget._region_layer.value = viewer.layers["here"]
    ball = widget._region(scan)
    assert 400 < int(ball.sum()) < 700  # a 10 mm ball of 2 mm voxels: about 520
    task = run(qtbot, widget)
    assert task.result[1].info["region"] == "a given mask"
    assert task.result[1].info["layer"] == "encoders.1"  # the choice survived the added layer
    # The target is another one, so the map is another one.
    assert np.corrcoef(whole.ravel(), widget.last_layer.data.ravel())[0, 1] < 0.99
