"""Deterministic preprocessing shared by every phase of a bundle (training, flow fitting,
evaluation, inference), so that the phases can never disagree on it.

Built from MONAI transforms only; the returned ``Compose`` is invertible, which inference
uses to put masks back on the original grid.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    Orientationd,
    Resized,
    ScaleIntensityRangePercentilesd,
)

__all__ = ["prostate_preprocessing"]


def _first_channel(x):
    """Keep the first channel: the T2 image of a multi-parametric (4-D) volume."""
    return x[:1]


def prostate_preprocessing(
    image_size: int = 384,
    keys: Sequence[str] = ("image", "label"),
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
) -> Compose:
    """Preprocessing of a prostate MRI volume (and its label, if ``"label"`` is in ``keys``).

    1. Load with MONAI (nibabel for NIfTI, ITK for MetaImage/NRRD), channel first; keep the
       T2 channel of 4-D Decathlon images.
    2. Reorient to RAS so that the last axis is axial (slices).
    3. Labels: any positive value is prostate (merges the Decathlon/NCI-ISBI zones 1 and 2).
    4. Intensities: percentiles ``lower``..``upper`` mapped to [0, 1] and clipped (the image
       decoder's sigmoid output lives in [0, 1]).
    5. In-plane resize to ``image_size`` x ``image_size`` (paper: 384), slices unchanged.
    """
    keys = list(keys)
    has_label = "label" in keys
    modes = ["area" if k == "image" else "nearest" for k in keys]
    transforms = [
        LoadImaged(keys=keys, image_only=True, ensure_channel_first=True),
        Lambdad(keys="image", func=_first_channel),
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if has_label:
        transforms.append(AsDiscreted(keys="label", threshold=0.5))
    transforms += [
        ScaleIntensityRangePercentilesd(
            keys="image", lower=lower_percentile, upper=upper_percentile, b_min=0.0, b_max=1.0, clip=True
        ),
        Resized(keys=keys, spatial_size=(int(image_size), int(image_size), -1), mode=modes),
        EnsureTyped(keys=keys, dtype="float32"),
    ]
    return Compose(transforms)
