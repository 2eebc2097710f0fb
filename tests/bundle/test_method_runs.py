"""Style methods through the bundle's own workflows: a clear error for an unknown one, baselines and the newer arms trained."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bundle_utils import SHARED_DATA, check, copy_bundle, run_bundle
from msf_monai.flows import StyleFlowBank
from msf_monai.networks import SegmentationOnlyNet, checkpoint_architecture
from msf_monai.saved_state import load_resume_state

pytestmark = pytest.mark.slow


@pytest.mark.slow
def test_unknown_style_method_is_a_clear_error(tmp_path):
    copy_bundle("prostate", tmp_path)
    proc = run_bundle(tmp_path, "phase3", "--style_method", "mixstyel", "--image_size", "32")
    assert proc.returncode != 0
    assert "unknown style_method 'mixstyel'" in proc.stdout and "mixstyleflow" in proc.stdout
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "bundles" / "prostate" / "demo_data").exists(), "work started before the check"


@pytest.mark.slow
def test_a_baseline_trains_end_to_end_through_the_bundle(tmp_path):
    """``--style_method dsu`` needs no Phase I/II outputs and writes its own checkpoint."""
    target = copy_bundle("prostate", tmp_path)
    out = check(run_bundle(tmp_path, "phase3", "--style_method", "dsu", "--image_size", "32", "--epochs", "1", "--batch_size", "8"))
    assert "Epoch[1] Complete" in out
    assert (target / "logs" / "phase3_dsu").is_dir() and not (target / "logs" / "phase3").exists()
    ckpt = target / "models" / "model_dsu.pt"
    assert ckpt.is_file() and not (target / "models" / "model.pt").exists()
    SegmentationOnlyNet().load_state_dict(torch.load(ckpt, weights_only=True), strict=True)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "prostate_nci_isbi").is_dir(), reason="needs ../shared/data")
def test_new_arms_run_through_the_bundle(tmp_path):
    """Encoder-level MixStyleFlow (Phase II on encoder statistics, then Phase III), residual
    stylization with the old Phase II regime, the reference UNet, and the UNet trained on the
    frozen Phase I network's MixStyleFlow styles, trained and evaluated by the bundle's own
    configs on real volumes."""
    data = tmp_path / "data"
    for site, names in {"A": ["Case00", "Case01", "Case02", "Case03"], "B": ["Case29"]}.items():
        (data / site).mkdir(parents=True)
        for name in names:
            for suffix in ("", "_Segmentation"):
                shutil.copy(SHARED_DATA / "prostate_nci_isbi" / f"{name}{suffix}.nii.gz", data / site)
    bundle = copy_bundle("prostate", tmp_path)
    common = ("--dataset_dir", str(data), "--source_site", "A", "--image_size", "32")
    train = (*common, "--batch_size", "8", "--epochs", "1", "--val_interval", "1")
    models = bundle / "models"
    check(run_bundle(tmp_path, "phase1", *train))
    check(run_bundle(tmp_path, "phase2", *common, "--epochs", "1", "--style_source", "encoder"))
    encoder_bank = StyleFlowBank.load(models / "style_flows_encoder.pt")
    assert encoder_bank.layer_channels == {1: 32, 2: 64, 3: 128} and encoder_bank.metadata["style_source"] == "encoder"
    assert encoder_bank.metadata["stats_regime"] == "train"
    check(run_bundle(tmp_path, "phase3", *train, "--style_method", "mixstyleflow_encoder"))
    shift = json.loads((bundle / "logs" / "phase3_mixstyleflow_encoder" / "perturbation.json").read_text())["mean"]
    assert any(k.startswith("enc") for k in shift)
    check(run_bundle(tmp_path, "phase2", *common, "--epochs", "1", "--stats_regime", "eval"))
    assert StyleFlowBank.load(models / "style_flows.pt").metadata["stats_regime"] == "eval"
    out = check(run_bundle(tmp_path, "phase3", *train, "--stylize_mode", "residual", "--stylized_bn", "train",
                           "--style_temperatures", "[1, 1, 1]", "--style_guard_range", "None"))
    assert "perturbation" in out
    residual = json.loads((bundle / "logs" / "phase3" / "perturbation.json").read_text())["mean"]
    assert residual["blur"] == pytest.approx(0.0, abs=1e-5)
    check(run_bundle(tmp_path, "phase3", *train, "--style_method", "unet"))
    assert checkpoint_architecture(str(models / "model_unet.pt")) == "unet"
    check(run_bundle(tmp_path, "evaluate", *common, "--checkpoint", str(models / "model_unet.pt")))
    summary = json.loads((bundle / "eval" / "model_unet_summary.json").read_text())
    assert summary["sites"]["B"]["n"] == 1
    out = check(run_bundle(tmp_path, "phase3", *train, "--style_method", "unet_mixstyleflow", "--stylize_mode", "residual"))
    assert "epoch 1 perturbation: blur 0.000" in out
    assert checkpoint_architecture(str(models / "model_unet_mixstyleflow.pt")) == "unet"
    shift = json.loads((bundle / "logs" / "phase3_unet_mixstyleflow" / "perturbation.json").read_text())["mean"]
    assert {"dec2_mean", "dec4_std"} <= set(shift) and shift["blur"] == pytest.approx(0.0, abs=1e-5)
    # the stylizer's style pools are in the training state, so a resumed run draws the same styles
    pools = load_resume_state(models / "model_unet_mixstyleflow_resume.pt")["style_samplers"]
    assert pools and all(name.startswith("stylizer.image_decoder_styles.") for name in pools)
    check(run_bundle(tmp_path, "evaluate", *common, "--checkpoint", str(models / "model_unet_mixstyleflow.pt")))
    assert json.loads((bundle / "eval" / "model_unet_mixstyleflow_summary.json").read_text())["sites"]["B"]["n"] == 1
    proc = run_bundle(tmp_path, "phase3", *train, "--style_method", "unet_mixstyleflow", "--init_from_phase1", "true")
    assert proc.returncode != 0 and "init_from_phase1 needs the dual-decoder network" in proc.stdout
