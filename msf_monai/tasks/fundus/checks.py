"""The fundus data check: every photograph and mask of a data list read once, every problem
reported together (:class:`~msf_monai.data.validation.DataValidationError`), before any work.

:func:`check_fundus_images` finds unreadable or truncated files (PNG, JPEG, ...), image/mask
size mismatch, mask values outside the label format's set, masks that mark every pixel,
images smaller than the minimum size, and masks without optic disc (a warning).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ...data.validation import MIN_IMAGE_SIZE, DataCheck, constant_image_problem, finish_check, values_text
from .transforms import fundus_mask_to_channels

__all__ = ["check_fundus_images"]

_PALETTE_VALUES = (0, 1, 2)


def _read_picture(path: str) -> np.ndarray:
    """Every pixel of an image file (PIL), so a truncated file fails here."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return np.array(im)  # a writable copy; palette images: their indices, as the mask reader sees them


def check_fundus_images(items: Sequence[Mapping], min_size: int = MIN_IMAGE_SIZE) -> DataCheck:
    """Read every image and mask of ``items`` (fundus data lists, see
    :mod:`msf_monai.tasks.fundus.lists`) and report every problem at once
    (:class:`DataValidationError`).

    Problems: a file that cannot be read (truncated, not an image); image smaller than
    ``min_size`` pixels on a side; non-finite pixels (floating-point TIFFs); mask of another
    size than its image; mask values outside the label format's set (``palette``: 0, 1, 2); a
    mask that marks every pixel as optic disc (e.g. a 0-background mask read with the grey
    convention, where 255 is background). Masks without any optic disc are skipped for
    training and kept for evaluation (a warning).
    """
    problems: list[str] = []
    no_foreground: list[str] = []
    for item in items:
        image_path = str(item["image"])
        try:
            image = _read_picture(image_path)
        except Exception as err:  # noqa: BLE001 - every reader failure is a data problem
            problems.append(f"{image_path}: cannot read the image ({type(err).__name__}: {err}); truncated or not an image?")
            image = None
        if image is not None:
            h, w = image.shape[:2]
            if min(h, w) < min_size:
                problems.append(f"{image_path}: size {w} x {h} pixels is smaller than the network's minimum {min_size} x {min_size}")
            if image.dtype.kind in "fc" and not np.isfinite(image).all():
                problems.append(f"{image_path}: non-finite pixel values (NaN or infinity)")
            constant = constant_image_problem(image)
            if constant:
                problems.append(f"{image_path}: {constant}")
        label_path = item.get("label")
        if label_path is None:
            continue
        label_path = str(label_path)
        try:
            mask = _read_picture(label_path)
        except Exception as err:  # noqa: BLE001
            problems.append(f"{label_path}: cannot read the mask ({type(err).__name__}: {err}); truncated or not an image?")
            continue
        if image is not None and mask.shape[:2] != image.shape[:2]:
            problems.append(f"{label_path}: mask size {mask.shape[1]} x {mask.shape[0]} differs from its image's "
                            f"{image.shape[1]} x {image.shape[0]} ({image_path})")
            continue
        fmt = str(item.get("label_format", "grey")).lower()
        plane = mask if mask.ndim == 2 else mask[..., 0]
        if plane.dtype.kind in "fc" and not np.isfinite(plane).all():
            problems.append(f"{label_path}: non-finite values (NaN or infinity) in the mask")
            continue
        if fmt == "palette":
            values = np.unique(plane)
            outside = values[~np.isin(values, _PALETTE_VALUES)]
            if outside.size:
                problems.append(f"{label_path}: mask values {values_text(outside)} outside the palette set "
                                "{0, 1, 2} (0 background, 1 rim, 2 cup)")
                continue
        try:
            disc = fundus_mask_to_channels(mask, fmt, item.get("mapping"))[0]
        except ValueError as err:
            problems.append(f"{label_path}: {err}")
            continue
        fraction = float(disc.mean())
        if fraction >= 1.0:
            hint = " (the grey convention has 255 background, 128 rim, 0 cup)" if fmt in ("grey", "gray") else ""
            problems.append(f"{label_path}: every pixel is optic disc in the {fmt!r} label format{hint}; "
                            "wrong label format or mapping?")
        elif fraction == 0.0:
            no_foreground.append(image_path)
    return finish_check(items, problems, no_foreground, [], "image(s)")
