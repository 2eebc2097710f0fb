"""The training geometry through the bundle: recorded by Phase I, followed by evaluation and inference."""

from __future__ import annotations

import json

import nibabel as nib
import pytest

from bundle_utils import check, copy_bundle, run_bundle
from msf_monai.tasks.prostate import generate_demo_prostate

pytestmark = pytest.mark.slow


@pytest.mark.slow
def test_spacing_workflow_is_given_once_and_a_different_geometry_is_refused(tmp_path):
    """Phase I trained with --resample spacing records it; evaluation follows it without being
    told, writes its protocol, and refuses --resample resize with the flags to use."""
    data = tmp_path / "data"
    generate_demo_prostate(data, seed=1, cases_per_site=5, shape=(40, 40, 8))
    bundle = copy_bundle("prostate", tmp_path)
    common = ("--dataset_dir", str(data), "--source_site", "SiteA", "--image_size", "32")
    check(run_bundle(tmp_path, "phase1", *common, "--batch_size", "8", "--epochs", "1", "--val_interval", "1",
                     "--resample", "spacing", "--field_of_view", "120"))
    record = json.loads((bundle / "models" / "phase1_model_training.json").read_text())
    assert record["settings"]["geometry"] == {"resample": "spacing", "pixel_spacing": 0.625, "field_of_view": 120.0}
    evaluate = (*common, "--checkpoint", "models/phase1_model.pt", "--style_shift", "false")
    out = check(run_bundle(tmp_path, "evaluate", *evaluate, "--dice", "slice"))
    assert "resampled to 0.625 mm and a 120 mm field of view" in out
    summary = json.loads((bundle / "eval" / "phase1_model_summary.json").read_text())
    assert summary["protocol"] == {"eval_space": "original", "checkpoint": "phase1_model.pt", "checkpoint_policy": "best",
                                   "selected_on": "source validation", "dice": "slice", "eval_slices": "all"}
    refused = run_bundle(tmp_path, "evaluate", *evaluate, "--resample", "resize")
    assert refused.returncode != 0
    assert "--resample 'resize' (trained with 'spacing')" in refused.stdout
    assert "--resample spacing --pixel_spacing 0.625 --field_of_view 120.0" in refused.stdout
    # inference follows the training geometry too, and writes masks on each scan's own grid
    out = check(run_bundle(tmp_path, "inference", "--input_dir", str(data / "SiteB"), "--image_size", "32",
                           "--checkpoint", "models/phase1_model.pt", "--style_shift", "false"))
    assert "resampled to 0.625 mm and a 120 mm field of view" in out
    for image in sorted((data / "SiteB").glob("Case??.nii.gz")):
        mask = nib.load(bundle / "inference" / image.name.replace(".nii.gz", "_seg.nii.gz"))
        assert mask.shape == nib.load(image).shape
