"""Check a data list before any training or evaluation starts.

A run on real data lasts hours; one broken file must not stop it half-way with a traceback
from deep inside a data loader. The bundles call these checks in their ``initialize`` step:
every file is read once (header and voxels), every problem is collected, and all of them are
reported together in one :class:`DataValidationError`, each naming its file, with a non-zero
exit and no traceback.

* :func:`check_volumes` -- prostate MRI volumes (NIfTI, MetaImage, NRRD): unreadable or
  truncated files, 4-D images whose layout names no channel, image/label shape or affine
  mismatch, non-finite voxels, label values
  outside the expected set, images smaller than the network's minimum size, and volumes
  without foreground (a warning: skipped for training, kept for evaluation).
* :func:`check_fundus_images` -- fundus photographs and masks (PNG, JPEG, ...): unreadable or
  truncated files, image/mask size mismatch, mask values outside the label format's set,
  masks that mark every pixel, images smaller than the minimum size, no optic disc (warning).
* :func:`exit_on_data_errors` -- turns the :class:`~msf_monai.data.core.DataListError`
  of the bundles' list builders (missing or empty ``dataset_dir``, image without label, label
  without image, ...) into the same clean error.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from ..errors import MsfError
from .core import DataListError

__all__ = [
    "MIN_IMAGE_SIZE",
    "DataCheck",
    "DataValidationError",
    "check_fundus_images",
    "check_volumes",
    "exit_on_data_errors",
]

logger = logging.getLogger("msf_monai.data")

#: the networks halve the image four times: smaller images cannot be segmented meaningfully
MIN_IMAGE_SIZE = 16
_MAX_SHOWN = 8  # label values listed in a message


class DataValidationError(MsfError):
    """Problems found in the data, each naming its file, raised before any work.

    An :class:`~msf_monai.errors.MsfError`: uncaught, the user sees its message alone (not
    MONAI's config-parser traceback) and exit status 1. ``problems`` lists the problems.
    """

    def __init__(self, problems: Sequence[str] | str, root=None, n_items: int | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.root = None if root is None else str(root)
        n = len(self.problems)
        where = f" in {self.root}" if self.root else ""
        checked = f" (checked {n_items} case{'s' if n_items != 1 else ''})" if n_items is not None else ""
        head = (f"The data check found {n} problem{'s' if n != 1 else ''}{where}{checked}; nothing was run. "
                "Fix or remove the files named below and run the same command again:")
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))


def exit_on_data_errors(fn: Callable) -> Callable:
    """Decorator for the bundles' data-list entry points: a ``DataListError`` becomes a
    :class:`DataValidationError` (clean message, exit status 1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DataListError as err:
            raise DataValidationError(err.problems, root=err.root) from err

    return wrapper


class DataCheck:
    """Result of a data check: the items, and the images without foreground (skipped for
    training by :meth:`for_training`, kept for evaluation)."""

    def __init__(self, items: Sequence[Mapping], no_foreground: Iterable[str] = (), warnings: Iterable[str] = ()):
        self.items = list(items)
        self.no_foreground = sorted(set(no_foreground))
        self.warnings = list(warnings)

    def for_training(self, items: Sequence[Mapping], image_key: str = "image") -> list:
        """``items`` without the images that have no foreground; an error if none is left."""
        skip = set(self.no_foreground)
        kept = [it for it in items if str(it[image_key]) not in skip]
        if items and not kept:
            raise DataValidationError([f"no training case has any foreground in its label: {', '.join(sorted(skip))}"])
        if len(kept) < len(items):
            logger.warning("skipped %d training case(s) without foreground: %s", len(items) - len(kept),
                           ", ".join(str(it[image_key]) for it in items if str(it[image_key]) in skip))
        return kept

    def __repr__(self) -> str:
        return f"DataCheck({len(self.items)} items, {len(self.no_foreground)} without foreground)"


def _finish(items, problems, no_foreground, warnings, what) -> DataCheck:
    if problems:
        raise DataValidationError(problems, n_items=len(items))
    if no_foreground:
        logger.warning("%d %s without foreground (skipped for training, kept for evaluation): %s",
                       len(no_foreground), what, ", ".join(no_foreground))
    logger.info("data check: %d case(s) read, every file readable and consistent", len(items))
    return DataCheck(items, no_foreground, warnings)


def _constant_text(image: np.ndarray) -> str | None:
    """A problem text when every (finite) voxel of ``image`` has one value: such an image holds
    nothing to segment, and its intensity scaling would divide by zero."""
    finite = image[np.isfinite(image)] if image.dtype.kind in "fc" else image
    if finite.size and finite.min() == finite.max():
        return f"every voxel has the value {float(finite.flat[0]):g} (an empty or blank image; nothing to segment)"
    return None


def _values_text(values: np.ndarray) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:_MAX_SHOWN])
    return shown + (f", ... ({len(values)} distinct values)" if len(values) > _MAX_SHOWN else "")


# ---------------------------------------------------------------------------------------------
# volumes
# ---------------------------------------------------------------------------------------------
def _read_volume(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(voxels, affine) of a NIfTI (nibabel) or MetaImage/NRRD (MONAI's ITK reader) file;
    reads every voxel, so a truncated file fails here."""
    low = path.lower()
    if low.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(path)
        return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=float)
    from monai.transforms import LoadImage

    data, meta = LoadImage(image_only=False)(path)
    return np.asarray(data), np.asarray(meta["affine"], dtype=float)


def _in_plane_size(shape: Sequence[int], affine: np.ndarray) -> tuple[int, int]:
    """The sizes of the two axes that become the in-plane (R, A) axes after reorientation to
    RAS, as the preprocessing does."""
    import nibabel as nib

    try:
        ornt = nib.orientations.io_orientation(affine[:4, :4] if affine.shape == (4, 4) else np.eye(4))
        sizes = [int(shape[i]) for i in range(3) if int(ornt[i, 0]) in (0, 1)]
        if len(sizes) == 2:
            return sizes[0], sizes[1]
    except Exception:  # noqa: BLE001 - a degenerate affine: fall back to the array order
        pass
    return int(shape[0]), int(shape[1])


def check_volumes(
    items: Sequence[Mapping],
    label_values: Sequence[float] | None = (0, 1, 2),
    min_size: int = MIN_IMAGE_SIZE,
    affine_tolerance: float = 1e-3,
) -> DataCheck:
    """Read every volume of ``items`` (``image`` and, when present, ``label`` paths) and report
    every problem at once (:class:`DataValidationError`).

    Problems: a file that cannot be read (missing, truncated, not an image); an image that is
    not 3-D (or 4-D with one channel, or with a ``channel`` entry in range: the data lists set
    it only where the layout names the channel, see
    :func:`~msf_monai.data.prostate_lists.layout_channel`; the same rule for training,
    evaluation and inference lists); image and label of different spatial
    shape or affine (``affine_tolerance``, absolute, mm); non-finite voxels in the image; label
    values outside ``label_values`` (``None``: not checked); an in-plane size (after
    reorientation to RAS) below ``min_size``. Labels without foreground (no value >= 0.5, the
    preprocessing's threshold) are not problems: they are listed in the returned
    :class:`DataCheck` (skipped for training, kept for evaluation) and logged as a warning.
    """
    expected = None if label_values is None else np.asarray(sorted({float(v) for v in label_values}))
    problems: list[str] = []
    no_foreground: list[str] = []
    for item in items:
        image_path = str(item["image"])
        try:
            image, image_affine = _read_volume(image_path)
        except Exception as err:  # noqa: BLE001 - every reader failure is a data problem
            problems.append(f"{image_path}: cannot read the image ({type(err).__name__}: {err}); truncated or not a volume?")
            image = None
        if image is not None:
            channel = item.get("channel")
            if image.ndim == 4 and image.shape[3] == 1:
                image = image[..., 0]
            if image.ndim == 4 and channel is not None and not 0 <= int(channel) < image.shape[3]:
                problems.append(f"{image_path}: has {image.shape[3]} channels, channel {channel} was asked for")
                image = None
            elif image.ndim == 4 and channel is not None:
                image = image[..., int(channel)]
            elif image.ndim == 4:
                problems.append(f"{image_path}: a 4-D image of shape {tuple(image.shape)} ({image.shape[3]} channels or "
                                "time points) in a layout that does not say which channel to segment (only the Decathlon "
                                "layout does: the T2 channel of its dataset.json); save that channel as a 3-D volume")
                image = None
            elif image.ndim != 3:
                problems.append(f"{image_path}: expected a 3-D volume, got an array of shape {tuple(image.shape)}")
                image = None
        if image is not None:
            if image.dtype.kind in "fc":
                bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
                if bad:
                    problems.append(f"{image_path}: {bad} non-finite voxel(s) (NaN or infinity) out of {image.size}")
            constant = _constant_text(image)
            if constant:
                problems.append(f"{image_path}: {constant}")
            h, w = _in_plane_size(image.shape, image_affine)
            if min(h, w) < min_size:
                problems.append(f"{image_path}: in-plane size {h} x {w} voxels is smaller than the network's "
                                f"minimum {min_size} x {min_size}")
        label_path = item.get("label")
        if label_path is None:
            continue
        label_path = str(label_path)
        try:
            label, label_affine = _read_volume(label_path)
        except Exception as err:  # noqa: BLE001
            problems.append(f"{label_path}: cannot read the label ({type(err).__name__}: {err}); truncated or not a volume?")
            continue
        if label.ndim == 4 and label.shape[3] == 1:
            label = label[..., 0]
        if label.ndim != 3:
            problems.append(f"{label_path}: expected a 3-D label volume, got an array of shape {tuple(label.shape)}")
            continue
        if image is not None:
            if tuple(label.shape) != tuple(image.shape):
                problems.append(f"{label_path}: label shape {tuple(label.shape)} differs from its image's "
                                f"{tuple(image.shape)} ({image_path})")
            elif not np.allclose(label_affine, image_affine, rtol=0, atol=affine_tolerance):
                diff = float(np.abs(label_affine - image_affine).max())
                problems.append(f"{label_path}: label affine differs from its image's ({image_path}) by up to "
                                f"{diff:.4g} mm: the label is not on the image's grid")
        if label.dtype.kind in "fc" and not np.isfinite(label).all():
            problems.append(f"{label_path}: non-finite values (NaN or infinity) in the label")
            continue
        values = np.unique(label)
        if expected is not None:
            outside = values[~np.isclose(values[:, None], expected[None, :], atol=1e-6).any(axis=1)]
            if outside.size:
                problems.append(f"{label_path}: label values {_values_text(outside)} outside the expected set "
                                f"{{{', '.join(f'{v:g}' for v in expected)}}} (see --label_values)")
                continue
        if not (values >= 0.5).any():
            no_foreground.append(image_path)
    return _finish(items, problems, no_foreground, [], "volume(s)")


# ---------------------------------------------------------------------------------------------
# fundus photographs
# ---------------------------------------------------------------------------------------------
_PALETTE_VALUES = (0, 1, 2)


def _read_picture(path: str) -> np.ndarray:
    """Every pixel of an image file (PIL), so a truncated file fails here."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return np.array(im)  # a writable copy; palette images: their indices, as the mask reader sees them


def check_fundus_images(items: Sequence[Mapping], min_size: int = MIN_IMAGE_SIZE) -> DataCheck:
    """Read every image and mask of ``items`` (fundus data lists, see
    :mod:`msf_monai.data.fundus_lists`) and report every problem at once
    (:class:`DataValidationError`).

    Problems: a file that cannot be read (truncated, not an image); image smaller than
    ``min_size`` pixels on a side; non-finite pixels (floating-point TIFFs); mask of another
    size than its image; mask values outside the label format's set (``palette``: 0, 1, 2); a
    mask that marks every pixel as optic disc (e.g. a 0-background mask read with the grey
    convention, where 255 is background). Masks without any optic disc are skipped for
    training and kept for evaluation (a warning).
    """
    from msf_monai.fundus_transforms import fundus_mask_to_channels

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
            constant = _constant_text(image)
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
                problems.append(f"{label_path}: mask values {_values_text(outside)} outside the palette set "
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
    return _finish(items, problems, no_foreground, [], "image(s)")
