"""Data lists for prostate MRI segmentation data in common folder layouts.

Every item is a dict ``{"image": str, "label": str, "site": str, "case": str}`` with absolute
paths, plus ``"channel": int`` when the image is 4-D and the layout says which channel holds
the T2 image (the Decathlon layout only, see :func:`layout_channel`; a 4-D image with several
channels in any other layout is reported by the data check), ready for MONAI ``LoadImaged``
based pipelines.

Supported layouts (see :func:`detect_layout`):

``multisite``
    the public 6-site multi-site prostate layout ``<root>/<Site>/CaseNN.nii.gz`` +
    ``CaseNN_segmentation.nii.gz`` (any capitalisation of ``_segmentation``, e.g. the
    ``_Segmentation`` of NCI-ISBI), PROMISE12-style MetaImage (``CaseNN.mhd`` +
    ``CaseNN_segmentation.mhd``) or NRRD files; case files directly in ``root`` form one site
    named after ``root``.
``decathlon``
    Medical Segmentation Decathlon Task05_Prostate: ``imagesTr/prostate_NN.nii.gz`` +
    ``labelsTr/prostate_NN.nii.gz`` (4-D images, T2 = channel 0); site ``"Decathlon"``.
``folder``
    ``<root>/images/<name>`` + ``<root>/labels/<name>`` (same file name, or same name with
    another supported extension); site = name of ``root``.

All problems found (missing root, no cases, an image without a label or a label without an
image, unreadable headers...) are collected and raised once as :class:`DataListError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
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
from .synthetic import ensure_demo_prostate

__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "list_multisite",
    "list_decathlon",
    "list_image_label_folder",
    "layout_channel",
    "detect_layout",
    "build_datalist",
    "prostate_datalist",
    "image_files",
]

#: file name endings recognised as images (matched case-insensitively; longest first)
IMAGE_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd", ".nhdr")
LAYOUTS: tuple[str, ...] = ("decathlon", "multisite", "folder")
DECATHLON_SITE = "Decathlon"

_LABEL_RE = re.compile(r"^(?P<case>.+?)_segmentation$", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _split_ext(name: str) -> tuple[str, str] | None:
    low = name.lower()
    for ext in IMAGE_EXTENSIONS:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    return None


def _image_files(folder: Path) -> list[Path]:
    """Case files of ``folder``, broken symbolic links included (so that the pairing names the
    link, not its partner as unpaired; :func:`_make_item` reports it)."""
    return sorted((p for p in folder.iterdir()
                   if is_visible(p) and (p.is_file() or is_broken_link(p)) and _split_ext(p.name) is not None),
                  key=lambda p: natural_key(p.name))



def _read_text_header(path: Path, limit: int = 65536) -> str:
    with open(path, "rb") as fh:
        raw = fh.read(limit)
    cut = raw.find(b"\n\n")  # NRRD: blank line ends the header
    if path.name.lower().endswith(".nrrd") and cut >= 0:
        raw = raw[:cut]
    return raw.decode("latin-1")


def _header_info(path: Path) -> tuple[int | None, str | None]:
    """(number of dimensions, problem text or None) from the image header only."""
    low = path.name.lower()
    try:
        if low.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            return len(nib.load(str(path)).header.get_data_shape()), None
        if low.endswith((".mhd", ".mha")):
            text = _read_text_header(path)
            m = re.search(r"^\s*NDims\s*=\s*(\d+)", text, re.MULTILINE | re.IGNORECASE)
            if not m:
                return None, f"cannot read MetaImage header (no NDims): {path}"
            ndim = int(m.group(1))
            if low.endswith(".mhd"):
                d = re.search(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", text,
                              re.MULTILINE | re.IGNORECASE)
                if not d:
                    return ndim, f"MetaImage header has no ElementDataFile: {path}"
                data = d.group(1)
                if data.upper() != "LOCAL" and not data.upper().startswith("LIST") \
                        and "%" not in data and not (path.parent / data).is_file():
                    return ndim, f"MetaImage data file {data!r} is missing for {path}"
            return ndim, None
        if low.endswith((".nrrd", ".nhdr")):
            text = _read_text_header(path)
            m = re.search(r"^\s*dimension\s*:\s*(\d+)", text, re.MULTILINE | re.IGNORECASE)
            if not m:
                return None, f"cannot read NRRD header (no dimension): {path}"
            return int(m.group(1)), None
    except Exception as err:  # noqa: BLE001 - any reader failure is reported as a problem
        return None, f"cannot read image header of {path}: {err}"
    return None, None


def _make_item(image: Path, label: Path, site: str, case: str, problems: list[str],
               channel: int | None = None) -> dict:
    """An item; ``channel`` (the layout's channel to segment, see :func:`layout_channel`) is
    kept for 4-D images only."""
    item = {"image": str(image), "label": str(label), "site": site, "case": case}
    links = [text for text in (broken_link_problem(image), broken_link_problem(label)) if text]
    if links:
        problems.extend(links)
        return item
    ndim, problem = _header_info(image)
    if problem:
        problems.append(problem)
    if channel is not None and ndim is not None and ndim >= 4:
        item["channel"] = int(channel)
    if label.name.lower().endswith(".mhd"):
        _, problem = _header_info(label)
        if problem:
            problems.append(problem)
    return item


def _scan_case_folder(folder: Path, site: str, problems: list[str]) -> tuple[list[dict], bool]:
    """Pairs ``<case>.<ext>`` with ``<case>_segmentation.<ext>`` in one folder.

    Returns (items, whether the folder held any case file at all).
    """
    images: list[tuple[str, Path]] = []
    labels: list[tuple[str, Path]] = []
    for p in _image_files(folder):
        stem, _ = _split_ext(p.name)
        m = _LABEL_RE.match(stem)
        if m:
            labels.append((m.group("case"), p))
        else:
            images.append((stem, p))
    pairs = pair_by_case(images, labels, problems,
                         lambda case, p: f"expected {case}_segmentation{_split_ext(p.name)[1]} beside it",
                         lambda case, _: f"no {case}.* beside it")
    items = [_make_item(image, label, site, case, problems) for case, image, label in pairs]
    return items, bool(images or labels)


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------
def list_multisite(root) -> list[dict]:
    """Items of the per-site layout ``<root>/<site>/CaseNN.nii.gz`` + ``CaseNN_segmentation.*``.

    Case files directly inside ``root`` are listed too, with ``site`` = the name of ``root``.
    Sub-folders without any image file are ignored.  Sorted by site, then case.
    """
    path = check_root(root)
    problems: list[str] = []
    items: list[dict] = []
    top, _ = _scan_case_folder(path, path.name, problems)
    items.extend(top)
    for sub in sorted((p for p in path.iterdir() if p.is_dir() and is_visible(p)),
                      key=lambda p: natural_key(p.name)):
        found, _ = _scan_case_folder(sub, sub.name, problems)
        items.extend(found)
    if not items and not problems:
        problems.append(f"no cases found under {path} (expected <root>/<site>/CaseNN.nii.gz "
                        "with CaseNN_segmentation.nii.gz, or .mhd/.nrrd pairs)")
    if problems:
        raise DataListError(problems, root=path)
    return items


def _decathlon_t2_channel(path: Path, problems: list[str]) -> int:
    meta = path / "dataset.json"
    if not meta.is_file():
        return 0
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        problems.append(f"cannot read {meta}: {err}")
        return 0
    modality = info.get("modality") or info.get("channel_names") or {}
    if isinstance(modality, Mapping):
        for key, name in modality.items():
            if str(name).strip().upper() in {"T2", "T2W", "T2-WEIGHTED"} and str(key).isdigit():
                return int(key)
    return 0


def layout_channel(images_folder, problems: list[str] | None = None) -> int | None:
    """The channel to segment in the 4-D images of ``images_folder``, when the folder layout
    says: ``imagesTr/`` or ``imagesTs/`` of a Decathlon task folder (one with ``imagesTr/``)
    give the T2 channel of the task's ``dataset.json`` (``modality``), 0 when not stated (the
    order of Task05_Prostate). ``None`` for any other folder: its 4-D images with several
    channels are then reported by the data check, in training and inference alike, never read
    as channel 0 silently. Problems reading ``dataset.json`` are appended to ``problems``."""
    path = Path(images_folder)
    if path.name not in ("imagesTr", "imagesTs") or not (path.parent / "imagesTr").is_dir():
        return None
    return _decathlon_t2_channel(path.parent, [] if problems is None else problems)


def list_decathlon(root) -> list[dict]:
    """Items of a Medical Segmentation Decathlon task folder (e.g. ``Task05_Prostate``).

    ``imagesTr/<name>.nii.gz`` is paired with ``labelsTr/<name>.nii.gz``; macOS ``._`` files
    are ignored.  4-D images get ``"channel"``: the T2 channel from ``dataset.json``
    (``modality``), 0 when not stated.  Site ``"Decathlon"``, case = file name stem.
    """
    path = check_root(root)
    problems: list[str] = []
    img_dir, lab_dir = _image_label_folders(path, "imagesTr", "labelsTr")
    channel = layout_channel(img_dir, problems)
    items = _pair_folders(img_dir, lab_dir, DECATHLON_SITE, problems, channel)
    if not items and not problems:
        problems.append(f"no cases found in {img_dir}")
    if problems:
        raise DataListError(problems, root=path)
    return items


def _image_label_folders(path: Path, images: str, labels: str) -> tuple[Path, Path]:
    """``path/images`` and ``path/labels``; one error naming every missing folder."""
    img_dir, lab_dir = path / images, path / labels
    missing = [f"{kind} folder missing: {d}" for kind, d in (("images", img_dir), ("labels", lab_dir)) if not d.is_dir()]
    if missing:
        raise DataListError(missing, root=path)
    return img_dir, lab_dir


def _pair_folders(img_dir: Path, lab_dir: Path, site: str, problems: list[str],
                  channel: int | None = None) -> list[dict]:
    """Pair files of the same name (or same stem with another extension) in two folders."""
    def named(folder):
        return [(_split_ext(p.name)[0], p) for p in _image_files(folder)]

    pairs = pair_by_case(named(img_dir), named(lab_dir), problems, lambda case, _: f"no {case}.* in {lab_dir}",
                         lambda case, _: f"no {case}.* in {img_dir}", prefer_same_name=True)
    return [_make_item(image, label, site, case, problems, channel) for case, image, label in pairs]


def list_image_label_folder(root) -> list[dict]:
    """Items of ``<root>/images/<name>`` + ``<root>/labels/<name>``; site = name of ``root``."""
    path = check_root(root)
    problems: list[str] = []
    img_dir, lab_dir = _image_label_folders(path, "images", "labels")
    items = _pair_folders(img_dir, lab_dir, path.name, problems)
    if not items and not problems:
        problems.append(f"no cases found in {img_dir}")
    if problems:
        raise DataListError(problems, root=path)
    return items


def detect_layout(root) -> str:
    """``"decathlon"`` (has ``imagesTr/``), ``"folder"`` (``images/`` and ``labels/``) or
    ``"multisite"`` (anything else)."""
    path = check_root(root)
    if (path / "imagesTr").is_dir():
        return "decathlon"
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return "folder"
    return "multisite"


_LISTERS = {"decathlon": list_decathlon, "multisite": list_multisite,
            "folder": list_image_label_folder}


def build_datalist(root, layout: str = "auto") -> list[dict]:
    """Data list of ``root``; ``layout`` is ``"auto"`` or one of :data:`LAYOUTS`."""
    key = str(layout).lower()
    if key == "auto":
        key = detect_layout(root)
    if key not in _LISTERS:
        raise DataListError([f"unknown layout {layout!r}; choose 'auto' or one of {LAYOUTS}"])
    return _LISTERS[key](root)


# --------------------------------------------------------------------------------------------
# splitting / grouping
# --------------------------------------------------------------------------------------------
@exit_on_data_errors
def prostate_datalist(dataset_dir, demo_dir=None, layout: str = "auto", demo_seed: int = 0) -> list[dict]:
    """The bundles' entry point: the data list of ``dataset_dir``.

    Problems (missing or empty folder, unpaired files, ...) are raised as
    :class:`~msf_monai.data.validation.DataValidationError` (a clean message and exit status 1
    in a bundle run, not a traceback).

    When ``dataset_dir`` is the bundle's demo folder (``demo_dir``), the synthetic multi-site
    demo set is generated there first if it is missing (see
    :func:`msf_monai.tasks.prostate.ensure_demo_prostate`); any other folder is only read.
    """
    if demo_dir is not None and Path(dataset_dir).expanduser().absolute() == Path(demo_dir).expanduser().absolute():
        ensure_demo_prostate(demo_dir, seed=demo_seed)
    return build_datalist(dataset_dir, layout=layout)


@exit_on_data_errors
def image_files(folder) -> list[dict]:
    """Inference list: every image file of ``folder`` (NIfTI, MetaImage, NRRD) that is not a
    label (``*_segmentation``), as ``{"image": path, "case": name}`` items, plus ``"channel"``
    for the 4-D images of a Decathlon ``imagesTr/`` or ``imagesTs/`` folder, as in training
    (:func:`layout_channel`). Two files of the same name with different extensions
    (``Case00.nii`` and ``Case00.nii.gz``) would write one mask: they are refused, naming both
    (:func:`same_output_name_problems`)."""
    path = check_root(folder)
    problems: list[str] = []
    channel = layout_channel(path, problems)
    items = []
    for p in _image_files(path):
        stem, _ = _split_ext(p.name)
        if not _LABEL_RE.match(stem):
            item = {"image": str(p), "case": stem}
            if channel is not None and (_header_info(p)[0] or 0) >= 4:
                item["channel"] = channel
            items.append(item)
    if not items:
        raise DataListError([f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {path}"], root=path)
    problems += same_output_name_problems([(it["case"], Path(it["image"])) for it in items])
    if problems:
        raise DataListError(problems, root=path)
    return items
