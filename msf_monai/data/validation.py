"""Check a data list before any training or evaluation starts.

A run on real data lasts hours; one broken file must not stop it half-way with a traceback
from deep inside a data loader. The bundles call these checks in their ``initialize`` step:
every file is read once (header and voxels), every problem is collected, and all of them are
reported together in one :class:`DataValidationError`, each naming its file, with a non-zero
exit and no traceback.

The checks themselves belong to their task
(:func:`msf_monai.tasks.prostate.checks.check_volumes` for MRI volumes,
:func:`msf_monai.tasks.fundus.checks.check_fundus_images` for photographs); this module holds
what they share: the error (:class:`DataValidationError`), the result (:class:`DataCheck`,
made by :func:`finish_check`), the message helpers, and :func:`exit_on_data_errors`, which
turns the :class:`~msf_monai.data.core.DataListError` of the bundles' list builders (missing
or empty ``dataset_dir``, image without label, label without image, ...) into the same clean
error.
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
    "constant_image_problem",
    "exit_on_data_errors",
    "finish_check",
    "values_text",
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


def finish_check(items, problems, no_foreground, warnings, what) -> DataCheck:
    """The end of every task's check: raise all ``problems`` together, else warn about the
    cases ``no_foreground`` names and return their :class:`DataCheck`."""
    if problems:
        raise DataValidationError(problems, n_items=len(items))
    if no_foreground:
        logger.warning("%d %s without foreground (skipped for training, kept for evaluation): %s",
                       len(no_foreground), what, ", ".join(no_foreground))
    logger.info("data check: %d case(s) read, every file readable and consistent", len(items))
    return DataCheck(items, no_foreground, warnings)


def constant_image_problem(image: np.ndarray) -> str | None:
    """A problem text when every (finite) voxel of ``image`` has one value: such an image holds
    nothing to segment, and its intensity scaling would divide by zero."""
    finite = image[np.isfinite(image)] if image.dtype.kind in "fc" else image
    if finite.size and finite.min() == finite.max():
        return f"every voxel has the value {float(finite.flat[0]):g} (an empty or blank image; nothing to segment)"
    return None


def values_text(values: np.ndarray) -> str:
    """Sorted label ``values`` for a message: the first few, then how many there are."""
    shown = ", ".join(f"{v:g}" for v in values[:_MAX_SHOWN])
    return shown + (f", ... ({len(values)} distinct values)" if len(values) > _MAX_SHOWN else "")
