"""Original-geometry evaluation: the label a prediction is compared with is the one stored in the
case's file, on the file's own grid, not the preprocessed (resampled) label."""

from __future__ import annotations

from monai.transforms import MapTransform

__all__ = ["OriginalLabeld"]


class OriginalLabeld(MapTransform):
    """Replace a preprocessed label by the case's label as stored, on the file's own grid: the
    file named in the label's metadata (``filename_or_obj``), read with ``loader`` (the bundle
    config's ``label_loader``: loading and label conversion only). With the
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
