"""scripts/prepare_data.py on small archives in each public layout (made here, no network), and
the paper's protocol end to end: train on an MSD-like source, evaluate on a six-site-like test
folder given with --test_dirs."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile

import nibabel as nib
import numpy as np
import pytest

from bundle_utils import REPO, check, copy_bundle, run_bundle
from msf_monai.data import DataValidationError, external_datalist
from msf_monai.tasks.fundus import generate_demo_fundus
from msf_monai.tasks.prostate import generate_demo_prostate, prostate_datalist
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
    root = tmp_path_factory.mktemp("synthetic")
    generate_demo_prostate(root, seed=4, cases_per_site=3, shape=(40, 40, 8))
    pairs = []
    for site in sorted(p for p in root.iterdir() if p.is_dir()):
        for image in sorted(site.glob("Case??.nii.gz")):
            pairs.append((image, site / image.name.replace(".nii.gz", "_segmentation.nii.gz")))
    return pairs


def _zoned(label_path):
    """The label with a second zone (value 2) in its upper half, as the public sets store it."""
    img = nib.load(str(label_path))
    data = np.asarray(img.dataobj).astype(np.uint8)
    data[: data.shape[0] // 2][data[: data.shape[0] // 2] > 0] = 2
    return nib.Nifti1Image(data, img.affine)


def _msd_archive(tmp_path, volumes, n=8, with_labels=True):
    task = tmp_path / "src" / "Task05_Prostate"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    for i, (image, label) in enumerate(volumes[:n]):
        img = nib.load(str(image))
        t2 = np.asarray(img.dataobj).astype(np.float32)
        four_d = np.stack([t2, t2[::-1]], axis=-1)  # T2 and a stand-in ADC channel
        nib.save(nib.Nifti1Image(four_d, img.affine), task / "imagesTr" / f"prostate_{i:02d}.nii.gz")
        if with_labels:
            nib.save(_zoned(label), task / "labelsTr" / f"prostate_{i:02d}.nii.gz")
    (task / "dataset.json").write_text(json.dumps({"name": "Prostate", "modality": {"0": "T2", "1": "ADC"}}))
    (task / "imagesTr" / "._prostate_00.nii.gz").write_bytes(b"macOS resource fork")
    archive = tmp_path / "Task05_Prostate.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(task, arcname="Task05_Prostate")
    return archive


def _multisite_zip(tmp_path, volumes, sites=MULTISITE_PROSTATE_SITES):
    base = tmp_path / "six" / "Processed_data_nii"
    for k, site in enumerate(sites):
        (base / site).mkdir(parents=True)
        for j, (image, label) in enumerate(volumes[2 * k % len(volumes): 2 * k % len(volumes) + 2]):
            shutil.copy(image, base / site / f"Case{j:02d}.nii.gz")
            spelled = "Segmentation" if site == "I2CVB" else "segmentation"  # both spellings exist
            nib.save(_zoned(label), base / site / f"Case{j:02d}_{spelled}.nii.gz")
    archive = tmp_path / "multisite.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in base.rglob("*"):
            zf.write(path, path.relative_to(base.parent))
    return archive


def _labels_merged(folder):
    for label in folder.rglob("*egmentation.nii.gz"):
        assert set(np.unique(np.asarray(nib.load(str(label)).dataobj))) <= {0, 1}, label


@pytest.mark.slow
def test_msd_and_six_site_archives_train_and_test_as_in_the_paper(tmp_path, volumes):
    msd, six = tmp_path / "msd", tmp_path / "six_sites"
    assert prepare_msd_prostate(_msd_archive(tmp_path, volumes), msd) == {"Decathlon": 8}
    labels = sorted((msd / "labelsTr").iterdir())
    assert len(labels) == 8 and all(set(np.unique(np.asarray(nib.load(str(p)).dataobj))) <= {0, 1} for p in labels)
    assert not list((msd / "imagesTr").glob("._*"))
    counts = prepare_multisite_prostate(_multisite_zip(tmp_path, volumes), six)
    assert counts == {site: 2 for site in MULTISITE_PROSTATE_SITES}
    _labels_merged(six)
    assert sorted(p.name for p in six.iterdir()) == sorted(MULTISITE_PROSTATE_SITES)

    bundle = copy_bundle("prostate", tmp_path)
    common = ("--dataset_dir", str(msd), "--image_size", "32")
    check(run_bundle(tmp_path, "phase1", *common, "--batch_size", "8", "--epochs", "1", "--val_interval", "1"))
    check(run_bundle(tmp_path, "evaluate", *common, "--checkpoint", "models/phase1_model.pt", "--style_shift", "false",
                     "--test_dirs", str(six)))
    with open(bundle / "eval" / "phase1_model_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    # the source's validation patients (20 % of 8 -> 2), then one row per test case, sites named by folder
    assert sum(r["site"] == "Decathlon" for r in rows) == 2
    test_rows = [r for r in rows if r["site"] != "Decathlon"]
    assert len(test_rows) == 12 and {r["site"] for r in test_rows} == set(MULTISITE_PROSTATE_SITES)
    summary = json.loads((bundle / "eval" / "phase1_model_summary.json").read_text())
    assert summary["split"]["test_dirs"] == [str(six)] and summary["protocol"]["eval_space"] == "original"


def test_incomplete_or_wrong_archives_are_refused_and_nothing_is_written(tmp_path, volumes):
    dest = tmp_path / "out"
    no_labels = _msd_archive(tmp_path / "a", volumes, n=2, with_labels=False)
    with pytest.raises(PreparationError, match="lacks the label of 2 image"):
        prepare_msd_prostate(no_labels, dest)
    five_sites = _multisite_zip(tmp_path / "b", volumes, sites=MULTISITE_PROSTATE_SITES[:5])
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
        prepare_multisite_prostate(_multisite_zip(tmp_path / "d", volumes), dest)
    assert (dest / "keep.txt").read_text() == "user data"


def test_nci_isbi_sites_by_case_number_and_test_site_names(tmp_path, volumes):
    src = tmp_path / "nci"
    src.mkdir()
    for i, (image, label) in enumerate(volumes[:6]):
        shutil.copy(image, src / f"Case{i:02d}.nii.gz")
        nib.save(_zoned(label), src / f"Case{i:02d}_Segmentation.nii.gz")
    out = tmp_path / "sites"
    assert prepare_nci_isbi(src, out, sites="A=0-3,B=4-5") == {"A": 4, "B": 2}
    _labels_merged(out)
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


@pytest.mark.slow
def test_prepare_data_command_line(tmp_path, volumes):
    """The fire command: a report of cases per site, and a clean one-line error (exit 1)."""
    src = tmp_path / "nci"
    src.mkdir()
    for i, (image, label) in enumerate(volumes[:3]):
        shutil.copy(image, src / f"Case{i:02d}.nii.gz")
        shutil.copy(label, src / f"Case{i:02d}_Segmentation.nii.gz")
    script = [sys.executable, str(REPO / "scripts" / "prepare_data.py")]
    ok = subprocess.run(script + ["nci_isbi", str(src), str(tmp_path / "out"), "--sites", "A=0-1,B=2-2"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "A: 2, B: 1 (3 cases)" in ok.stdout
    bad = subprocess.run(script + ["multisite_prostate", str(src), str(tmp_path / "out2")], capture_output=True, text=True)
    assert bad.returncode == 1 and "site folders (BIDMC" in bad.stderr and "Traceback" not in bad.stderr
