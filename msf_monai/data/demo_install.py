"""Installing a generated demo data set into its folder atomically (shared by the prostate and
fundus demo generators)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["DEMO_INFO_FILE", "demo_info", "demo_is_current", "demo_summary", "install_demo", "install_generated", "write_demo_info",
           "listed_files_exist", "absolute_items"]

#: the description file a generated demo folder is complete with (written last)
DEMO_INFO_FILE = "demo_info.json"

logger = logging.getLogger("msf_monai.data")


def install_generated(
    root: Path,
    is_current: Callable[[Path], bool],
    is_ours: Callable[[Path], bool],
    generate: Callable[[Path], object],
    what: str,
) -> Path:
    """Make sure ``root`` holds an up-to-date generated data set; return ``root``.

    Nothing happens when ``is_current(root)``. Otherwise ``generate(tmp)`` writes into a
    temporary sibling folder that is renamed into place, so an interrupted run never leaves a
    half data set that looks complete. A non-empty ``root`` that ``is_ours`` does not recognise
    (e.g. the user's own data) is never touched: ``FileExistsError`` is raised instead.
    """
    if is_current(root):
        logger.debug("%s in %s is up to date", what, root)
        return root
    if root.exists():
        if not root.is_dir():
            raise FileExistsError(f"{root} exists and is not a folder")
        if any(root.iterdir()) and not is_ours(root):
            raise FileExistsError(
                f"{root} is not empty and is not a {what}: refusing to overwrite it "
                "(choose an empty or new folder)"
            )
        logger.info("%s in %s is missing files or has other parameters; regenerating", what, root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        generate(tmp)
        old = None
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / "data")
        try:
            os.replace(tmp, root)
        except OSError:
            # another process put a data set in place meanwhile: keep it if it is current
            if not is_current(root):
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("%s ready in %s", what, root)
    return root


def install_demo(root, generator: str, version: str, params, generate: Callable[[Path], object], what: str) -> Path:
    """:func:`install_generated` for a generated demo folder described by its ``demo_info.json``:
    up to date when that file names this ``generator``, ``version`` and ``params`` and every file
    it lists exists (:func:`demo_is_current`); a folder with a readable ``demo_info.json`` is a
    demo that may be regenerated, any other non-empty folder is never touched."""
    return install_generated(
        Path(root).expanduser().absolute(),
        is_current=lambda path: demo_is_current(path, generator, version, params),
        is_ours=lambda path: demo_info(path) is not None,
        generate=generate,
        what=what,
    )


def demo_summary(root, info: dict, seconds: float | None = None, **fields) -> dict:
    """What a demo generator returns: ``root``, the task's ``fields`` (sites, source, counts),
    the items with absolute paths, the generator ``version`` and the generation time."""
    return {"root": str(root), **fields, "items": absolute_items(Path(root), info), "version": info["version"],
            "seconds": seconds}


def write_demo_info(root: Path, info: dict, filename: str) -> None:
    """Write the data set's description file last and atomically: its presence marks a
    complete data set."""
    part = Path(root) / (filename + ".part")
    part.write_text(json.dumps(info, indent=2), encoding="utf-8")
    os.replace(part, Path(root) / filename)


def listed_files_exist(root: Path, info: dict) -> bool:
    """Whether every image and label listed in ``info["items"]`` (relative paths) exists."""
    return all((root / it["image"]).is_file() and (root / it["label"]).is_file() for it in info.get("items", []))


def absolute_items(root: Path, info: dict) -> list[dict]:
    """The items of ``info`` (relative paths, as stored) with absolute image and label paths."""
    return [{**it, "image": str(Path(root) / it["image"]), "label": str(Path(root) / it["label"])} for it in info["items"]]


def demo_info(root) -> dict | None:
    """The parsed ``demo_info.json`` of a demo folder, or ``None`` if missing/unreadable."""
    path = Path(root) / DEMO_INFO_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def demo_is_current(root, generator: str, version: str, params) -> bool:
    """Whether ``root`` holds a complete demo made by ``generator`` at ``version`` with these
    ``params``: its ``demo_info.json`` says so and every file it lists exists."""
    info = demo_info(root)
    if (not info or info.get("generator") != generator or info.get("version") != version
            or info.get("params") != params):
        return False
    return listed_files_exist(Path(root), info)
