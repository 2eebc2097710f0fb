"""The prostate bundle's four workflows, end to end, as a user runs them from the repository
root: on the built-in demo data and on real NCI-ISBI volumes arranged in the 6-site layout."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_utils import SHARED_DATA, check, copy_bundle, run_bundle
from msf_monai.flows import StyleFlowBank
from msf_monai.networks import DualDecoderNet, SegmentationOnlyNet

pytestmark = pytest.mark.slow


TINY = ("--image_size", "32", "--batch_size", "8", "--val_interval", "1")


def _assert_outputs(bundle, n_eval_cases: int, sites: set[str], demo: bool = True):
    models = bundle / "models"
    for name in ("phase1_model.pt", "style_flows.pt", "style_stats.npz", "model.pt"):
        assert (models / name).is_file(), name
    # checkpoints are plain state dicts that reload into the networks
    DualDecoderNet().load_state_dict(torch.load(models / "phase1_model.pt", weights_only=True), strict=True)
    SegmentationOnlyNet().load_state_dict(torch.load(models / "model.pt", weights_only=True), strict=True)
    # flows: finite samples of the right shape for every style layer
    bank = StyleFlowBank.load(models / "style_flows.pt")
    assert bank.layers == [2, 3, 4]
    for layer, channels in {2: 32, 3: 16, 4: 16}.items():
        mean, std = bank.sample(layer, 50)
        assert mean.shape == std.shape == (50, channels)
        assert torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()
    stats = np.load(models / "style_stats.npz")
    assert stats["mean_2"].shape[1] == 32 and stats["var_4"].shape[1] == 16
    assert (bundle / "logs" / "phase2" / "style_samples.png").is_file()
    assert json.loads((bundle / "logs" / "phase2" / "flow_nll.json").read_text())["mean_2"]
    assert list((bundle / "logs" / "phase3" / "stylized").glob("stylized_epoch*.png"))
    # how strong the perturbation was, measured in Phase III
    perturbation = json.loads((bundle / "logs" / "phase3" / "perturbation.json").read_text())["mean"]
    assert perturbation["image_change"] > 0 and "dec2_mean" in perturbation
    # the stylized image: the decoding on the demo, the residual stylization on real data
    assert (perturbation["blur"] > 1e-3) == demo
    # evaluation: one row per patient, Dice in [0, 1], per-site means
    with open(bundle / "eval" / "model_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_eval_cases
    assert len({(r["site"], r["case"]) for r in rows}) == n_eval_cases
    assert all(0.0 <= float(r["prostate"]) <= 1.0 for r in rows)
    # style-shift: threshold calibrated on the source validation cases (Phase II), a score per
    # evaluated case (evaluation), flagged exactly when above the threshold
    calibration = json.loads((models / "style_shift.json").read_text())
    assert calibration["n_cases"] >= 1 and np.isfinite(calibration["threshold"])
    with open(bundle / "eval" / "style_shift.csv") as f:
        shift = list(csv.DictReader(f))
    assert len(shift) == n_eval_cases and {r["site"] for r in shift} == sites
    assert all(int(r["flag"]) == int(float(r["score"]) > float(r["threshold"])) for r in shift)
    # the readable forms: a percentile among the source validation cases, and a level that passes
    # log10(2) exactly at the threshold
    for r in shift:
        assert 0.0 <= float(r["percentile"]) <= 100.0 and float(r["shift_level"]) >= 0.0
        level = float(r["shift_level"])
        if abs(level - np.log10(2.0)) > 0.01:  # away from the threshold (the CSV rounds the level)
            assert int(r["flag"]) == int(level > np.log10(2.0))
    summary = json.loads((bundle / "eval" / "model_summary.json").read_text())
    assert set(summary["sites"]) == sites
    for site, s in summary["sites"].items():
        values = [float(r["prostate"]) for r in rows if r["site"] == site]
        assert s["n"] == len(values)
        assert s["prostate"]["mean"] == pytest.approx(np.mean(values))


@pytest.mark.slow
def test_phase3_before_phase2_fails_clearly(tmp_path):
    copy_bundle("prostate", tmp_path)
    proc = run_bundle(tmp_path, "phase3", *TINY, "--epochs", "1")
    assert proc.returncode != 0
    assert "style_flows.pt" in proc.stdout
    assert "python -m monai.bundle run --config_file bundles/prostate/configs/phase2.json" in proc.stdout
    assert "Traceback" not in proc.stdout
    # it failed before any work: no demo data generated, no training started
    assert not (tmp_path / "bundles" / "prostate" / "demo_data").exists()


@pytest.mark.slow
def test_demo_workflows_end_to_end(tmp_path):
    bundle = copy_bundle("prostate", tmp_path)
    out = check(run_bundle(tmp_path, "phase1", *TINY, "--epochs", "2"))
    assert "synthetic prostate demo" in out
    check(run_bundle(tmp_path, "phase2", "--image_size", "32", "--epochs", "3"))
    out = check(run_bundle(tmp_path, "phase3", *TINY, "--epochs", "2", "--image_log_interval", "1"))
    assert "train_loss" in out
    check(run_bundle(tmp_path, "evaluate", "--image_size", "32"))
    # the demo: 16 source cases (3 held out for validation/evaluation) + 3 unseen sites x 6
    _assert_outputs(bundle, n_eval_cases=3 + 18, sites={"SiteA", "SiteB", "SiteC", "SiteD"})
    # everything was written inside the bundle, nothing beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundles"]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "prostate_nci_isbi").is_dir(), reason="needs ../shared/data")
def test_real_volumes_in_multisite_layout(tmp_path):
    data = tmp_path / "data"
    cases = {"A": ["Case00", "Case01", "Case02", "Case03", "Case04"], "B": ["Case29", "Case30"]}
    for site, names in cases.items():
        (data / site).mkdir(parents=True)
        for name in names:
            src = SHARED_DATA / "prostate_nci_isbi"
            shutil.copy(src / f"{name}.nii.gz", data / site / f"{name}.nii.gz")
            # the 6-site set spells it `_segmentation`; NCI-ISBI `_Segmentation`: accept both
            label_name = f"{name}_segmentation.nii.gz" if site == "B" else f"{name}_Segmentation.nii.gz"
            shutil.copy(src / f"{name}_Segmentation.nii.gz", data / site / label_name)
    bundle = copy_bundle("prostate", tmp_path)
    common = ("--dataset_dir", str(data), "--source_site", "A", "--image_size", "32")
    check(run_bundle(tmp_path, "phase1", *common, "--batch_size", "8", "--epochs", "1", "--val_interval", "1"))
    check(run_bundle(tmp_path, "phase2", *common, "--epochs", "2"))
    check(run_bundle(tmp_path, "phase3", *common, "--batch_size", "8", "--epochs", "1", "--image_log_interval", "1"))
    check(run_bundle(tmp_path, "evaluate", *common))
    # source site: its validation patient(s) only (20 % of 5 -> 1); site B: every patient
    _assert_outputs(bundle, n_eval_cases=1 + 2, sites={"A", "B"}, demo=False)
    assert not (bundle / "demo_data").exists()
    # inference: a NIfTI mask per volume, on the original grid with the original affine
    check(run_bundle(tmp_path, "inference", "--input_dir", str(data / "B"), "--image_size", "32"))
    for name in cases["B"]:
        image = nib.load(data / "B" / f"{name}.nii.gz")
        mask = nib.load(bundle / "inference" / f"{name}_seg.nii.gz")
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-4)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
