"""Segmentation networks: an attention U-Net of our own, and published networks rebuilt eagerly.

:class:`AttentionUNet3D` is a 3D U-Net with additive attention gates (Oktay et al.,
2018), built for speed. :class:`LinkNet3d` is deepbet's brain-extraction network
(Fisch et al. 2024), rebuilt as an ordinary ``nn.Module`` from the structure of its
TorchScript graph so that it loads deepbet's weights exactly, trains, and takes forward
hooks (TorchScript modules refuse them, which rules out Grad-CAM and layer maps).

The attention U-Net in detail:

Design choices, with cost in mind (MONAI's ``AttentionUnet`` of similar width runs
about 10x slower than its ``UNet`` on a CPU):

* Gates are computed at the *coarse* (gating) resolution, where there are 8x fewer
  voxels, and only the single-channel coefficient map is upsampled to the skip.
* The full-resolution level has one thin convolution on each side instead of two:
  it dominates the cost of a 3D U-Net (two 16-channel full-resolution convolutions
  made an earlier version 7x slower than MONAI's ``UNet``).
* Batch norm rather than instance norm: in eval mode it is a fixed per-channel affine,
  so a voxel's prediction does not depend on which sliding window it fell in, and it
  can be folded into the preceding convolution (:func:`fuse_batch_norm`).
* LeakyReLU, stride-2 convolutions down, transposed convolutions up.

For explainability, every gate's coefficient map is kept in :attr:`attention_maps`
after a forward pass when :attr:`record_attention` is on, and the sub-modules have
stable names (``encoders.N``, ``bottleneck``, ``decoders.N``, ``gates.N``, ``head``)
for forward hooks such as Grad-CAM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_block(in_channels: int, out_channels: int, stride: int = 1, n_convs: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index in range(n_convs):
        layers += [
            nn.Conv3d(in_channels if index == 0 else out_channels, out_channels, 3,
                      stride=stride if index == 0 else 1, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
            nn.LeakyReLU(0.01, inplace=True),
        ]
    return nn.Sequential(*layers)


def fuse_batch_norm(network: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm3d into the Conv3d before it (in place).

    Inference gets the same outputs (to float rounding) with one pass fewer over
    every feature map.
    """
    for module in network.modules():
        if not isinstance(module, nn.Sequential):
            continue
        _fuse_monai_convolution(module)
        children = list(module.children())
        for index in range(len(children) - 1):
            conv, norm = children[index], children[index + 1]
            if isinstance(conv, nn.Conv3d) and isinstance(norm, nn.BatchNorm3d):
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
                fused = nn.Conv3d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                  stride=conv.stride, padding=conv.padding, bias=True)
                with torch.no_grad():
                    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1, 1))
                    fused.bias.copy_((bias - norm.running_mean) * scale + norm.bias)
                module[index] = fused
                module[index + 1] = nn.Identity()
    return network


def _fuse_monai_convolution(block: nn.Sequential) -> None:
    """MONAI's ``Convolution`` block (``conv``, then ``adn`` with the norm first): the same fold.
    An imported bundle's UNet is made of them; its batch norm is about 8 % of a CPU pass."""
    conv, adn = getattr(block, "conv", None), getattr(block, "adn", None)
    norm = getattr(adn, "N", None) if isinstance(adn, nn.Sequential) else None
    if not (isinstance(norm, nn.BatchNorm3d) and isinstance(conv, (nn.Conv3d, nn.ConvTranspose3d))
            and next(iter(adn.children())) is norm and norm.track_running_stats and not norm.training):
        return
    scale = (norm.weight if norm.affine else torch.ones_like(norm.running_var)) / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    transposed = isinstance(conv, nn.ConvTranspose3d)
    if transposed and conv.groups != 1:
        return
    with torch.no_grad():
        conv.weight.mul_(scale.view(1, -1, 1, 1, 1) if transposed else scale.view(-1, 1, 1, 1, 1))
        conv.bias = nn.Parameter((bias - norm.running_mean) * scale + shift, requires_grad=False)
    adn.N = nn.Identity()


class AttentionGate(nn.Module):
    """Additive attention: alpha = sigmoid(psi(relu(W_x x + W_g g))) on a skip ``x``."""

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int):
        super().__init__()
        self.skip_proj = nn.Conv3d(skip_channels, inter_channels, 1, stride=2, bias=False)
        self.gate_proj = nn.Conv3d(gate_channels, inter_channels, 1, bias=True)
        self.psi = nn.Conv3d(inter_channels, 1, 1, bias=True)

    def coefficients(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The gate's coefficient map ``alpha`` at the skip's resolution, ``(N, 1, *skip)``."""
        coarse = self.skip_proj(skip)
        if coarse.shape[2:] != gate.shape[2:]:
            gate = F.interpolate(gate, size=coarse.shape[2:], mode="trilinear", align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(coarse + self.gate_proj(gate))))
        return F.interpolate(alpha, size=skip.shape[2:], mode="trilinear", align_corners=False)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.coefficients(skip, gate)
        return skip * alpha, alpha


class AttentionUNet3D(nn.Module):
    """3D attention U-Net.

    Parameters
    ----------
    in_channels, out_channels
        Image channels in; classes out (logits, background included).
    channels
        Feature width per level, finest first; ``len(channels) - 1`` downsamplings,
        so inputs must be divisible by ``2 ** (len(channels) - 1)``.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2,
                 channels: tuple = (16, 32, 64, 128)):
        super().__init__()
        self.hparams = {"in_channels": in_channels, "out_channels": out_channels, "channels": list(channels)}
        self.encoders = nn.ModuleList()
        previous = in_channels
        for level, width in enumerate(channels[:-1]):
            self.encoders.append(_conv_block(previous, width, stride=1 if level == 0 else 2,
                                             n_convs=1 if level == 0 else 2))
            previous = width
        self.bottleneck = _conv_block(previous, channels[-1], stride=2)
        self.upsamplers = nn.ModuleList()
        self.gates = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for width, coarser in zip(reversed(channels[:-1]), reversed(channels[1:])):
            finest = width == channels[0] and len(self.decoders) == len(channels) - 2
            self.gates.append(AttentionGate(width, coarser, max(width // 2, 4)))
            self.upsamplers.append(nn.ConvTranspose3d(coarser, width, 2, stride=2))
            self.decoders.append(_conv_block(2 * width, width, n_convs=1 if finest else 2))
        self.head = nn.Conv3d(channels[0], out_channels, 1)
        self.record_attention = False
        self.attention_maps: dict[str, torch.Tensor] = {}

    @property
    def divisor(self) -> int:
        return 2 ** len(self.encoders)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and not torch.is_grad_enabled() and not self._hooked():
            return self._forward_lean(x)
        x, skips = self._encode(x)
        for index, (gate, up, decoder) in enumerate(zip(self.gates, self.upsamplers, self.decoders)):
            skip = skips[-1 - index]
            gated, alpha = gate(skip, x)
            if self.record_attention:
                self.attention_maps[f"gates.{index}"] = alpha.detach()
            x = decoder(torch.cat([up(x), gated], dim=1))
        return self.head(x)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Encoder and bottleneck: the coarsest features and the skips, finest first."""
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        if self.record_attention:
            self.attention_maps = {}
        return self.bottleneck(x), skips

    def _hooked(self) -> bool:
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules())

    def _forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        """Inference without autograd, in less memory; same outputs to float rounding.

        Each skip is released as soon as it is gated, and the concatenation before each
        decoder becomes two convolutions summed (the decoder's first kernel split by
        input channel), so the full-resolution level never holds the doubled map. A
        sliding window spends most of its memory there. Gradient passes (training,
        Grad-CAM) and any network with forward hooks take the plain path, so hooks
        always see every layer.
        """
        x, skips = self._encode(x)
        for index, (gate, up, decoder) in enumerate(zip(self.gates, self.upsamplers, self.decoders)):
            skip = skips.pop()
            alpha = gate.coefficients(skip, x)
            if self.record_attention:
                self.attention_maps[f"gates.{index}"] = alpha
            gated = skip * alpha
            del skip, alpha
            conv = decoder[0]
            width = gated.shape[1]
            out = F.conv3d(gated, conv.weight[:, width:], None, conv.stride, conv.padding)
            del gated
            out += F.conv3d(up(x), conv.weight[:, :width], conv.bias, conv.stride, conv.padding)
            x = decoder[1:](out)
        return self.head(x)


class _ResidualBlock(nn.Module):
    """Two 3x3x3 convolutions with instance norm and a residual connection (ResNet's basic block)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.InstanceNorm3d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.InstanceNorm3d(out_channels),
        )
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.InstanceNorm3d(out_channels))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(self.double_conv(x) + shortcut)


class _EncoderStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.block1 = _ResidualBlock(in_channels, out_channels, stride)
        self.block2 = _ResidualBlock(out_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))


class _DecoderStage(nn.Module):
    """1x1 reduction to a quarter, a 3x3x3 transposed convolution, 1x1 expansion (LinkNet)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        inner = in_channels // 4
        self.conv1 = nn.Sequential(nn.Conv3d(in_channels, inner, 1, bias=False), nn.InstanceNorm3d(inner),
                                   nn.ReLU(inplace=True))
        self.tp_conv = nn.Sequential(
            nn.ConvTranspose3d(inner, inner, 3, stride=stride, padding=1, output_padding=stride - 1, bias=False),
            nn.InstanceNorm3d(inner), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv3d(inner, out_channels, 1, bias=False), nn.InstanceNorm3d(out_channels),
                                   nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.tp_conv(self.conv1(x)))


class LinkNet3d(nn.Module):
    """deepbet's LinkNet3d (Fisch et al. 2024): a ResNet-18-like encoder with additive skips.

    Layout read from deepbet 1.0.2's TorchScript graph: a 7x7x7 stride-2 convolution,
    instance norm, ReLU and a 3x3x3 stride-2 max-pool (``init``); four encoder stages of
    two residual blocks (16, 32, 64, 128 channels; stride 1, 2, 2, 2); four LinkNet
    decoder stages whose outputs are added to the matching encoder outputs; then a
    stride-2 transposed convolution, a 3x3x3 convolution and a final stride-2
    transposed convolution to the classes. Instance norm has no learned parameters.
    The network ends in a softmax (``output: probabilities`` in the model card), as
    deepbet's does; :meth:`logits` gives the values before it, for Grad-CAM.

    Inputs must be divisible by 32 along every axis. Module names match deepbet's, so
    its ``state_dict`` loads with every key matching.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, channels: tuple = (16, 32, 64, 128)):
        super().__init__()
        self.hparams = {"in_channels": in_channels, "out_channels": out_channels, "channels": list(channels)}
        c0, c1, c2, c3 = channels
        self.init = nn.Sequential(nn.Conv3d(in_channels, c0, 7, stride=2, padding=3, bias=False),
                                  nn.InstanceNorm3d(c0), nn.ReLU(inplace=True),
                                  nn.MaxPool3d(3, stride=2, padding=1))
        self.down0 = _EncoderStage(c0, c0, 1)
        self.down1 = _EncoderStage(c0, c1, 2)
        self.down2 = _EncoderStage(c1, c2, 2)
        self.down3 = _EncoderStage(c2, c3, 2)
        self.up0 = _DecoderStage(c3, c2, 2)
        self.up1 = _DecoderStage(c2, c1, 2)
        self.up2 = _DecoderStage(c1, c0, 2)
        self.up3 = _DecoderStage(c0, c0, 1)
        half = c0 // 2
        self.tp_conv1 = nn.Sequential(nn.ConvTranspose3d(c0, half, 3, stride=2, padding=1, output_padding=1),
                                      nn.InstanceNorm3d(half), nn.ReLU(inplace=True))
        self.conv = nn.Sequential(nn.Conv3d(half, half, 3, padding=1), nn.InstanceNorm3d(half),
                                  nn.ReLU(inplace=True))
        self.tp_conv2 = nn.ConvTranspose3d(half, out_channels, 2, stride=2)

    divisor = 32
    prefers_channels_last = False  # instance norm runs faster on the default layout (measured on a CPU)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        e0 = self.init(x)
        e1 = self.down0(e0)
        e2 = self.down1(e1)
        e3 = self.down2(e2)
        d = self.up0(self.down3(e3)) + e3
        del e3
        d = self.up1(d) + e2
        del e2
        d = self.up2(d) + e1
        del e1
        d = self.up3(d) + e0
        del e0
        return self.tp_conv2(self.conv(self.tp_conv1(d)))

    def forward(self, x: torch.Tensor, return_logits: bool = False) -> torch.Tensor:
        logits = self.logits(x)
        return logits if return_logits else torch.softmax(logits, dim=1)


ARCHITECTURES = {"AttentionUNet3D": AttentionUNet3D, "LinkNet3d": LinkNet3d}


def class_scores(network, x: torch.Tensor, output: str) -> torch.Tensor:
    """The network's class scores before the softmax, for losses and gradients.

    ``output`` is the card's ``pipeline.output``: a network that returns probabilities
    (deepbet's LinkNet3d ends in a softmax) gives its scores through ``return_logits``.
    ``network`` may be DDP's wrapper, which must see the forward pass.
    """
    return network(x) if output == "logits" else network(x, return_logits=True)


def build_network(architecture: str, hparams: dict) -> nn.Module:
    if architecture == "NnUNetEnsemble":  # an imported nnU-Net model (see .nnunet)
        from .nnunet import NnUNetEnsemble

        return NnUNetEnsemble(**hparams)
    if architecture == "NnUNetParts":  # a task split over several nnU-Net models (TotalSegmentator)
        from .nnunet import NnUNetParts

        return NnUNetParts(**hparams)
    if architecture == "MonaiBundleNetwork":  # an imported MONAI bundle (see .bundle)
        from .bundle import build_bundle_network

        return build_bundle_network(**hparams)
    if architecture not in ARCHITECTURES:
        raise KeyError(architecture)
    return ARCHITECTURES[architecture](**hparams)
