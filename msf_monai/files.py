"""Files written whole or not at all, and file digests.

Every output a later phase or a resumed run reads (checkpoints, flows, training states, style
statistics, records, calibrations) goes through :func:`atomic_write`: a temporary file in the
target folder, flush, ``fsync``, mode of a normally created file (e.g. 0644), ``os.replace``,
then ``fsync`` of the folder. A reader sees the old file or the new one, never half a file; a
process killed mid-write leaves only a temporary file, which :func:`remove_stale_temporaries`
clears.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_save",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_npz",
    "file_digest",
    "new_file_mode",
    "remove_stale_temporaries",
]

logger = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp_"


def new_file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 less the umask, e.g. 0o644), for files
    written through a private temporary file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(fh)`` on a binary temporary file beside ``path``, then put it in place
    atomically (see the module doc). The temporary file is removed if anything fails."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{os.path.basename(path)}.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, new_file_mode())  # mkstemp creates files readable by their owner only
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (not possible on every platform)
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically."""
    import torch

    atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int = 1) -> None:
    """``data`` as JSON text (with a final newline), atomically."""
    text = json.dumps(data, indent=indent) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode()))


def atomic_write_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """``numpy.savez(path, **arrays)`` atomically (the file is named exactly ``path``)."""
    import numpy as np

    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Delete the temporary files that :func:`atomic_write` of ``path`` leaves behind when the
    process is killed in the middle of a write; returns the removed paths."""
    path = Path(path)
    removed = []
    if path.parent.is_dir():
        for tmp in path.parent.glob(f"{_TMP_PREFIX}{path.name}.*"):
            try:
                tmp.unlink()
                removed.append(str(tmp))
            except OSError:
                pass
    if removed:
        logger.info("removed %d unfinished temporary file(s) of an interrupted save: %s", len(removed), ", ".join(removed))
    return removed


def file_digest(path: str | os.PathLike, algorithm: str = "sha1") -> str:
    """Hex digest of a file's content (e.g. the Phase I model a Phase II state was made from)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
