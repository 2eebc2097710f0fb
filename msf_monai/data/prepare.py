"""Turn the public data sets, as downloaded, into the layouts the bundles read
(``scripts/prepare_data.py``).

Every preparation reads an archive (``.tar``, ``.tar.gz``, ``.zip``) or an unpacked folder,
finds the data set's folders wherever they sit inside it, checks them (naming what is missing),
writes into a temporary folder beside the destination and renames it into place only when
everything was written: an interrupted or failed preparation leaves no partial destination.
Prostate labels are written with the zones merged (any label > 0 is prostate, uint8), images
unchanged. Each returns ``{site: number of cases}``.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from ..errors import MsfError
from ..tasks.fundus.lists import fundus_datalist
from ..tasks.prostate.lists import prostate_datalist
from .core import is_visible
from .validation import DataValidationError

__all__ = [
    "MULTISITE_PROSTATE_SITES",
    "PreparationError",
    "prepare_fundus_5domain",
    "prepare_msd_prostate",
    "prepare_multisite_prostate",
    "prepare_nci_isbi",
]

#: the six sites of the multi-site prostate set (Liu et al., SAML / MS-Net)
MULTISITE_PROSTATE_SITES = ("BIDMC", "BMC", "HK", "I2CVB", "ISBI", "ISBI_1.5")
_CASE = re.compile(r"^(Case\d+)\.(nii\.gz|nii)$", re.IGNORECASE)


class PreparationError(MsfError):
    """A source that is not the expected data set (wrong or incomplete archive, unreadable
    label, occupied destination): the message names what is wrong. ``scripts/prepare_data.py``
    prints it and exits with status 1."""


@contextmanager
def _unpacked(source) -> Iterable[Path]:
    """The source folder, or the archive unpacked into a temporary folder (removed after)."""
    path = Path(source).expanduser()
    if path.is_dir():
        yield path.resolve()
        return
    if not path.is_file():
        raise PreparationError(f"source not found: {path}")
    with tempfile.TemporaryDirectory(prefix="msf_unpack_") as tmp:
        root = Path(tmp)
        try:
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as zf:
                    _check_members(path, [m.filename for m in zf.infolist()])
                    zf.extractall(root)
            elif tarfile.is_tarfile(path):
                with tarfile.open(path) as tf:
                    members = tf.getmembers()
                    _check_members(path, [m.name for m in members])
                    tf.extractall(root, members=[m for m in members if m.isfile() or m.isdir()])
            else:
                raise PreparationError(f"{path}: neither a folder nor a .zip/.tar archive")
        except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError) as err:
            raise PreparationError(f"{path}: cannot unpack ({err}); is the download complete?") from None
        yield root


def _check_members(archive: Path, names: list[str]) -> None:
    bad = [n for n in names if n.startswith(("/", "\\")) or ".." in Path(n).parts]
    if bad:
        raise PreparationError(f"{archive}: refusing entries that leave the archive folder: {bad[:3]}")


def _visible(path: Path) -> bool:
    """:func:`~msf_monai.data.core.is_visible`, and not inside a ``__MACOSX`` folder (``rglob``
    walks into them)."""
    return is_visible(path) and "__MACOSX" not in path.parts


def _find(root: Path, test: Callable[[Path], bool], what: str, source) -> Path:
    """The shallowest folder under ``root`` (itself included) that passes ``test``."""
    candidates = [root] + sorted((p for p in root.rglob("*") if p.is_dir() and _visible(p)), key=lambda p: len(p.parts))
    for folder in candidates:
        if test(folder):
            return folder
    found = sorted(p.name for p in root.iterdir() if _visible(p))
    raise PreparationError(f"{source}: {what} not found (top level holds: {', '.join(found) or 'nothing'})")


@contextmanager
def _atomic_destination(dest, overwrite: bool = False) -> Iterable[Path]:
    """A temporary folder beside ``dest`` that becomes ``dest`` only if the block succeeds."""
    dest = Path(dest).expanduser().absolute()
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise PreparationError(f"{dest} exists and is not empty; choose another folder or pass --overwrite true")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.part_", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_merged_label(src: Path, dst: Path) -> None:
    """The label with every positive value as 1 (prostate zones merged), uint8, same geometry."""
    import nibabel as nib
    import numpy as np

    try:
        img = nib.load(str(src))
        merged = (np.asarray(img.dataobj) > 0).astype(np.uint8)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported by name
        raise PreparationError(f"{src}: not a readable NIfTI label ({err})") from None
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    nib.save(nib.Nifti1Image(merged, img.affine, header), str(dst))


def _site_cases(folder: Path, source, site: str) -> list[tuple[Path, Path]]:
    """``(image, label)`` pairs of a multi-site folder (``CaseNN.nii.gz`` + ``CaseNN_[Ss]egmentation``)."""
    pairs, missing = [], []
    for image in sorted(p for p in folder.iterdir() if _visible(p) and _CASE.match(p.name)):
        stem, ext = _CASE.match(image.name).groups()
        label = next((folder / f"{stem}_{s}egmentation.{ext}" for s in ("s", "S") if (folder / f"{stem}_{s}egmentation.{ext}").is_file()), None)
        if label is None:
            missing.append(f"{site}/{stem}_segmentation.{ext}")
        else:
            pairs.append((image, label))
    if missing:
        raise PreparationError(f"{source}: label(s) missing for {len(missing)} case(s): {', '.join(missing[:5])}")
    if not pairs:
        raise PreparationError(f"{source}: site folder {site} holds no CaseNN.nii.gz images")
    return pairs


def _write_sites(sites: dict[str, list[tuple[Path, Path]]], out: Path) -> dict[str, int]:
    for site, pairs in sites.items():
        (out / site).mkdir(parents=True)
        for image, label in pairs:
            stem = _CASE.match(image.name).group(1)
            shutil.copyfile(image, out / site / image.name)
            suffix = ".nii.gz" if label.name.endswith(".gz") else ".nii"
            _write_merged_label(label, out / site / f"{stem}_segmentation{suffix}")
    return {site: len(pairs) for site, pairs in sites.items()}


def prepare_msd_prostate(source, dest, overwrite: bool = False) -> dict[str, int]:
    """Medical Segmentation Decathlon Task05 (``Task05_Prostate.tar`` or its folder) ->
    ``dest/imagesTr`` (4-D T2+ADC images, unchanged), ``dest/labelsTr`` (zones merged) and
    ``dataset.json`` (which names the T2 channel the bundles segment)."""
    with _unpacked(source) as root:
        task = _find(root, lambda p: (p / "imagesTr").is_dir() or (p / "labelsTr").is_dir(), "a Task05_Prostate folder (imagesTr/, labelsTr/)", source)
        missing = [name for name in ("imagesTr", "labelsTr", "dataset.json") if not (task / name).exists()]
        if missing:
            raise PreparationError(f"{source}: incomplete Task05_Prostate, missing {', '.join(missing)} in {task.name}/")
        images = sorted(p for p in (task / "imagesTr").iterdir() if _visible(p) and p.name.endswith((".nii.gz", ".nii")))
        unpaired = [p.name for p in images if not (task / "labelsTr" / p.name).is_file()]
        if unpaired:
            raise PreparationError(f"{source}: labelsTr/ lacks the label of {len(unpaired)} image(s): {', '.join(unpaired[:5])}")
        if not images:
            raise PreparationError(f"{source}: imagesTr/ holds no NIfTI images")
        with _atomic_destination(dest, overwrite) as out:
            (out / "imagesTr").mkdir()
            (out / "labelsTr").mkdir()
            shutil.copyfile(task / "dataset.json", out / "dataset.json")
            for image in images:
                shutil.copyfile(image, out / "imagesTr" / image.name)
                _write_merged_label(task / "labelsTr" / image.name, out / "labelsTr" / image.name)
            prostate_datalist(str(out))  # read back with the bundles' own lister
    return {"Decathlon": len(images)}


def prepare_multisite_prostate(source, dest, overwrite: bool = False) -> dict[str, int]:
    """The six-site prostate set (zip or folder with BIDMC, BMC, HK, I2CVB, ISBI, ISBI_1.5) ->
    ``dest/<site>/CaseNN.nii.gz`` + ``CaseNN_segmentation.nii.gz`` (zones merged)."""
    with _unpacked(source) as root:
        base = _find(root, lambda p: sum((p / s).is_dir() for s in MULTISITE_PROSTATE_SITES) >= 1,
                     f"the site folders ({', '.join(MULTISITE_PROSTATE_SITES)})", source)
        absent = [s for s in MULTISITE_PROSTATE_SITES if not (base / s).is_dir()]
        if absent:
            raise PreparationError(f"{source}: incomplete six-site prostate set, site folder(s) missing: {', '.join(absent)}")
        sites = {s: _site_cases(base / s, source, s) for s in MULTISITE_PROSTATE_SITES}
        with _atomic_destination(dest, overwrite) as out:
            counts = _write_sites(sites, out)
            prostate_datalist(str(out))  # read back with the bundles' own lister
    return counts


def prepare_nci_isbi(source, dest, sites="SiteA=0-28,SiteB=29-38", overwrite: bool = False) -> dict[str, int]:
    """NCI-ISBI 2013 in one folder (``CaseNN.nii.gz`` + ``CaseNN_Segmentation.nii.gz``) ->
    ``dest/<site>/`` by case number (``sites``: ``NAME=FIRST-LAST,...``; the default gives the
    two acquisition protocols), zones merged."""

    ranges = _parse_ranges(sites)
    with _unpacked(source) as root:
        folder = _find(root, lambda p: any(_CASE.match(q.name) for q in p.iterdir() if q.is_file()), "CaseNN.nii.gz images", source)
        pairs = _site_cases(folder, source, folder.name)
        grouped = {name: [(i, lab) for i, lab in pairs if int(re.search(r"\d+", i.name).group()) in r] for name, r in ranges.items()}
        empty = [name for name, found in grouped.items() if not found]
        if empty:
            raise PreparationError(f"{source}: no cases in the range of site(s) {', '.join(empty)} ({sites})")
        with _atomic_destination(dest, overwrite) as out:
            counts = _write_sites(grouped, out)
            prostate_datalist(str(out))  # read back with the bundles' own lister
    return counts


def _parse_ranges(spec) -> dict[str, range]:
    """``"SiteA=0-28,SiteB=29-38"`` (or a list of such items) -> ``{"SiteA": range(0, 29), ...}``."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    ranges = {}
    for item in (str(i) for i in items if str(i).strip()):
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*=\s*(\d+)\s*-\s*(\d+)\s*", item)
        if not m:
            raise PreparationError(f"bad site range {item!r}; expected NAME=FIRST-LAST, e.g. SiteA=0-28")
        ranges[m.group(1)] = range(int(m.group(2)), int(m.group(3)) + 1)
    if not ranges:
        raise PreparationError("no site ranges given (e.g. --sites SiteA=0-28,SiteB=29-38)")
    return ranges


def prepare_fundus_5domain(source, dest, overwrite: bool = False) -> dict[str, int]:
    """The 5-domain fundus benchmark (zip or folder with ``Domain1``..``Domain5``, each
    ``train|test/ROIs/image|mask``) -> ``dest/Domain<k>/...`` unchanged, checked by the fundus
    data list (every image paired with its mask)."""
    with _unpacked(source) as root:
        base = _find(root, lambda p: any(q.is_dir() and re.fullmatch(r"Domain\d+", q.name) for q in p.iterdir()),
                     "Domain1..Domain5 folders", source)
        domains = sorted(q for q in base.iterdir() if q.is_dir() and re.fullmatch(r"Domain\d+", q.name))
        absent = [f"Domain{k}" for k in range(1, 6) if not (base / f"Domain{k}").is_dir()]
        if absent:
            raise PreparationError(f"{source}: incomplete 5-domain fundus set, missing {', '.join(absent)}")
        try:
            items = fundus_datalist(str(base))
        except DataValidationError as err:
            raise PreparationError(f"{source}: not in the 5-domain layout:\n{err}") from None
        with _atomic_destination(dest, overwrite) as out:
            for domain in domains:
                shutil.copytree(domain, out / domain.name, ignore=shutil.ignore_patterns(".*", "__MACOSX"))
            fundus_datalist(str(out))  # read back with the bundles' own lister
    counts: dict[str, int] = {}
    for item in items:
        counts[item["site"]] = counts.get(item["site"], 0) + 1
    return counts
