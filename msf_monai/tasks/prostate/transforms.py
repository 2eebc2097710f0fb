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
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

__all__ = ["GEOMETRY_DEFAULTS", "OriginalLabeld", "RESAMPLE_MODES", "SelectChanneld", "geometry_settings",
           "prostate_preprocessing", "spacing_canvas"]

#: how a volume's in-plane grid becomes ``image_size`` x ``image_size`` (see :func:`prostate_preprocessing`)
RESAMPLE_MODES = ("resize", "spacing")
#: the in-plane geometry settings and their defaults (:func:`prostate_preprocessing`)
GEOMETRY_DEFAULTS = {"resample": "resize", "pixel_spacing": 0.625, "field_of_view": 140.0}


class SelectChanneld(MapTransform):
    """Keep one channel of a channel-first image: the one named by the item's ``channel_key``
    entry (the data lists set it for 4-D Decathlon volumes from ``dataset.json``), else
    ``default``. One-channel images pass unchanged. With ``default=None`` (the preprocessing's
    setting) a multi-channel image whose item names no channel is an error naming the file,
    as in the data check (:func:`msf_monai.tasks.prostate.check_volumes`): never channel 0 silently."""

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


class OriginalLabeld(MapTransform):
    """Replace a preprocessed label by the case's label as stored, on the file's own grid: the
    file named in the label's metadata (``filename_or_obj``), read with ``loader`` (the task's
    preprocessing with ``original_grid=True``: loading and label conversion only). With the
    prediction inverted by ``Invertd``, Dice is then computed in the scan's original geometry
    instead of on the resized grid. The item's other plain entries (e.g. a fundus mask's
    ``label_format``) reach ``loader``."""

    def __init__(self, keys="label", loader=None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if loader is None:
            raise ValueError("OriginalLabeld needs the loader that reads a label file")
        self.loader = loader

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            path = (getattr(d[key], "meta", None) or {}).get("filename_or_obj")
            if not path:
                raise ValueError(f"'{key}' has no file name in its metadata: cannot read its original label "
                                 "(evaluate with --eval_space resized)")
            item = {k: v for k, v in d.items() if v is None or isinstance(v, (str, int, float, dict))}
            item[key] = str(path)
            d[key] = self.loader(item)[key]
        return d


def geometry_settings(resample: str = "resize", pixel_spacing: float = 0.625, field_of_view: float = 140.0) -> dict | None:
    """The in-plane geometry a run preprocesses with, as stored in its training record: ``None``
    for ``"resize"`` (whose records, and saved training states, look as before the option
    existed), else ``{"resample": "spacing", "pixel_spacing": ..., "field_of_view": ...}``.
    Checks the values (a clear error for an unknown mode or an impossible spacing)."""
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"resample {resample!r}: must be one of {', '.join(RESAMPLE_MODES)}")
    if resample == "resize":
        return None
    spacing_canvas(pixel_spacing, field_of_view)
    return {"resample": "spacing", "pixel_spacing": float(pixel_spacing), "field_of_view": float(field_of_view)}


def spacing_canvas(pixel_spacing: float = 0.625, field_of_view: float = 140.0) -> int:
    """The in-plane size in pixels of a ``field_of_view`` (mm) square sampled at ``pixel_spacing``
    (mm): the grid that ``resample="spacing"`` pads or crops every slice to. A clear error
    for a spacing or field of view that is not a positive number or that gives under 16 pixels."""
    try:
        spacing, fov = float(pixel_spacing), float(field_of_view)
    except (TypeError, ValueError):
        raise ValueError(f"pixel_spacing {pixel_spacing!r} and field_of_view {field_of_view!r} must be numbers (mm)") from None
    if not (spacing > 0 and fov > 0):
        raise ValueError(f"pixel_spacing {pixel_spacing!r} and field_of_view {field_of_view!r} must be positive (mm)")
    canvas = int(round(fov / spacing))
    if canvas < 16:
        raise ValueError(f"field_of_view {fov:g} mm at pixel_spacing {spacing:g} mm is only {canvas} pixels; "
                         "at least 16 are needed")
    return canvas


def prostate_preprocessing(
    image_size: int = 384,
    keys: Sequence[str] = ("image", "label"),
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
    resample: str = "resize",
    pixel_spacing: float = 0.625,
    field_of_view: float = 140.0,
    original_grid: bool = False,
) -> Compose:
    """Preprocessing of a prostate MRI volume (and its label, if ``"label"`` is in ``keys``).

    1. Load with MONAI (nibabel for NIfTI, ITK for MetaImage/NRRD), channel first; keep the
       channel the item names (the T2 channel of 4-D Decathlon images,
       :class:`SelectChanneld`); a multi-channel image whose item names none is an error.
    2. Reorient to RAS so that the last axis is axial (slices).
    3. Labels: any positive value is prostate (merges the Decathlon/NCI-ISBI zones 1 and 2).
    4. Intensities: percentiles ``lower``..``upper`` mapped to [0, 1] and clipped (the image
       decoder's sigmoid output lives in [0, 1]).
    5. In-plane geometry, slices unchanged, by ``resample``:

       * ``"resize"``: the whole slice resized to ``image_size`` x ``image_size`` (paper: 384)
         whatever its pixel spacing, so anatomy's size in pixels follows the scan's field of view;
       * ``"spacing"``: resampled to ``pixel_spacing`` mm (MONAI ``Spacingd``, bilinear for the
         image, nearest for the label; the reference's and nnU-Net's way), centre padded
         (zeros) or cropped to a ``field_of_view`` mm square (:func:`spacing_canvas`; 140 mm at
         0.625 mm is the reference's 224-pixel centre crop), then resized (area) to
         ``image_size`` if that differs, so one pixel is ``field_of_view / image_size`` mm on
         every scan and an organ has the same size in pixels whatever the scanner's field of view.

    Every step is invertible: inference and original-geometry evaluation put predictions back
    on the scan's own grid with ``Invertd``. ``original_grid=True`` keeps steps 1 and 3 only
    (a label as stored, zones merged, on the file's grid: what such a prediction is compared with).
    """
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"resample {resample!r}: must be one of {', '.join(RESAMPLE_MODES)}")
    keys = list(keys)
    has_label = "label" in keys
    modes = ["area" if k == "image" else "nearest" for k in keys]
    transforms = [LoadImaged(keys=keys, image_only=True, ensure_channel_first=True)]
    if "image" in keys:
        transforms.append(SelectChanneld(keys="image"))
    if not original_grid:
        transforms.append(Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if has_label:
        transforms.append(AsDiscreted(keys="label", threshold=0.5))
    if original_grid:
        return Compose(transforms + [EnsureTyped(keys=keys, dtype="float32")])
    transforms += [
        ScaleIntensityRangePercentilesd(
            keys="image", lower=lower_percentile, upper=upper_percentile, b_min=0.0, b_max=1.0, clip=True
        ),
    ]
    size = int(image_size)
    if resample == "spacing":
        canvas = spacing_canvas(pixel_spacing, field_of_view)
        transforms += [
            Spacingd(keys=keys, pixdim=(float(pixel_spacing), float(pixel_spacing), -1),
                     mode=["bilinear" if k == "image" else "nearest" for k in keys]),
            ResizeWithPadOrCropd(keys=keys, spatial_size=(canvas, canvas, -1)),
        ]
        if canvas != size:
            transforms.append(Resized(keys=keys, spatial_size=(size, size, -1), mode=modes))
    else:
        transforms.append(Resized(keys=keys, spatial_size=(size, size, -1), mode=modes))
    transforms.append(EnsureTyped(keys=keys, dtype="float32"))
    return Compose(transforms)
