"""Prepare the public data sets for the bundles: check an archive (or its unpacked folder), merge
the prostate zones, report cases per site, and write the layout the bundles read. Nothing
partial is written: a failed or interrupted run leaves no destination folder.

    python scripts/prepare_data.py msd_prostate Task05_Prostate.tar /data/msd_prostate
    python scripts/prepare_data.py msd_prostate /data/downloads /data/msd_prostate --download true
    python scripts/prepare_data.py multisite_prostate Processed_data_nii.zip /data/prostate_6sites
    python scripts/prepare_data.py nci_isbi /data/nci_isbi_cases /data/nci_sites --sites SiteA=0-28,SiteB=29-38
    python scripts/prepare_data.py fundus_5domain Fundus.zip /data/fundus

Then, e.g., train on MSD and test on the six sites (the paper's Table 2 protocol):

    python -m monai.bundle run --config_file bundles/prostate/configs/phase1.json \\
        --dataset_dir /data/msd_prostate --resample spacing
    python -m monai.bundle run --config_file bundles/prostate/configs/evaluate.json \\
        --dataset_dir /data/msd_prostate --test_dirs /data/prostate_6sites
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msf_monai.data import prepare  # noqa: E402


def _run(prepare_one, *args) -> dict[str, int]:
    """A preparation, with its problem (if any) as a clean message and exit status 1."""
    try:
        return prepare_one(*args)
    except prepare.PreparationError as err:
        raise SystemExit(f"error: {err}") from None


def _report(counts: dict[str, int], dest) -> None:
    total = sum(counts.values())
    print(", ".join(f"{site}: {n}" for site, n in counts.items()) + f" ({total} cases) in {Path(dest).expanduser().absolute()}")


def msd_prostate(source: str, dest: str, download: bool = False, overwrite: bool = False) -> None:
    """Medical Segmentation Decathlon Task05 -> ``dest`` (imagesTr/, labelsTr/ with the zones
    merged, dataset.json).

    Args:
        source: ``Task05_Prostate.tar`` or a folder holding ``Task05_Prostate/`` (or its contents).
        dest: output folder (must not exist or be empty, unless ``--overwrite true``).
        download: first download and unpack Task05 into ``source`` (a folder) with MONAI's
            ``DecathlonDataset`` (needs the internet; about 230 MB).
        overwrite: replace a non-empty ``dest``.
    """
    from msf_monai.cli import as_bool

    if as_bool(download, "--download"):
        from monai.apps import DecathlonDataset

        Path(source).mkdir(parents=True, exist_ok=True)
        DecathlonDataset(root_dir=source, task="Task05_Prostate", section="training", download=True, cache_rate=0.0)
    _report(_run(prepare.prepare_msd_prostate, source, dest, as_bool(overwrite, "--overwrite")), dest)


def multisite_prostate(source: str, dest: str, overwrite: bool = False) -> None:
    """The six-site prostate set (BIDMC, BMC, HK, I2CVB, ISBI, ISBI_1.5; zip or folder) ->
    ``dest/<site>/CaseNN.nii.gz`` + ``CaseNN_segmentation.nii.gz`` (zones merged)."""
    from msf_monai.cli import as_bool

    _report(_run(prepare.prepare_multisite_prostate, source, dest, as_bool(overwrite, "--overwrite")), dest)


def nci_isbi(source: str, dest: str, sites="SiteA=0-28,SiteB=29-38", overwrite: bool = False) -> None:
    """NCI-ISBI 2013 cases in one folder (or archive) -> ``dest/<site>/`` by case number
    (``--sites NAME=FIRST-LAST,...``; the default: its two acquisition protocols), zones merged."""
    from msf_monai.cli import as_bool

    _report(_run(prepare.prepare_nci_isbi, source, dest, sites, as_bool(overwrite, "--overwrite")), dest)


def fundus_5domain(source: str, dest: str, overwrite: bool = False) -> None:
    """The 5-domain fundus benchmark (Domain1..Domain5, train|test/ROIs/image|mask; zip or
    folder) -> ``dest``, checked image by image."""
    from msf_monai.cli import as_bool

    _report(_run(prepare.prepare_fundus_5domain, source, dest, as_bool(overwrite, "--overwrite")), dest)


if __name__ == "__main__":
    from msf_monai.cli import fire_main

    fire_main({"msd_prostate": msd_prostate, "multisite_prostate": multisite_prostate, "nci_isbi": nci_isbi,
               "fundus_5domain": fundus_5domain})
