"""The attention U-Net: shapes, gate outputs and named layers for explainability."""

from __future__ import annotations

import pytest
import torch

from napari_medseg.core.network import AttentionUNet3D, build_network, fuse_batch_norm


def tiny_net(**kw) -> AttentionUNet3D:
    torch.manual_seed(0)
    return AttentionUNet3D(in_channels=1, out_channels=3, channels=(4, 8, 16), **kw).eval()


def test_forward_gives_one_logit_map_per_class():
    net = tiny_net()
    x = torch.randn(2, 1, 16, 24, 8)
    with torch.inference_mode():
        y = net(x)
    assert y.shape == (2, 3, 16, 24, 8) and torch.isfinite(y).all()
    assert net.divisor == 4


def test_attention_gate_coefficients_are_exposed_at_skip_resolution():
    net = tiny_net()
    net.record_attention = True
    with torch.inference_mode():
        net(torch.randn(1, 1, 16, 16, 16))
    maps = net.attention_maps
    assert sorted(maps) == ["gates.0", "gates.1"]
    assert maps["gates.0"].shape == (1, 1, 8, 8, 8) and maps["gates.1"].shape == (1, 1, 16, 16, 16)
    for alpha in maps.values():
        assert float(alpha.min()) >= 0.0 and float(alpha.max()) <= 1.0
        assert float(alpha.std()) > 0  # the gate is input-dependent, not a constant


def test_gates_change_the_output():
    """The coefficients multiply the skips: forcing them open changes the prediction."""
    net = tiny_net()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        gated = net(x)
        for gate in net.gates:
            torch.nn.init.constant_(gate.psi.bias, 50.0)  # sigmoid -> 1
            torch.nn.init.zeros_(gate.psi.weight)
        opened = net(x)
    assert (gated - opened).abs().max() > 1e-4


def test_named_layers_accept_forward_hooks():
    net = tiny_net()
    names = dict(net.named_modules())
    for name in ("encoders.0", "encoders.1", "bottleneck", "decoders.0", "gates.0", "head"):
        assert name in names
    captured = {}
    handle = names["bottleneck"].register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    net(torch.randn(1, 1, 16, 16, 16))
    handle.remove()
    assert captured["out"].shape == (1, 16, 4, 4, 4)


def test_build_network_by_name():
    net = build_network("AttentionUNet3D", {"in_channels": 1, "out_channels": 2, "channels": [4, 8]})
    assert net.hparams == {"in_channels": 1, "out_channels": 2, "channels": [4, 8]}
    with pytest.raises(KeyError):
        build_network("NoSuchNet", {})


def test_lean_inference_path_matches_the_plain_path():
    """No-grad inference frees skips early and splits the concatenation; same outputs."""
    net = tiny_net()
    net.record_attention = True
    x = torch.randn(1, 1, 16, 24, 16)
    plain = net(x).detach()
    plain_maps = {k: v.detach().clone() for k, v in net.attention_maps.items()}
    with torch.inference_mode():
        lean = net(x)
    torch.testing.assert_close(lean, plain, atol=1e-5, rtol=1e-5)
    for name, alpha in plain_maps.items():
        torch.testing.assert_close(net.attention_maps[name], alpha, atol=1e-6, rtol=1e-6)


def test_forward_hooks_see_every_layer_under_inference_mode():
    net = tiny_net()
    seen = []
    handles = [dict(net.named_modules())[name].register_forward_hook(lambda m, i, o, n=name: seen.append(n))
               for name in ("decoders.0", "decoders.1", "head")]
    with torch.inference_mode():
        net(torch.randn(1, 1, 16, 16, 16))
    for handle in handles:
        handle.remove()
    assert seen == ["decoders.0", "decoders.1", "head"]


# -- deepbet's LinkNet3d, rebuilt eagerly ------------------------------------------------------

@pytest.fixture(scope="module")
def deepbet_folder():
    from napari_medseg.core.convert import find_deepbet

    return find_deepbet()  # the testing extra installs deepbet 1.0.2


@pytest.mark.parametrize("weights", ["bbox_model.pt", "model.pt"])
def test_eager_linknet_reproduces_deepbets_torchscript(deepbet_folder, weights):
    from napari_medseg.core.network import LinkNet3d

    scripted = torch.jit.load(str(deepbet_folder / weights), map_location="cpu").eval()
    eager = LinkNet3d().eval()
    eager.load_state_dict(scripted.state_dict(), strict=True)  # every key matches
    torch.manual_seed(0)
    x = torch.randn(1, 1, 64, 96, 64)
    with torch.no_grad():
        expected, ours = scripted(x), eager(x)
    assert ours.shape == expected.shape == (1, 2, 64, 96, 64)
    assert float((ours - expected).abs().max()) <= 1e-4


def test_linknet_trains_and_takes_forward_hooks():
    """What TorchScript refuses: a gradient step, and hooks on a named layer (for Grad-CAM)."""
    from napari_medseg.core.network import LinkNet3d

    torch.manual_seed(0)
    net = LinkNet3d(channels=(8, 16, 32, 64)).train()
    seen = {}
    net.up3.register_forward_hook(lambda module, inputs, output: seen.update(up3=tuple(output.shape)))
    x = torch.randn(1, 1, 64, 64, 64)
    target = (torch.rand(1, 64, 64, 64) > 0.5).long()
    before = net.tp_conv2.weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(net(x, return_logits=True), target)
    loss.backward()
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert seen["up3"] == (1, 8, 16, 16, 16)
    assert not torch.equal(before, net.tp_conv2.weight) and net.up3.conv1[0].weight.grad is not None
    probabilities = net.eval()(x)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(1, 64, 64, 64))


def test_batch_norm_folds_into_monais_convolution_blocks_with_the_same_outputs():
    """An imported bundle's UNet: every BatchNorm3d sits in a MONAI Convolution block's ADN."""
    import copy

    from monai.networks.nets import UNet

    torch.manual_seed(0)
    network = UNet(3, 1, 2, [8, 16, 32], [2, 2], num_res_units=2, norm="batch")
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm3d):  # statistics a trained network would have
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    network.eval()
    fused = fuse_batch_norm(copy.deepcopy(network))
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in network.modules()) == 9
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fused.modules())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), network(x), atol=1e-5, rtol=1e-5)
