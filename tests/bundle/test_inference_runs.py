"""Inference runs: ambiguous input names refused up front, outputs never mixed with an earlier run's, 4-D images.

A 4-D (multi-channel) image follows one rule in training and inference. Inference runs use a
random-weight ``model.pt`` and volumes of 32 x 32 x 4 voxels: the tests are about which files
are read and written, not about the masks' quality."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pytest
import torch

from bundle_utils import check, copy_bundle, run_bundle
from data_utils import data_with_a_4d_image, nifti
from msf_monai.networks import SegmentationOnlyNet, reference_unet
from msf_monai.tasks.prostate import check_volumes, image_files, prostate_datalist

pytestmark = pytest.mark.slow


SIZE = ("--image_size", "32")


def _trained_bundle(tmp_path: Path) -> Path:
    """A copy of the prostate bundle with a (random-weight) Phase III model: what inference needs."""
    bundle = copy_bundle("prostate", tmp_path)
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    torch.save(SegmentationOnlyNet().state_dict(), bundle / "models" / "model.pt")
    return bundle


def _assert_clean_failure(proc, *texts):
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-3000:])
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    for text in texts:
        assert str(text) in proc.stdout, (text, proc.stdout[-3000:])


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.slow
def test_inference_refuses_ambiguous_names_before_any_work(tmp_path):
    bundle = _trained_bundle(tmp_path)
    images = tmp_path / "images"
    nifti(images / "Case00.nii")
    nifti(images / "Case00.nii.gz", seed=1)
    proc = run_bundle(tmp_path, "inference", "--input_dir", str(images), *SIZE)
    _assert_clean_failure(proc, images / "Case00.nii", images / "Case00.nii.gz")
    assert not (bundle / "inference").exists()  # nothing was written


@pytest.mark.slow
def test_an_inference_run_never_mixes_its_outputs_with_an_earlier_runs(tmp_path):
    bundle = _trained_bundle(tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    for name in ("Case00", "Case01"):
        nifti(first / f"{name}.nii.gz")
    nifti(second / "Case07.nii.gz", seed=3)
    out = bundle / "inference"
    check(run_bundle(tmp_path, "inference", "--input_dir", str(first), *SIZE))
    masks = ["Case00_seg.nii.gz", "Case01_seg.nii.gz"]
    assert [n for n in _listing(out) if n.endswith("_seg.nii.gz")] == masks
    # a second run into the same folder is refused, and the first run's outputs stay as they were
    proc = run_bundle(tmp_path, "inference", "--input_dir", str(second), *SIZE)
    _assert_clean_failure(proc, out, "--overwrite true")
    assert _listing(out) == masks + ["inference_run.json"]
    # the record says which run wrote them, and that it finished
    record = json.loads((out / "inference_run.json").read_text())
    assert record["input_dir"] == str(first) and record["finished"] and record["cases"] == 2
    # with --overwrite true the earlier run's outputs are replaced as a whole
    check(run_bundle(tmp_path, "inference", "--input_dir", str(second), *SIZE, "--overwrite", "true"))
    assert _listing(out) == ["Case07_seg.nii.gz", "inference_run.json"]
    assert json.loads((out / "inference_run.json").read_text())["input_dir"] == str(second)


@pytest.mark.slow
def test_4d_image_gets_the_same_answer_from_training_and_inference(tmp_path):
    bundle = _trained_bundle(tmp_path)
    data = tmp_path / "data"
    four_d = data_with_a_4d_image(data)
    proc = run_bundle(tmp_path, "phase1", "--dataset_dir", str(data), *SIZE, "--epochs", "1")
    _assert_clean_failure(proc, four_d, "(32, 32, 4, 2)")
    proc = run_bundle(tmp_path, "inference", "--input_dir", str(data / "images"), *SIZE)
    _assert_clean_failure(proc, four_d, "(32, 32, 4, 2)")
    assert not (bundle / "inference").exists()
    # the Decathlon layout names the channel (dataset.json: T2), for training and inference alike
    task = tmp_path / "Task05_Prostate"
    for i in range(2):
        nifti(task / "imagesTr" / f"prostate_{i:02d}.nii.gz", shape=(32, 32, 4, 2), seed=i)
        nifti(task / "labelsTr" / f"prostate_{i:02d}.nii.gz", label=True)
    nifti(task / "imagesTs" / "prostate_07.nii.gz", shape=(32, 32, 4, 2), seed=7)
    (task / "dataset.json").write_text(json.dumps({"modality": {"0": "ADC", "1": "T2"}}))
    assert {it["channel"] for it in prostate_datalist(task)} == {1}
    (tested,) = image_files(task / "imagesTs")
    assert tested["channel"] == 1
    check_volumes([tested], label_values=None)
    check(run_bundle(tmp_path, "inference", "--input_dir", str(task / "imagesTs"), *SIZE))
    mask = nib.load(bundle / "inference" / "prostate_07_seg.nii.gz")
    assert mask.shape == (32, 32, 4)


def _unet_with_output_bias(bias: float) -> dict:
    """A MONAI ``UNet`` checkpoint (as ``unet``/``unet_mixstyleflow`` save it) whose output layer's
    bias dominates: every voxel foreground (+100) or background (-100), whatever the weights."""
    torch.manual_seed(0)
    net = reference_unet()
    last = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))][-1]
    with torch.no_grad():
        last.bias.fill_(bias)
    return net.state_dict()


@pytest.mark.slow
def test_inference_loads_a_unet_checkpoint_given_relative_to_the_bundle(tmp_path):
    bundle = copy_bundle("prostate", tmp_path)
    (bundle / "models").mkdir()
    images = tmp_path / "images"
    nifti(images / "Case03.nii.gz", seed=3)
    mask = bundle / "inference" / "Case03_seg.nii.gz"
    sums = {}
    for bias in (100.0, -100.0):
        torch.save(_unet_with_output_bias(bias), bundle / "models" / "unet_model.pt")
        check(run_bundle(tmp_path, "inference", "--input_dir", str(images), *SIZE, "--overwrite", "true",
                         "--checkpoint", "models/unet_model.pt"))
        assert nib.load(mask).shape == (32, 32, 4)
        sums[bias] = float(nib.load(mask).get_fdata().sum())
    # the UNet's own weights decide the masks: the output bias turns every voxel on, then off
    assert sums[100.0] > 0.5 * 32 * 32 * 4 and sums[-100.0] == 0
    record = json.loads((bundle / "inference" / "inference_run.json").read_text())
    assert record["checkpoint"] == str((bundle / "models" / "unet_model.pt").resolve())
