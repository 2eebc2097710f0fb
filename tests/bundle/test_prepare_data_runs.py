"""scripts/prepare_data.py's command line, and the paper's protocol end to end on prepared MSD-like and six-site-like data."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from bundle_utils import REPO, check, copy_bundle, run_bundle
from data_utils import labels_merged, msd_archive, multisite_zip, synthetic_volumes
from msf_monai.data.prepare import MULTISITE_PROSTATE_SITES, prepare_msd_prostate, prepare_multisite_prostate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """12 small synthetic cases (image and zone label files) to arrange into each layout."""
    return synthetic_volumes(tmp_path_factory.mktemp("synthetic"))


@pytest.mark.slow
def test_msd_and_six_site_archives_train_and_test_as_in_the_paper(tmp_path, volumes):
    msd, six = tmp_path / "msd", tmp_path / "six_sites"
    assert prepare_msd_prostate(msd_archive(tmp_path, volumes), msd) == {"Decathlon": 8}
    labels = sorted((msd / "labelsTr").iterdir())
    assert len(labels) == 8 and all(set(np.unique(np.asarray(nib.load(str(p)).dataobj))) <= {0, 1} for p in labels)
    assert not list((msd / "imagesTr").glob("._*"))
    counts = prepare_multisite_prostate(multisite_zip(tmp_path, volumes), six)
    assert counts == {site: 2 for site in MULTISITE_PROSTATE_SITES}
    labels_merged(six)
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
