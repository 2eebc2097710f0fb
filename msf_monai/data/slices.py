"""2-D training slices from 3-D volumes.

The networks are 2-D (as in the paper): volumes are preprocessed once with a deterministic
MONAI transform (load, reorient, normalise, resize in-plane), then cut into axial slices that
are kept in memory, so random augmentation and every epoch after the first cost no disk I/O.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
from monai.data import Dataset

__all__ = ["extract_slices", "SliceDataset"]

logger = logging.getLogger("msf_monai.data")


def extract_slices(
    datalist: Sequence[dict],
    volume_transform: Callable[[dict], dict],
    foreground_only: bool = True,
    image_key: str = "image",
    label_key: str = "label",
    meta_keys: Sequence[str] = ("site", "case"),
) -> list[dict]:
    """Preprocess each volume and return its axial slices (last spatial axis).

    Args:
        datalist: items with image/label paths and metadata (site, case).
        volume_transform: deterministic transform returning channel-first ``[C, H, W, D]``
            image and ``[1, H, W, D]`` label tensors.
        foreground_only: keep only slices whose label has foreground (the paper trains on
            prostate slices only).
        meta_keys: item entries copied to every slice, with ``slice`` (the slice index).

    Returns:
        A list of ``{"image": [C, H, W], "label": [1, H, W], "slice": int, **meta}`` dicts of
        plain float tensors.
    """
    slices: list[dict] = []
    start = time.perf_counter()
    for n, item in enumerate(datalist, start=1):
        data = volume_transform(dict(item))
        image = torch.as_tensor(data[image_key]).float()
        label = torch.as_tensor(data[label_key]).float()
        if image.ndim != 4 or label.ndim != 4 or image.shape[1:] != label.shape[1:]:
            raise ValueError(
                f"{item.get(image_key)}: expected channel-first 3-D image and label of the same size after "
                f"preprocessing, got image {tuple(image.shape)} and label {tuple(label.shape)}"
            )
        image, label = image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)
        keep = range(image.shape[-1])
        if foreground_only:
            keep = torch.nonzero(label.flatten(0, -2).amax(0) > 0).flatten().tolist()
        meta = {k: item[k] for k in meta_keys if k in item}
        for s in keep:
            slices.append({image_key: image[..., s].clone(), label_key: label[..., s].clone(), "slice": int(s), **meta})
        if n % 10 == 0 or n == len(datalist):
            logger.info("preprocessed %d/%d volumes, %d slices (%.1f s)", n, len(datalist), len(slices), time.perf_counter() - start)
    if not slices:
        raise ValueError(
            f"no {'foreground ' if foreground_only else ''}slices in {len(datalist)} volume(s): "
            "check that the labels contain the structure to segment"
        )
    return slices


class SliceDataset(Dataset):
    """A MONAI ``Dataset`` over the in-memory slices of :func:`extract_slices`, with a
    (random) per-slice transform such as augmentation."""

    def __init__(
        self,
        datalist: Sequence[dict],
        volume_transform: Callable[[dict], dict],
        transform: Callable | None = None,
        foreground_only: bool = True,
    ):
        super().__init__(data=extract_slices(datalist, volume_transform, foreground_only), transform=transform)
