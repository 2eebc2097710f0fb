"""Encoder with a segmentation decoder and an image (reconstruction) decoder, no skip connections.

This is the "FCN_16_standard_no_STN" network of MaxStyle, which MixStyleFlow reuses: both
decoders see only the bottleneck code, so the image decoder's feature maps carry the image
"style" that MixStyleFlow learns and re-samples. Layer names used across the package:

* encoder stages ``0`` (stem, full resolution) to ``4`` (last down block, H/16);
* image-decoder layers ``1`` to ``4`` (outputs of the four up blocks: 64, 32, 16, 16 channels
  with the default widths). MixStyleFlow acts after image-decoder layers 2, 3 and 4.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "DualDecoderNet",
    "SegmentationOnlyNet",
    "SegmentationView",
    "build_network",
    "checkpoint_architecture",
    "image_decoder_channels",
    "reference_unet",
]


def _conv_bn_act(in_ch: int, out_ch: int, slope: float) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.LeakyReLU(slope)]


class _ResidualBody(nn.Module):
    """conv-BN-LReLU-conv-BN plus a 1x1 shortcut, then LReLU."""

    def __init__(self, in_ch: int, out_ch: int, slope: float):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn_act(in_ch, out_ch, slope),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1)
        self.act = nn.LeakyReLU(slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class _DownBlock(nn.Module):
    """Stride-2 3x3 convolution followed by a residual body."""

    def __init__(self, in_ch: int, out_ch: int, slope: float):
        super().__init__()
        self.down = nn.Conv2d(in_ch, in_ch, 3, stride=2, padding=1)
        self.res = _ResidualBody(in_ch, out_ch, slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(self.down(x))


class _UpBlock(nn.Module):
    """x2 upsampling (nearest, or a learned transposed convolution) followed by a residual body."""

    def __init__(self, in_ch: int, out_ch: int, slope: float, learned: bool):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, in_ch, 2, stride=2) if learned else nn.Upsample(scale_factor=2, mode="nearest")
        self.res = _ResidualBody(in_ch, out_ch, slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(self.up(x))


def image_decoder_channels(channels: Sequence[int] = (16, 32, 64, 128, 128)) -> dict[int, int]:
    """Channels of image-decoder layers 1..4 for the given encoder widths ({1: 64, 2: 32, 3: 16, 4: 16})."""
    outs = [channels[i] for i in range(len(channels) - 3, -1, -1)] + [channels[0]]
    return {k + 1: c for k, c in enumerate(outs)}


class DualDecoderNet(nn.Module):
    """Shared encoder, code decoupler + segmentation decoder, and denoising image decoder.

    Args:
        in_channels: image channels (1 for MRI, 3 for RGB fundus photographs).
        out_channels: segmentation channels (logits; sigmoid per channel is applied by the loss).
        channels: widths of the stem and of the down blocks; the default is the paper's.
        negative_slope: LeakyReLU slope.
        encoder_styles: optional ``{stage: nn.Module}`` inserted after encoder stages 0..4. They
            run in every forward pass; style layers act only in training mode by themselves.
        image_decoder_styles: optional ``{layer: nn.Module}`` inserted after image-decoder
            layers 1..4. They act only when the image decoder is asked to ``stylize``, so the
            clean reconstruction is never stylized.

    ``forward(x)`` returns ``(segmentation logits, reconstruction in [0, 1])``.
    The input's height and width must be divisible by 16.

    The network compiles with ``torch.jit.script`` (``SegmentationOnlyNet`` is what
    ``monai.bundle ckpt_export`` scripts): style layers are looked up by iterating the
    ``ModuleDict`` (TorchScript cannot index one with a computed key).
    """

    __jit_unused_properties__ = ["image_decoder_channels", "encoder_channels"]

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128, 128),
        negative_slope: float = 0.2,
        encoder_styles: Mapping[int, nn.Module] | None = None,
        image_decoder_styles: Mapping[int, nn.Module] | None = None,
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 5:
            raise ValueError(f"channels must list 5 widths (stem + 4 down blocks), got {channels}")
        self.in_channels, self.out_channels, self.channels = in_channels, out_channels, channels
        slope = negative_slope
        latent = channels[-1]

        self.stem = nn.Sequential(*_conv_bn_act(in_channels, channels[0], slope), *_conv_bn_act(channels[0], channels[0], slope))
        self.down_blocks = nn.ModuleList(_DownBlock(channels[i], channels[i + 1], slope) for i in range(4))
        self.bottleneck = nn.Sequential(nn.Conv2d(latent, latent, 1, bias=False), nn.BatchNorm2d(latent), nn.ReLU())
        self.code_decoupler = nn.Sequential(
            *_conv_bn_act(latent, latent, slope),
            nn.Conv2d(latent, latent, 3, padding=1, bias=False),
            nn.BatchNorm2d(latent),
            nn.ReLU(),
        )
        dec = image_decoder_channels(channels)
        widths = [latent] + [dec[k] for k in (1, 2, 3, 4)]
        self.seg_decoder = nn.ModuleList(_UpBlock(widths[i], widths[i + 1], slope, learned=False) for i in range(4))
        self.seg_head = nn.Conv2d(widths[-1], out_channels, 1)
        self.image_decoder = nn.ModuleList(_UpBlock(widths[i], widths[i + 1], slope, learned=True) for i in range(4))
        self.image_head = nn.Sequential(nn.Conv2d(widths[-1], in_channels, 1), nn.Sigmoid())

        self.encoder_styles = nn.ModuleDict()
        self.image_decoder_styles = nn.ModuleDict()
        for stage, layer in (encoder_styles or {}).items():
            self.set_style("encoder", stage, layer)
        for k, layer in (image_decoder_styles or {}).items():
            self.set_style("image_decoder", k, layer)

    @property
    def image_decoder_channels(self) -> dict[int, int]:
        """``{layer: channels}`` of image-decoder layers 1..4."""
        return image_decoder_channels(self.channels)

    @property
    def encoder_channels(self) -> dict[int, int]:
        """``{stage: channels}`` of encoder stages 0..4 (the outputs that encoder style layers act on)."""
        return dict(enumerate(self.channels))

    def set_style(self, where: str, index: int, layer: nn.Module | None) -> None:
        """Insert (or with ``None`` remove) a style layer after encoder stage ``index`` (0..4)
        or image-decoder layer ``index`` (1..4)."""
        valid = {"encoder": range(0, 5), "image_decoder": range(1, 5)}
        if where not in valid:
            raise ValueError(f"where must be 'encoder' or 'image_decoder', got {where!r}")
        if int(index) not in valid[where]:
            raise ValueError(f"{where} style index must be in {list(valid[where])}, got {index}")
        styles = self.encoder_styles if where == "encoder" else self.image_decoder_styles
        if layer is None:
            if str(int(index)) in styles:
                del styles[str(int(index))]
        else:
            styles[str(int(index))] = layer

    def _check_size(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [B, {self.in_channels}, H, W], got {list(x.shape)}")
        if x.shape[-1] % 16 != 0 or x.shape[-2] % 16 != 0:
            raise ValueError(f"input height and width must be divisible by 16, got {list(x.shape[-2:])}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> latent code ``z_i`` (H/16), applying any encoder style layers."""
        self._check_size(x)
        h = self.stem(x)
        h = self._encoder_style(0, h)
        for i, block in enumerate(self.down_blocks, start=1):
            h = self._encoder_style(i, block(h))
        return self.bottleneck(h)

    def encoder_features(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """``{stage: feature map}`` of encoder stages 0..4 (after any encoder style layer), e.g.
        to record the statistics that encoder-level MixStyleFlow samples from."""
        self._check_size(x)
        feats = {0: self._encoder_style(0, self.stem(x))}
        for i, block in enumerate(self.down_blocks, start=1):
            feats[i] = self._encoder_style(i, block(feats[i - 1]))
        return feats

    def segment(self, z: torch.Tensor) -> torch.Tensor:
        """Latent code -> segmentation logits (through the code decoupler)."""
        h = self.code_decoupler(z)
        for block in self.seg_decoder:
            h = block(h)
        return self.seg_head(h)

    def reconstruct(
        self, z: torch.Tensor, stylize: bool = False, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Latent code -> image in [0, 1].

        Args:
            stylize: apply the image-decoder style layers (MixStyleFlow's stylized image).
            return_features: also return ``{layer: feature map}`` of image-decoder layers 1..4
                (after any style layer), e.g. to record style statistics.
        """
        feats = {}
        h = z
        for k, block in enumerate(self.image_decoder, start=1):
            h = block(h)
            if stylize:
                h = self._image_decoder_style(k, h)
            if return_features:
                feats[k] = h
        img = self.image_head(h)
        return (img, feats) if return_features else img

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.segment(z), self.reconstruct(z)

    def _encoder_style(self, index: int, h: torch.Tensor) -> torch.Tensor:
        key = str(index)
        # a loop over the ModuleDict of this module, not styles[key]: TorchScript indexes a
        # ModuleDict only with literals, and cannot take one as a function argument
        for name, layer in self.encoder_styles.items():
            if name == key:
                h = layer(h)
        return h

    def _image_decoder_style(self, index: int, h: torch.Tensor) -> torch.Tensor:
        key = str(index)
        for name, layer in self.image_decoder_styles.items():
            if name == key:
                h = layer(h)
        return h

class SegmentationOnlyNet(DualDecoderNet):
    """The same network (same state-dict keys) returning only the segmentation logits.

    For inference, ``monai.bundle verify_net_in_out`` and ``ckpt_export``, which expect one
    output tensor. The image decoder is kept so training checkpoints load with ``strict=True``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.segment(self.encode(x))


class SegmentationView(nn.Module):
    """A view of a :class:`DualDecoderNet` that returns only the segmentation logits, sharing
    its modules (e.g. as the validation evaluator's network while the trainer keeps the full
    network). ``eval()``/``train()`` on the view switch the wrapped network too."""

    def __init__(self, net: DualDecoderNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.net, DualDecoderNet):
            return self.net.segment(self.net.encode(x))
        return self.net(x)  # a single-output network (the reference UNet)


ARCHITECTURES = ("dual_decoder", "unet")


def reference_unet(in_channels: int = 1, out_channels: int = 1) -> nn.Module:
    """The plain MONAI ``UNet`` a user would train instead of the dual-decoder network: 2-D,
    channels 16-32-64-128-256, four stride-2 levels, two residual units per level (about 1.6 M
    parameters, with skip connections, no image decoder). It returns the segmentation logits only."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2)


def build_network(
    architecture: str = "dual_decoder",
    in_channels: int = 1,
    out_channels: int = 1,
    segmentation_only: bool = False,
    encoder_styles: Mapping[int, nn.Module] | None = None,
    image_decoder_styles: Mapping[int, nn.Module] | None = None,
) -> nn.Module:
    """The network named by ``architecture`` (the bundles' ``network_def``):

    * ``dual_decoder``: :class:`DualDecoderNet` (:class:`SegmentationOnlyNet` with
      ``segmentation_only``), the network MixStyleFlow and the other methods train;
    * ``unet``: :func:`reference_unet`, the plain MONAI baseline (no style layers possible).
    """
    if architecture == "dual_decoder":
        cls = SegmentationOnlyNet if segmentation_only else DualDecoderNet
        return cls(in_channels, out_channels, encoder_styles=encoder_styles, image_decoder_styles=image_decoder_styles)
    if architecture == "unet":
        if encoder_styles or image_decoder_styles:
            raise ValueError("the reference 'unet' architecture takes no style layers; use architecture 'dual_decoder'")
        return reference_unet(in_channels, out_channels)
    raise ValueError(f"unknown architecture {architecture!r}; choose one of: {', '.join(ARCHITECTURES)}")


def checkpoint_architecture(path: str) -> str:
    """The architecture of a saved model state dict (``unet`` when its keys are MONAI ``UNet``'s,
    else ``dual_decoder``), so evaluation builds the right network for any checkpoint. A missing
    or unreadable file gives ``dual_decoder``: the caller's file check reports it."""
    import os

    if not os.path.isfile(path):
        return "dual_decoder"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - reported by the loader with its own message
        return "dual_decoder"
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    keys = list(state) if isinstance(state, Mapping) else []
    return "unet" if keys and all(str(k).startswith("model.") for k in keys) else "dual_decoder"
