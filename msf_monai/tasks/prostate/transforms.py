"""Prostate-specific transforms and geometry settings used by the bundles' preprocessing.

The preprocessing itself is a list of MONAI transforms in the bundle config (``preprocessing``
in ``bundles/_templates/prostate.json``, the same in every phase, so the phases can never
disagree on it):

1. Load with MONAI (nibabel for NIfTI, ITK for MetaImage/NRRD), channel first; keep the
   channel the item names (the T2 channel of 4-D Decathlon images, :class:`SelectChanneld`);
   a multi-channel image whose item names none is an error.
2. Reorient to RAS so that the last axis is axial (slices).
3. Labels: any positive value is prostate (merges the Decathlon/NCI-ISBI zones 1 and 2).
4. Intensities: percentiles 0.5..99.5 mapped to [0, 1] and clipped (the image decoder's
   sigmoid output lives in [0, 1]).
5. In-plane geometry, slices unchanged, by ``resample``:

   * ``"resize"``: the whole slice resized to ``image_size`` x ``image_size`` (paper: 384)
     whatever its pixel spacing, so anatomy's size in pixels follows the scan's field of view;
   * ``"spacing"``: resampled to ``pixel_spacing`` mm (MONAI ``Spacingd``, bilinear for the
     image, nearest for the label; the reference's and nnU-Net's way), centre padded (zeros)
     or cropped to a ``field_of_view`` mm square (:func:`spacing_canvas`; 140 mm at 0.625 mm is
     the reference's 224-pixel centre crop), then resized (area) to ``image_size`` if that
     differs, so one pixel is ``field_of_view / image_size`` mm on every scan and an organ has
     the same size in pixels whatever the scanner's field of view.

Every step is invertible: inference and original-geometry evaluation put predictions back on
the scan's own grid with ``Invertd``. The config's ``label_loader`` keeps steps 1 and 3 for the
label only (a label as stored, zones merged, on the file's grid: what such a prediction is
compared with, see :class:`msf_monai.data.OriginalLabeld`). Items without a ``"label"`` (inference)
go through the same list: the label steps allow the key to be missing.
"""

from __future__ import annotations

from monai.transforms import MapTransform

__all__ = ["GEOMETRY_DEFAULTS", "RESAMPLE_MODES", "SelectChanneld", "canvas_size", "geometry_settings", "spacing_canvas"]

#: how a volume's in-plane grid becomes ``image_size`` x ``image_size`` (the config's ``resample``)
RESAMPLE_MODES = ("resize", "spacing")
#: the in-plane geometry settings and their defaults (the config's ``resample``, ``pixel_spacing``, ``field_of_view``)
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


def canvas_size(geometry: dict | None, image_size: int) -> int:
    """The square grid (pixels) the preprocessing pads or crops a slice to before sizing it to
    ``image_size``: the :func:`spacing_canvas` of a ``spacing`` geometry (as
    :func:`geometry_settings` gives it); ``image_size`` for ``resize``, which has no canvas, so
    its unused ``pixel_spacing`` and ``field_of_view`` are not checked."""
    if geometry is None:
        return int(image_size)
    return spacing_canvas(geometry["pixel_spacing"], geometry["field_of_view"])
