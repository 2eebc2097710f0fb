"""Fundus-specific transforms used by the bundles' preprocessing of colour fundus photographs
(optic disc / cup segmentation).

The preprocessing itself is a list of MONAI transforms in the bundle config (``preprocessing``
in ``bundles/_templates/fundus.json``, the same in every phase):

1. Load with MONAI's PIL reader, channel first (:func:`pil_to_rgb`: palette / CMYK images
   become RGB; masks are read as stored, e.g. palette indices).  See below for the axis order.
2. Image: 3 RGB channels (:class:`EnsureRGBd`: alpha dropped, grey repeated).
3. Label: 2-channel float ``[disc, cup]`` (:class:`FundusMaskToChannelsd`, reading the item's
   ``label_format`` / ``mapping``).
4. Image intensities 0..255 mapped to [0, 1] and clipped.
5. Resize to ``image_size`` x ``image_size`` (area for the image, nearest for the label).
6. float32 tensors: [3, S, S] for the image, [2, S, S] for the label.

``Resized`` is invertible, which inference uses to put masks back on the photograph's grid; the
config's ``label_loader`` (steps 1 and 3 for the label only) reads the mask as stored for
original-geometry evaluation. Items without a ``"label"`` (inference) go through the same list.

Orientation: MONAI's ``PILReader`` swaps the two spatial axes by default
(``reverse_indexing=True``), so a ``W x H`` PNG is loaded as ``[C, W, H]`` (x first), i.e. the
arrays are the transposed photograph.  Image and mask are loaded the same way, so they stay
aligned, and MONAI's PIL writer transposes back when saving; a model simply sees transposed
(diagonally mirrored) eyes.  The config's ``reverse_indexing`` id sets both readers in one
place; leave it at its default: a model is trained and used with one axis order, and the
inference writer always transposes back.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

from .lists import parse_fundus_mapping

__all__ = [
    "ChannelsToFundusMaskd",
    "FundusMaskToChannelsd",
    "CupInsideDiscd",
    "EnsureRGBd",
    "fundus_mask_to_channels",
    "pil_to_rgb",
]

_PIL_COLOUR_MODES = {"P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"}


def pil_to_rgb(img):
    """PIL converter for colour images: palette / CMYK / YCbCr / 1-bit... become RGB; grey,
    RGB and RGBA images are left alone (:class:`EnsureRGBd` fixes their channel count)."""
    if getattr(img, "mode", "RGB") in _PIL_COLOUR_MODES:
        return img.convert("RGB")
    return img


def _mask_plane(mask) -> torch.Tensor:
    """The [H, W] plane of a mask loaded as [H, W], [1, H, W], [C, H, W] (first channel of RGB
    / grey+alpha) or channel-last [H, W, C]."""
    t = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    t = t.detach()
    if t.ndim == 2:
        return t
    if t.ndim == 3:
        if t.shape[0] <= 4:
            return t[0]
        if t.shape[-1] <= 4:
            return t[..., 0]
    if t.ndim == 4 and t.shape[0] == 1:  # e.g. [1, 1, H, W]
        return _mask_plane(t[0])
    raise ValueError(f"cannot interpret a fundus mask of shape {tuple(t.shape)} "
                     "(expected [H, W], [C, H, W] with C <= 4, or [H, W, C])")


def fundus_mask_to_channels(mask, label_format: str = "grey", mapping=None) -> torch.Tensor:
    """Convert a fundus mask to a float32 [2, H, W] tensor: channel 0 disc (rim + cup),
    channel 1 cup.

    ``label_format``: ``"grey"`` (255 background, 128 rim, 0 cup; each pixel goes to the
    nearest of the three values), ``"palette"`` (0 background, 1 rim, 2 cup; rounded) or
    ``"mapping"`` with ``mapping = {"disc": [values], "cup": [values]}`` (dict or JSON string;
    a pixel is disc if its rounded value is in ``disc`` or ``cup``, cup if in ``cup``).
    """
    plane = _mask_plane(mask).to(torch.float32)
    fmt = str(label_format or "grey").lower()
    if fmt in ("grey", "gray"):
        disc = plane < 191.5  # nearest of {0, 128, 255} is 0 or 128
        cup = plane < 64.0  # nearest is 0
    elif fmt == "palette":
        disc = plane >= 0.5
        cup = plane >= 1.5
    elif fmt == "mapping":
        if mapping is None:
            raise ValueError("label_format 'mapping' needs a mapping {'disc': [...], 'cup': [...]}")
        m = parse_fundus_mapping(mapping)
        vals = torch.round(plane)
        cup_vals = torch.tensor(m["cup"], dtype=torch.float32)
        disc_vals = torch.tensor(sorted(set(m["disc"]) | set(m["cup"])), dtype=torch.float32)
        cup = torch.isin(vals, cup_vals) if len(m["cup"]) else torch.zeros_like(vals, dtype=torch.bool)
        disc = torch.isin(vals, disc_vals)
    else:
        raise ValueError(f"unknown label_format {label_format!r}; use 'grey', 'palette' or 'mapping'")
    cup = cup & disc
    return torch.stack([disc, cup]).to(torch.float32)


class FundusMaskToChannelsd(MapTransform):
    """Turn a loaded fundus mask into a 2-channel float label ``[disc, cup]`` of shape
    [2, H, W] (disc = rim + cup, so cup is inside disc).

    The mask encoding is read from the item's ``format_key`` entry (``"label_format"``:
    ``"grey"``, ``"palette"`` or ``"mapping"``; ``default_format`` when absent) and, for
    ``"mapping"``, from its ``mapping_key`` entry (dict or JSON string, see
    :func:`msf_monai.tasks.fundus.lists.parse_fundus_mapping`).  Masks loaded as [H, W],
    [1, H, W] or RGB [3, H, W] (first channel) are accepted; metadata of a ``MetaTensor``
    input is kept.
    """

    def __init__(self, keys="label", format_key: str = "label_format",
                 mapping_key: str = "mapping", default_format: str = "grey",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.format_key, self.mapping_key = format_key, mapping_key
        self.default_format = default_format

    def __call__(self, data):
        d = dict(data)
        fmt = d.get(self.format_key) or self.default_format
        mapping = d.get(self.mapping_key)
        for key in self.key_iterator(d):
            img = d[key]
            out = fundus_mask_to_channels(img, fmt, mapping)
            if isinstance(img, torch.Tensor):
                out = convert_to_dst_type(out, dst=img, dtype=torch.float32)[0]
            d[key] = out
        return d


class CupInsideDiscd(MapTransform):
    """Post-processing of binary predictions ``[disc, cup]`` ([2, H, W], or [B, 2, H, W] with
    ``channel_dim=1``): cup = cup AND disc, so the prediction satisfies cup ⊆ disc.  Values
    above ``threshold`` count as foreground; the output keeps the input type and dtype."""

    def __init__(self, keys="pred", channel_dim: int = 0, threshold: float = 0.5,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channel_dim, self.threshold = int(channel_dim), float(threshold)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            t = torch.as_tensor(img) if not isinstance(img, torch.Tensor) else img
            if t.shape[self.channel_dim] != 2:
                raise ValueError(f"{key} must have 2 channels [disc, cup] on dim "
                                 f"{self.channel_dim}, got shape {tuple(t.shape)}")
            disc = t.select(self.channel_dim, 0) > self.threshold
            cup = t.select(self.channel_dim, 1)
            new_cup = torch.where(disc, cup, torch.zeros_like(cup))
            out = torch.stack([t.select(self.channel_dim, 0), new_cup], dim=self.channel_dim)
            if isinstance(img, torch.Tensor):
                out = convert_to_dst_type(out, dst=img)[0]
            else:
                out = np.asarray(out.cpu().numpy(), dtype=np.asarray(img).dtype)
            d[key] = out
        return d


class ChannelsToFundusMaskd(MapTransform):
    """Binary ``[disc, cup]`` predictions ([2, H, W]) to one grey mask ``[1, H, W]`` (uint8) in
    the 5-domain benchmark's coding: 255 background, 128 disc rim, 0 cup; for saving as PNG."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != 2:
                raise ValueError(f"{key} must have 2 channels [disc, cup], got shape {tuple(img.shape)}")
            disc, cup = img[0:1] > 0.5, img[1:2] > 0.5
            mask = 255 - 127 * disc.to(torch.uint8) - 128 * (cup & disc).to(torch.uint8)
            d[key] = convert_to_dst_type(mask, dst=img, dtype=torch.uint8)[0]
        return d


class EnsureRGBd(MapTransform):
    """Make channel-first colour images 3-channel RGB: grey [1, ...] is repeated, grey+alpha
    [2, ...] keeps the grey channel (repeated), RGBA [4, ...] drops the alpha channel."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            c = img.shape[0]
            if c == 3:
                continue
            if c in (1, 2):
                d[key] = img[:1].repeat(3, *([1] * (img.ndim - 1))) if isinstance(img, torch.Tensor) \
                    else np.repeat(img[:1], 3, axis=0)
            elif c == 4:
                d[key] = img[:3]
            else:
                raise ValueError(f"{key}: cannot make an RGB image from {c} channels")
        return d
