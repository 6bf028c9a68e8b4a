"""The sliding-window engine on the CPU with tiny networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_card
from napari_medseg.core.errors import Cancelled, MedsegError
from napari_medseg.core.inference import (
    InferenceSettings,
    gaussian_importance,
    axis_plans,
    plan_windows,
    sliding_window,
)
from napari_medseg.core.devices import cpu_has_native_bf16
from napari_medseg.core.network import AttentionUNet3D, fuse_batch_norm


def tiny_net(classes=3) -> AttentionUNet3D:
    torch.manual_seed(0)
    net = AttentionUNet3D(1, classes, (4, 8, 16))
    # Non-trivial batch-norm statistics, so folding them is really exercised.
    for module in net.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return net.eval()


class ConstantLogits(nn.Module):
    """A real module whose output is the same logits at every voxel."""

    divisor = 1

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits.view(1, -1, 1, 1, 1).expand(x.shape[0], -1, *x.shape[2:]).clone()


def test_one_window_equals_a_direct_forward_pass():
    net = tiny_net()
    image = torch.randn(32, 24, 16)
    with torch.inference_mode():
        direct = net(image[None, None])[0]
    result = sliding_window(image, net, (32, 24, 16), InferenceSettings(device="cpu"),
                            keep=("logits",))
    assert result.info["windows"] == 1
    np.testing.assert_array_equal(result.labels, direct.argmax(0).numpy())
    np.testing.assert_allclose(torch.softmax(result.maps["logits"], 0).numpy(), torch.softmax(direct, 0).numpy(), atol=1e-5)


def test_folded_batch_norm_gives_the_same_logits():
    net = tiny_net()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        before = net(x)
        after = fuse_batch_norm(net)(x)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    np.testing.assert_allclose(before.numpy(), after.numpy(), atol=1e-4)


@pytest.mark.parametrize("settings", [
    InferenceSettings(device="cpu", roi_size=(16, 16, 16), overlap=0.25),
    InferenceSettings(device="cpu", overlap=0.125, window_voxels=20 ** 3),
    InferenceSettings(device="cpu", roi_size=(12, 20, 8), overlap=0.5, sw_batch_size=3),
])
def test_blending_has_no_seams_for_a_constant_predictor(settings):
    logits = [0.3, -1.2, 2.0]
    result = sliding_window(torch.randn(37, 29, 41), ConstantLogits(logits), (16, 16, 16), settings,
                            keep=("logits",))
    assert result.info["windows"] > 1
    expected = torch.softmax(torch.tensor(logits), 0).numpy()
    probabilities = torch.softmax(result.maps["logits"], 0).numpy()
    assert probabilities.shape == (3, 37, 29, 41)
    np.testing.assert_allclose(probabilities, np.broadcast_to(expected[:, None, None, None], probabilities.shape),
                               atol=1e-6)
    assert (result.labels == 2).all()


def test_blended_result_matches_monai_sliding_window():
    from monai.inferers import sliding_window_inference

    net = fuse_batch_norm(tiny_net())
    image = torch.randn(40, 36, 44)
    ours = sliding_window(image, net, (16, 16, 16),
                          InferenceSettings(device="cpu", roi_size=(16, 16, 16), overlap=0.25),
                          keep=("logits",))
    with torch.inference_mode():
        theirs = sliding_window_inference(image[None, None], (16, 16, 16), 1, net, overlap=0.25,
                                          mode="gaussian")[0]
    agreement = (ours.labels == theirs.argmax(0).numpy()).mean()
    assert agreement > 0.995
    np.testing.assert_allclose(torch.softmax(ours.maps["logits"], 0).numpy(), torch.softmax(theirs, 0).numpy(), atol=0.02)


def test_progress_is_reported_per_window_and_reaches_one():
    calls = []
    result = sliding_window(torch.randn(28, 28, 28), ConstantLogits([0.0, 1.0]), (16, 16, 16),
                            InferenceSettings(device="cpu", roi_size=(16, 16, 16), overlap=0.25),
                            progress=lambda f, m: calls.append((f, m)))
    fractions = [f for f, _ in calls]
    assert len(calls) == result.info["windows"] == 8
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert calls[0][1] == "window 1 of 8"


def test_cancel_between_windows_stops_the_run():
    seen = []

    def progress(fraction, message):
        seen.append(fraction)
        if len(seen) == 3:
            raise Cancelled("cancelled")

    with pytest.raises(Cancelled):
        sliding_window(torch.randn(30, 30, 30), tiny_net(), (16, 16, 16),
                       InferenceSettings(device="cpu", roi_size=(16, 16, 16), overlap=0.25), progress=progress)
    assert len(seen) == 3


def test_mirror_tta_averages_the_mirrored_passes():
    net = tiny_net()
    image = torch.randn(16, 16, 16)
    x = image[None, None]
    with torch.inference_mode():
        manual = (net(x) + net(x.flip(2)).flip(2) + net(x.flip(3)).flip(3) + net(x.flip(4)).flip(4)) / 4
    result = sliding_window(image, net, (16, 16, 16), InferenceSettings(device="cpu", tta=True),
                            keep=("logits",))
    np.testing.assert_allclose(torch.softmax(result.maps["logits"], 0).numpy(), torch.softmax(manual[0], 0).numpy(), atol=1e-5)


def test_window_plans_cover_the_volume_with_the_requested_overlap():
    for size in (1, 7, 64, 65, 181, 217, 300, 512):
        for roi, starts in axis_plans(size, 12, 8, min(96, size + (-size) % 8)):
            assert roi % 8 == 0 and starts[0] == 0 and starts[-1] + roi >= size
            for a, b in zip(starts, starts[1:]):
                assert roi - (b - a) >= 12
    settings = InferenceSettings(device="cpu")
    roi, starts = plan_windows((181, 217, 181), (80, 96, 80), 8, settings, torch.device("cpu"))
    computed = np.prod([len(s) for s in starts]) * np.prod(roi)
    # Within three patches per window, and far fewer voxels computed than MONAI's
    # usual plan (ROI = patch, overlap 0.25: 27 windows, 2.3 times the volume).
    assert np.prod(roi) <= 3 * 80 * 96 * 80 and min(r - p for r, p in zip(roi, (80, 96, 80))) >= 0
    assert computed < 1.3 * 181 * 217 * 181


def test_gaussian_weights_peak_in_the_centre_and_never_vanish():
    w = gaussian_importance((9, 12, 5))
    assert float(w.max()) == 1.0 and float(w.min()) >= 1e-3
    assert w[4, 5:7, 2].min() == w.max()


def test_bad_settings_are_clear_errors():
    with pytest.raises(MedsegError, match="overlap"):
        InferenceSettings(overlap=1.5)
    with pytest.raises(MedsegError, match="device"):
        InferenceSettings(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MedsegError, match="no CUDA GPU"):
            sliding_window(torch.randn(8, 8, 8), ConstantLogits([0.0, 1.0]), (8, 8, 8),
                           InferenceSettings(device="cuda"))


@pytest.mark.gpu
def test_cuda_with_amp_agrees_with_the_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    net = fuse_batch_norm(tiny_net())
    image = torch.randn(48, 40, 56)
    cpu = sliding_window(image, net, (16, 16, 16), InferenceSettings(device="cpu"))
    gpu = sliding_window(image, net, (16, 16, 16), InferenceSettings(device="cuda"))
    assert gpu.info["device"].startswith("cuda") and gpu.info["amp"]
    assert (cpu.labels == gpu.labels).mean() > 0.99


def test_model_declared_clean_up_keeps_labels_inside_the_body_and_in_one_piece():
    from napari_medseg.core.inference import segment
    from napari_medseg.core.models import Model

    rng = np.random.default_rng(0)
    grid = np.mgrid[:40, :40, :40]
    body = np.sqrt(((grid - 20) ** 2).sum(0)) < 12
    image = (rng.normal(5, 2, body.shape) + 500 * body).astype(np.float32)
    card = make_card(name="constant", spacing=(1.0, 1.0, 1.0))
    everywhere = Model(ConstantLogits([0.0, 1.0]), card)
    assert (segment(image, np.eye(4), everywhere, InferenceSettings("cpu")).labels == 1).all()
    card = make_card(name="constant", spacing=(1.0, 1.0, 1.0), postprocessing=["inside_body", "largest_component"])
    labels = segment(image, np.eye(4), Model(ConstantLogits([0.0, 1.0]), card), InferenceSettings("cpu")).labels
    assert (labels[body] == 1).all() and (labels[~body] == 0).mean() > 0.99


def test_a_cpu_with_native_bf16_runs_our_models_in_bf16_and_imported_ones_as_their_tools_do(monkeypatch):
    """bf16 on a CPU that computes it natively, for our own models only: an imported model
    keeps float32 (its card's provenance says so), and NAPARI_MEDSEG_CPU_BF16=0 turns it off."""
    import dataclasses

    from napari_medseg.core.inference import InferenceSettings
    from napari_medseg.core.models import ModelRegistry

    brain = ModelRegistry().load("brain-t1")
    imported = dataclasses.replace(brain.card, provenance={**brain.card.provenance, "weights": "float32"})
    native = cpu_has_native_bf16()
    assert InferenceSettings(device="cpu").for_card(brain.card).network_amp is (True if native else None)
    assert InferenceSettings(device="cpu").for_card(imported).network_amp is None
    assert InferenceSettings(device="cpu", amp=False).for_card(brain.card).network_amp is False
    monkeypatch.setenv("NAPARI_MEDSEG_CPU_BF16", "0")
    assert not cpu_has_native_bf16()
    assert InferenceSettings(device="cpu").for_card(brain.card).network_amp is None


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_brain_t1_in_bf16_on_the_cpu_gives_the_float32_mask(monkeypatch):
    from napari_medseg.core.inference import InferenceSettings, segment
    from napari_medseg.core.io import read_volume
    from napari_medseg.core.models import ModelRegistry
    from napari_medseg.viewer._sample import sample_path

    model = ModelRegistry().load("brain-t1")
    volume = read_volume(sample_path())
    fast = segment(volume.layer_data(), volume.geometry.layer_affine_ras, model, InferenceSettings(device="cpu"))
    exact = segment(volume.layer_data(), volume.geometry.layer_affine_ras, model,
                    InferenceSettings(device="cpu", amp=False))
    assert fast.info["amp"] is True and exact.info["amp"] is False
    a, b = fast.labels == 1, exact.labels == 1
    agreement = 2 * (a & b).sum() / (a.sum() + b.sum())
    print(f"brain-t1 bf16 against float32 on the sample head: Dice {agreement:.4f}")
    assert agreement >= 0.995
