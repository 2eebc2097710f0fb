"""Arrange a one-folder prostate dataset into the multi-site layout by case number.

Some datasets mix acquisition sites in one folder (e.g. NCI-ISBI 2013: cases 00-28 from one
protocol, 29-38 from another). The bundles read sites from sub-folders; this links (or copies)
``CaseNN.nii.gz`` and its ``CaseNN_[Ss]egmentation.nii.gz`` into ``<dest>/<site>/``:

    python scripts/prepare_sites.py /data/prostate_nci_isbi /data/nci_sites --sites SiteA=0-28,SiteB=29-38
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path


def parse_sites(spec: str | dict) -> dict[str, range]:
    """``"SiteA=0-28,SiteB=29-38"`` -> ``{"SiteA": range(0, 29), "SiteB": range(29, 39)}``."""
    if isinstance(spec, dict):
        items = [f"{k}={v}" for k, v in spec.items()]
    else:
        items = [s for s in (spec if isinstance(spec, (list, tuple)) else str(spec).split(",")) if s]
    sites = {}
    for item in items:
        m = re.fullmatch(r"\s*([A-Za-z0-9_-]+)\s*=\s*(\d+)\s*-\s*(\d+)\s*", str(item))
        if not m:
            raise SystemExit(f"bad site range {item!r}; expected NAME=FIRST-LAST, e.g. SiteA=0-28")
        sites[m.group(1)] = range(int(m.group(2)), int(m.group(3)) + 1)
    return sites


def main(source: str, dest: str, sites="SiteA=0-28,SiteB=29-38", copy: bool = False) -> None:
    """Link (default) or copy each case and its label into ``dest/<site>/``.

    Args:
        source: folder with ``CaseNN.nii.gz`` and ``CaseNN_Segmentation.nii.gz`` files.
        dest: output folder (created); existing entries are replaced.
        sites: ``NAME=FIRST-LAST`` case-number ranges, comma separated.
        copy: copy the files instead of linking them.
    """
    from msf_monai.cli import as_bool

    copy = as_bool(copy, "--copy")
    src = Path(source).resolve()
    if not src.is_dir():
        raise SystemExit(f"source folder not found: {src}")
    ranges = parse_sites(sites)
    images = sorted(p for p in src.iterdir() if re.fullmatch(r"Case(\d+)\.(nii\.gz|nii|mhd|nrrd)", p.name))
    placed = {name: 0 for name in ranges}
    for image in images:
        number = int(re.match(r"Case(\d+)", image.name).group(1))
        site = next((name for name, r in ranges.items() if number in r), None)
        if site is None:
            continue
        stem, ext = image.name.split(".", 1)
        labels = [src / f"{stem}_{s}egmentation.{ext}" for s in ("S", "s")]
        label = next((p for p in labels if p.is_file()), None)
        if label is None:
            raise SystemExit(f"{image} has no label ({labels[0].name} or {labels[1].name})")
        out = Path(dest) / site
        out.mkdir(parents=True, exist_ok=True)
        for f in (image, label):
            target = out / f.name
            if target.exists() or target.is_symlink():
                target.unlink()
            shutil.copy2(f, target) if copy else target.symlink_to(f)
        placed[site] += 1
    print(", ".join(f"{name}: {n} case(s)" for name, n in placed.items()) + f" in {Path(dest).resolve()}")
    empty = [name for name, n in placed.items() if n == 0]
    if empty:
        raise SystemExit(f"no cases found for site(s) {empty} in {src}")


if __name__ == "__main__":
    from msf_monai.cli import fire_main

    fire_main(main)
