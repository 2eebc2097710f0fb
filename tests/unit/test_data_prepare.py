"""Preparing the public data sets (msf_monai.data.prepare) from small archives in each layout (made here, no network)."""

from __future__ import annotations

import shutil
import zipfile

import nibabel as nib
import pytest

from data_utils import labels_merged, msd_archive, multisite_zip, synthetic_volumes, zoned
from msf_monai.data import DataValidationError, external_datalist
from msf_monai.tasks.fundus import generate_demo_fundus
from msf_monai.tasks.prostate import prostate_datalist
from msf_monai.data.prepare import (
    MULTISITE_PROSTATE_SITES,
    PreparationError,
    prepare_fundus_5domain,
    prepare_msd_prostate,
    prepare_multisite_prostate,
    prepare_nci_isbi,
)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """12 small synthetic cases (image and zone label files) to arrange into each layout."""
    return synthetic_volumes(tmp_path_factory.mktemp("synthetic"))


def test_incomplete_or_wrong_archives_are_refused_and_nothing_is_written(tmp_path, volumes):
    dest = tmp_path / "out"
    no_labels = msd_archive(tmp_path / "a", volumes, n=2, with_labels=False)
    with pytest.raises(PreparationError, match="lacks the label of 2 image"):
        prepare_msd_prostate(no_labels, dest)
    five_sites = multisite_zip(tmp_path / "b", volumes, sites=MULTISITE_PROSTATE_SITES[:5])
    with pytest.raises(PreparationError, match=r"site folder\(s\) missing: ISBI_1\.5"):
        prepare_multisite_prostate(five_sites, dest)
    with pytest.raises(PreparationError, match="Task05_Prostate folder"):
        prepare_msd_prostate(five_sites, dest)  # the wrong archive for this data set
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PreparationError, match="broken.zip"):
        prepare_multisite_prostate(tmp_path / "broken.zip", dest)
    assert not dest.exists() and not list(tmp_path.glob(".out.part_*"))
    # a failure while writing (an unreadable label) leaves no partial destination either
    bad = tmp_path / "c" / "src"
    (bad / "Task05_Prostate" / "imagesTr").mkdir(parents=True)
    (bad / "Task05_Prostate" / "labelsTr").mkdir()
    (bad / "Task05_Prostate" / "dataset.json").write_text("{}")
    shutil.copy(volumes[0][0], bad / "Task05_Prostate" / "imagesTr" / "p.nii.gz")
    (bad / "Task05_Prostate" / "labelsTr" / "p.nii.gz").write_bytes(b"not a NIfTI")
    with pytest.raises(PreparationError, match="p.nii.gz: not a readable NIfTI label"):
        prepare_msd_prostate(bad, dest)
    assert not dest.exists() and not list(tmp_path.glob(".out.part_*"))
    # an existing destination is kept unless --overwrite
    dest.mkdir()
    (dest / "keep.txt").write_text("user data")
    with pytest.raises(PreparationError, match="exists and is not empty"):
        prepare_multisite_prostate(multisite_zip(tmp_path / "d", volumes), dest)
    assert (dest / "keep.txt").read_text() == "user data"


def test_nci_isbi_sites_by_case_number_and_test_site_names(tmp_path, volumes):
    src = tmp_path / "nci"
    src.mkdir()
    for i, (image, label) in enumerate(volumes[:6]):
        shutil.copy(image, src / f"Case{i:02d}.nii.gz")
        nib.save(zoned(label), src / f"Case{i:02d}_Segmentation.nii.gz")
    out = tmp_path / "sites"
    assert prepare_nci_isbi(src, out, sites="A=0-3,B=4-5") == {"A": 4, "B": 2}
    labels_merged(out)
    with pytest.raises(PreparationError, match="no cases in the range of site"):
        prepare_nci_isbi(src, tmp_path / "x", sites="A=0-3,C=10-12")
    # --test_dirs: sites named by folder; a test site named like a training site is refused
    items = external_datalist([str(out)], prostate_datalist)
    assert {it["site"] for it in items} == {"A", "B"} and all(it["test_dir"] == str(out) for it in items)
    with pytest.raises(DataValidationError, match="test site 'A'.*has the name of a training site"):
        external_datalist(str(out), prostate_datalist, source_sites=["A"])


def test_fundus_5domain_archive(tmp_path):
    src = tmp_path / "fundus"
    generate_demo_fundus(src, seed=2, images_per_domain=(2, 2), size=48)
    shutil.copytree(src / "Domain4", src / "Domain5")
    archive = tmp_path / "fundus.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in src.rglob("*"):
            zf.write(path, path.relative_to(src.parent))
    counts = prepare_fundus_5domain(archive, tmp_path / "out")
    assert sorted(counts) == [f"Domain{k}" for k in range(1, 6)] and all(n == 4 for n in counts.values())
    shutil.rmtree(src / "Domain5")
    with pytest.raises(PreparationError, match="missing Domain5"):
        prepare_fundus_5domain(src, tmp_path / "out2")
