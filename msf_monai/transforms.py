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
    LoadImaged,
    MapTransform,
    Orientationd,
    Resized,
    ScaleIntensityRangePercentilesd,
)

__all__ = ["SelectChanneld", "prostate_preprocessing"]


class SelectChanneld(MapTransform):
    """Keep one channel of a channel-first image: the one named by the item's ``channel_key``
    entry (the data lists set it for 4-D Decathlon volumes from ``dataset.json``), else
    ``default``. One-channel images pass unchanged. With ``default=None`` (the preprocessing's
    setting) a multi-channel image whose item names no channel is an error naming the file,
    as in the data check (:func:`msf_monai.data.check_volumes`): never channel 0 silently."""

    def __init__(self, keys, channel_key: str = "channel", default: int | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channel_key = channel_key
        self.default = None if default is None else int(default)

    def __call__(self, data):
        d = dict(data)
        channel = d.get(self.channel_key, self.default)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] > 1:
                name = (getattr(img, "meta", None) or {}).get("filename_or_obj", key)
                if channel is None:
                    raise ValueError(f"{name}: a multi-channel image ({img.shape[0]} channels, channel-first shape "
                                     f"{tuple(img.shape)}) and the item names no '{self.channel_key}' to segment; "
                                     "save that channel as a 3-D volume")
                if not 0 <= int(channel) < img.shape[0]:
                    raise ValueError(f"{name}: has {img.shape[0]} channels, channel {channel} was asked for")
                d[key] = img[int(channel) : int(channel) + 1]
        return d


def prostate_preprocessing(
    image_size: int = 384,
    keys: Sequence[str] = ("image", "label"),
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
) -> Compose:
    """Preprocessing of a prostate MRI volume (and its label, if ``"label"`` is in ``keys``).

    1. Load with MONAI (nibabel for NIfTI, ITK for MetaImage/NRRD), channel first; keep the
       channel the item names (the T2 channel of 4-D Decathlon images,
       :class:`SelectChanneld`); a multi-channel image whose item names none is an error.
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
        SelectChanneld(keys="image"),
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
