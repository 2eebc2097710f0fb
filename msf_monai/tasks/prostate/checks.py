"""The prostate data check: every MRI volume of a data list read once, every problem reported
together (:class:`~msf_monai.data.validation.DataValidationError`), before any work.

:func:`check_volumes` finds unreadable or truncated files (NIfTI, MetaImage, NRRD), 4-D images
whose layout names no channel, image/label shape or affine mismatch, non-finite voxels, label
values outside the expected set, images smaller than the network's minimum size, and volumes
without foreground (a warning: skipped for training, kept for evaluation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ...data.validation import MIN_IMAGE_SIZE, DataCheck, constant_image_problem, finish_check, values_text

__all__ = ["check_volumes"]


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
    :func:`~msf_monai.tasks.prostate.lists.layout_channel`; the same rule for training,
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
            constant = constant_image_problem(image)
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
                problems.append(f"{label_path}: label values {values_text(outside)} outside the expected set "
                                f"{{{', '.join(f'{v:g}' for v in expected)}}} (see --label_values)")
                continue
        if not (values >= 0.5).any():
            no_foreground.append(image_path)
    return finish_check(items, problems, no_foreground, [], "volume(s)")
