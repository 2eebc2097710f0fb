"""Data lists for optic disc / cup segmentation in colour fundus photographs.

Every item is a dict with absolute paths, ready for MONAI ``LoadImaged`` based pipelines
(the bundle config's ``preprocessing`` list reads them)::

    {"image": str, "label": str, "site": str, "case": str, "split": "train" | "test",
     "label_format": "grey" | "palette" | "mapping"}   (+ "mapping": JSON string)

``label_format`` tells how the mask encodes the classes:

``grey``
    the 5-domain fundus benchmark convention: 255 background, 128 optic disc rim, 0 optic
    cup (nearest of the three values, so JPEG-compressed masks work too).
``palette``
    Drishti-GS style palette/index PNG: 0 background, 1 disc rim, 2 cup.
``mapping``
    any other encoding, given as ``{"disc": [values], "cup": [values]}``: a pixel is disc if
    its value is in ``disc`` or ``cup`` (so ``disc`` may list the rim values only, or the rim
    and cup values), and cup if its value is in ``cup``.  Stored in ``item["mapping"]`` as a
    canonical JSON string (strings collate cleanly in MONAI data loaders).

Supported layouts (see :func:`detect_fundus_layout`):

``domains``
    the 5-domain benchmark ``<root>/Domain<k>/{train,test}/ROIs/{image,mask}/<name>.<ext>``
    (also without the ``ROIs`` level, and a single domain folder given as ``root``); site =
    domain folder name, split = ``train``/``test``; grey masks.
``drishti``
    ``<root>/images/<name>.png`` + ``<root>/masks/<name>.png`` palette masks (Drishti-GS);
    site = name of ``root``; split ``train``.
``folder``
    ``<root>/images/`` + ``<root>/masks/`` (or ``labels/``) with a configurable mapping (grey
    benchmark convention when no mapping is given); site = name of ``root``; split ``train``.

Images may be PNG, JPEG, BMP or TIFF; a mask has the stem of its image (any of these
extensions).  All problems found (missing root or folders, nothing found, an image without a
mask or a mask without an image, unreadable files) are collected and raised once as
:class:`~msf_monai.data.core.DataListError`, each naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ...data.core import (
    DataListError,
    broken_link_problem,
    check_root,
    is_broken_link,
    is_visible,
    natural_key,
    pair_by_case,
    same_output_name_problems,
)
from ...data.validation import exit_on_data_errors
from .synthetic import ensure_demo_fundus

__all__ = [
    "FUNDUS_IMAGE_EXTENSIONS",
    "FUNDUS_LAYOUTS",
    "LABEL_FORMATS",
    "parse_fundus_mapping",
    "list_fundus_domains",
    "list_drishti",
    "list_fundus_folder",
    "detect_fundus_layout",
    "build_fundus_datalist",
    "fundus_datalist",
    "fundus_image_files",
]

#: image / mask file endings recognised (matched case-insensitively)
FUNDUS_IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
FUNDUS_LAYOUTS: tuple[str, ...] = ("domains", "drishti", "folder")
LABEL_FORMATS: tuple[str, ...] = ("grey", "palette", "mapping")
SPLITS: tuple[str, ...] = ("train", "test")

_IMAGE_DIRS = ("image", "images", "img")
_MASK_DIRS = ("mask", "masks", "label", "labels")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def parse_fundus_mapping(mapping) -> dict[str, list[int]]:
    """Validate a label mapping ``{"disc": [values], "cup": [values]}`` (dict or JSON string).

    Single values may be given instead of lists; ``"cup"`` may be left out (no cup labels).
    Returns ``{"disc": sorted ints, "cup": sorted ints}``.  Raises ``ValueError``.
    """
    if isinstance(mapping, (str, bytes)):
        try:
            mapping = json.loads(mapping)
        except ValueError as err:
            raise ValueError(f"label mapping is not valid JSON: {mapping!r} ({err})") from None
    if not isinstance(mapping, Mapping):
        raise ValueError(f"label mapping must be a dict {{'disc': [...], 'cup': [...]}}, "
                         f"got {mapping!r}")
    unknown = set(mapping) - {"disc", "cup"}
    if unknown:
        raise ValueError(f"label mapping has unknown keys {sorted(unknown)} (use 'disc', 'cup')")
    out: dict[str, list[int]] = {}
    for key in ("disc", "cup"):
        vals = mapping.get(key, [])
        if vals is None:
            vals = []
        if isinstance(vals, (int, float)):
            vals = [vals]
        try:
            ints = sorted({int(v) for v in vals})
        except (TypeError, ValueError):
            raise ValueError(f"label mapping {key!r} must list integer values, got {vals!r}") \
                from None
        if any(float(v) != int(v) for v in vals):
            raise ValueError(f"label mapping {key!r} must list integer values, got {vals!r}")
        out[key] = ints
    if not out["disc"] and not out["cup"]:
        raise ValueError("label mapping gives no disc and no cup values")
    return out


def _mapping_json(mapping) -> str:
    return json.dumps(parse_fundus_mapping(mapping), sort_keys=True)


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in FUNDUS_IMAGE_EXTENSIONS and len(path.stem) > 0


def _files(folder: Path) -> list[Path]:
    """Image files of ``folder``, broken symbolic links included (:func:`_readable` names them)."""
    return sorted((p for p in folder.iterdir() if is_visible(p) and (p.is_file() or is_broken_link(p)) and _is_image_name(p)),
                  key=lambda p: natural_key(p.name))


def _readable(path: Path, problems: list[str]) -> bool:
    """Open the file's header with PIL; report a problem when it is no readable image."""
    from PIL import Image

    link = broken_link_problem(path)
    if link:
        problems.append(link)
        return False
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - header parsed
    except Exception as err:  # noqa: BLE001 - every reader failure is a data problem
        problems.append(f"unreadable image file: {path} ({type(err).__name__}: {err})")
        return False
    return True


def _find_dir(parent: Path, names: Sequence[str]) -> Path | None:
    """The first sub-folder of ``parent`` whose name (case-insensitive) is in ``names``."""
    if not parent.is_dir():
        return None
    subs = {p.name.lower(): p for p in parent.iterdir() if p.is_dir() and is_visible(p)}
    for name in names:
        if name in subs:
            return subs[name]
    return None


def _pair(img_dir: Path, mask_dir: Path, site: str, split: str, label_format: str,
          problems: list[str], mapping: str | None = None) -> list[dict]:
    """Pair images and masks of the same stem in two folders; every problem is recorded."""
    items = []
    pairs = pair_by_case([(p.stem, p) for p in _files(img_dir)], [(p.stem, p) for p in _files(mask_dir)], problems,
                         lambda case, _: f"no {case}.* in {mask_dir}", lambda case, _: f"no {case}.* in {img_dir}",
                         label_word="mask")
    for case, image, mask in pairs:
        ok = _readable(image, problems)
        ok = _readable(mask, problems) and ok
        if ok:
            item = {"image": str(image), "label": str(mask), "site": site, "case": case,
                    "split": split, "label_format": label_format}
            if mapping is not None:
                item["mapping"] = mapping
            items.append(item)
    return items


def _image_mask_dirs(path: Path, problems: list[str]) -> tuple[Path | None, Path | None]:
    img_dir = _find_dir(path, ("images", "image"))
    mask_dir = _find_dir(path, ("masks", "mask", "labels", "label"))
    if img_dir is None:
        problems.append(f"images folder missing: {path / 'images'}")
    if mask_dir is None:
        problems.append(f"masks folder missing: {path / 'masks'}")
    return img_dir, mask_dir


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------
def _is_domain_folder(path: Path) -> bool:
    return any(_find_dir(path, (split,)) is not None for split in SPLITS)


def _domain_folders(path: Path) -> list[Path]:
    """``Domain*`` sub-folders (any capitalisation) in natural order, or ``[path]`` when
    ``path`` itself is one domain (has ``train/`` or ``test/``)."""
    subs = [p for p in path.iterdir() if p.is_dir() and is_visible(p)]
    domains = sorted((p for p in subs if p.name.lower().startswith("domain")),
                     key=lambda p: natural_key(p.name))
    if domains:
        return domains
    if _is_domain_folder(path):
        return [path]
    return []


def list_fundus_domains(root) -> list[dict]:
    """Items of the 5-domain benchmark layout
    ``<root>/Domain<k>/{train,test}/ROIs/{image,mask}/<name>.<ext>`` (grey masks).

    The ``ROIs`` level is optional; ``root`` may also be a single domain folder.  Sorted by
    domain, split (train, test), then name.
    """
    path = check_root(root)
    problems: list[str] = []
    items: list[dict] = []
    domains = _domain_folders(path)
    if not domains:
        raise DataListError([f"no Domain*/ folders (or train/, test/ splits) found in {path}"],
                            root=path)
    for dom in domains:
        split_dirs = [(s, _find_dir(dom, (s,))) for s in SPLITS]
        split_dirs = [(s, d) for s, d in split_dirs if d is not None]
        if not split_dirs:
            problems.append(f"domain folder without train/ or test/ split: {dom}")
            continue
        for split, sdir in split_dirs:
            base = _find_dir(sdir, ("rois", "roi")) or sdir
            img_dir, mask_dir = _find_dir(base, _IMAGE_DIRS), _find_dir(base, _MASK_DIRS)
            if img_dir is None:
                problems.append(f"image folder missing: {base / 'image'}")
            if mask_dir is None:
                problems.append(f"mask folder missing: {base / 'mask'}")
            if img_dir is None or mask_dir is None:
                continue
            items.extend(_pair(img_dir, mask_dir, dom.name, split, "grey", problems))
    if not items and not problems:
        problems.append(f"no images found under {path} (expected "
                        "Domain<k>/{train,test}/ROIs/{image,mask}/<name>.png)")
    if problems:
        raise DataListError(problems, root=path)
    return items


def list_drishti(root, site: str | None = None) -> list[dict]:
    """Items of a Drishti-GS style folder: ``images/<name>.png`` + ``masks/<name>.png``
    palette masks (0 background, 1 rim, 2 cup).  Site = ``site`` or the name of ``root``;
    split ``"train"``."""
    path = check_root(root)
    problems: list[str] = []
    img_dir, mask_dir = _image_mask_dirs(path, problems)
    if problems:
        raise DataListError(problems, root=path)
    items = _pair(img_dir, mask_dir, str(site or path.name), "train", "palette", problems)
    if not items and not problems:
        problems.append(f"no images found in {img_dir}")
    if problems:
        raise DataListError(problems, root=path)
    return items


def list_fundus_folder(root, mapping=None, site: str | None = None) -> list[dict]:
    """Items of ``<root>/images/<name>`` + ``<root>/masks/<name>`` (``labels/`` also works).

    ``mapping`` (``{"disc": [values], "cup": [values]}``, dict or JSON string) says which mask
    values are disc and cup (see the module doc); items get ``label_format="mapping"`` and
    the canonical JSON mapping.  Without a mapping the masks are read with the grey benchmark
    convention (255 background, 128 rim, 0 cup).  Site = ``site`` or the name of ``root``;
    split ``"train"``.
    """
    path = check_root(root)
    problems: list[str] = []
    mapping_json = None
    if mapping is not None:
        try:
            mapping_json = _mapping_json(mapping)
        except ValueError as err:
            problems.append(str(err))
    img_dir, mask_dir = _image_mask_dirs(path, problems)
    if problems:
        raise DataListError(problems, root=path)
    fmt = "grey" if mapping_json is None else "mapping"
    items = _pair(img_dir, mask_dir, str(site or path.name), "train", fmt, problems,
                  mapping_json)
    if not items and not problems:
        problems.append(f"no images found in {img_dir}")
    if problems:
        raise DataListError(problems, root=path)
    return items


def _looks_like_palette(mask_dir: Path) -> bool:
    """True when most masks are palette PNGs or hold only values <= 2. A majority over every
    mask, not the first few: one odd mask must be named by the data check, not turn the
    coding of all the others into the wrong one."""
    import numpy as np
    from PIL import Image

    masks = _files(mask_dir)
    votes = against = 0
    for p in masks:  # stop reading once the majority is decided
        try:
            with Image.open(p) as im:
                palette = im.mode in ("P", "PA") or int(np.asarray(im).max(initial=0)) <= 2
        except Exception:  # noqa: BLE001 - unreadable masks are reported by the lister
            palette = False
        votes, against = votes + palette, against + (not palette)
        if votes * 2 > len(masks) or against * 2 >= len(masks):
            break
    return bool(masks) and votes * 2 > len(masks)


def detect_fundus_layout(root) -> str:
    """``"domains"`` (``Domain*/`` sub-folders or ``train/``/``test/`` splits), ``"drishti"``
    (``images/`` + ``masks/`` holding palette PNGs or values <= 2) or ``"folder"`` (anything
    else)."""
    path = check_root(root)
    if _domain_folders(path):
        return "domains"
    img_dir = _find_dir(path, ("images", "image"))
    mask_dir = _find_dir(path, ("masks", "mask", "labels", "label"))
    if img_dir is not None and mask_dir is not None and _looks_like_palette(mask_dir):
        return "drishti"
    return "folder"


def build_fundus_datalist(root, layout: str = "auto", mapping=None) -> list[dict]:
    """Data list of ``root``; ``layout`` is ``"auto"`` or one of :data:`FUNDUS_LAYOUTS`.

    A ``mapping`` overrides the label format of every item (``label_format="mapping"``),
    whatever the layout: use it for masks that follow neither the grey nor the palette
    convention.
    """
    key = str(layout).lower()
    if key == "auto":
        key = detect_fundus_layout(root)
    if key not in FUNDUS_LAYOUTS:
        raise DataListError([f"unknown layout {layout!r}; choose 'auto' or one of "
                             f"{FUNDUS_LAYOUTS}"])
    if key == "folder":
        return list_fundus_folder(root, mapping=mapping)
    items = list_fundus_domains(root) if key == "domains" else list_drishti(root)
    if mapping is not None:
        try:
            mapping_json = _mapping_json(mapping)
        except ValueError as err:
            raise DataListError([str(err)], root=root) from None
        items = [{**it, "label_format": "mapping", "mapping": mapping_json} for it in items]
    return items


@exit_on_data_errors
def fundus_datalist(dataset_dir, demo_dir=None, layout: str = "auto", mapping=None,
                    demo_seed: int = 0) -> list[dict]:
    """The bundles' entry point: the data list of ``dataset_dir``.

    When ``dataset_dir`` is the bundle's demo folder (``demo_dir``), the synthetic
    multi-domain fundus demo set is generated there first if it is missing (see
    :func:`msf_monai.tasks.fundus.ensure_demo_fundus`); any other folder is only read. Problems are
    raised as :class:`~msf_monai.data.validation.DataValidationError` (clean exit, no traceback).
    """
    if demo_dir is not None and Path(dataset_dir).expanduser().absolute() == \
            Path(demo_dir).expanduser().absolute():
        ensure_demo_fundus(demo_dir, seed=demo_seed)
    return build_fundus_datalist(dataset_dir, layout=layout, mapping=mapping)


@exit_on_data_errors
def fundus_image_files(folder) -> list[dict]:
    """Inference list: every image file (PNG, JPEG, BMP, TIFF) directly in ``folder``, as
    ``{"image": path, "case": stem}`` items. Two files of the same stem (``x.png`` and
    ``x.jpg``) would write one mask: they are refused, naming both."""
    path = check_root(folder)
    items = [{"image": str(p), "case": p.stem} for p in _files(path)]
    if not items:
        raise DataListError([f"no image files ({', '.join(FUNDUS_IMAGE_EXTENSIONS)}) in {path}"],
                            root=path)
    clashes = same_output_name_problems([(it["case"], Path(it["image"])) for it in items])
    if clashes:
        raise DataListError(clashes, root=path)
    return items
