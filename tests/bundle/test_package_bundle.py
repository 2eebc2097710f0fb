"""scripts/package_bundle.py: a model-zoo archive of a (tiny) trained prostate bundle, unpacked
elsewhere, runs inference with masks on the original grid and a style-shift score per case,
and evaluates the recorded split."""

from __future__ import annotations

import csv
import json
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_utils import check, copy_bundle, load_script, task_transform
from msf_monai.tasks.prostate import generate_demo_prostate, image_files
from msf_monai.data import split_by_patient
from msf_monai.flows import StyleFlowBank
from msf_monai.networks import DualDecoderNet, SegmentationOnlyNet, reference_unet
from msf_monai.style_shift import calibrate_style_shift, image_slices
from msf_monai.training_record import write_training_record

pytestmark = pytest.mark.slow


SIZE = 32


def _package_module():
    return load_script("package_bundle")


def _tiny_trained_models(models, source_items):
    """Random-weight networks and flows fitted (briefly) on the Phase I network's statistics of
    the source images, plus the calibration: what Phases I-III leave in models/."""
    torch.manual_seed(0)
    models.mkdir(parents=True)
    phase1 = DualDecoderNet().eval()
    torch.save(phase1.state_dict(), models / "phase1_model.pt")
    torch.save(SegmentationOnlyNet().state_dict(), models / "model.pt")
    pre = task_transform("prostate", image_size=SIZE)
    images = torch.cat([image_slices(pre(dict(it))["image"]) for it in source_items])
    with torch.no_grad():
        _, feats = phase1.reconstruct(phase1.encode(images.float()), return_features=True)
    stats = {k: {"mean": feats[k].mean(dim=(2, 3)), "var": feats[k].var(dim=(2, 3), unbiased=False)} for k in (2, 3, 4)}
    bank = StyleFlowBank({2: 32, 3: 16, 4: 16})
    bank.fit(stats, epochs=2, lr=1e-3, batch_size=8)
    bank.save(models / "style_flows.pt", image_size=SIZE)
    return phase1, pre


@pytest.mark.slow
def test_packaged_archive_runs_inference_anywhere(tmp_path):
    data = tmp_path / "data"
    generate_demo_prostate(data, cases_per_site={"SiteA": 3, "SiteB": 2}, sites=["SiteA", "SiteB"], shape=(40, 40, 4))
    bundle = copy_bundle("prostate", tmp_path / "repo")
    source = [d for d in image_files(data / "SiteA")]
    phase1, pre = _tiny_trained_models(bundle / "models", source)
    calibration = calibrate_style_shift(phase1, bundle / "models" / "style_flows.pt", bundle / "models" / "phase1_model.pt",
                                        source, pre, bundle / "models" / "style_shift.json", image_size=SIZE, quantile=0.5)
    assert calibration["n_cases"] == 3 and np.isfinite(calibration["threshold"])

    # the split the model was trained with (training writes this record; here it is written by hand)
    write_training_record(bundle / "models" / "model.pt", {"source_site": "SiteA", "seed": 1, "val_fraction": 0.34})

    archive = _package_module().package(bundle_root=str(bundle), output_dir=str(tmp_path / "dist"))
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
    for name in ("configs/metadata.json", "configs/inference.json", "configs/multi_gpu_train.json", "docs/README.md",
                 "LICENSE", "models/model.pt", "models/phase1_model.pt", "models/style_flows.pt", "models/style_shift.json",
                 "models/model_training.json"):
        assert f"prostate/{name}" in names, name
    # the training size (recorded by Phase II) replaces the demo/real default
    with zipfile.ZipFile(archive) as zf:
        assert json.loads(zf.read("prostate/configs/inference.json"))["image_size"] == SIZE
        # every member readable by all, as the bundle's own files (rewritten configs and models too)
        modes = {i.filename: (i.external_attr >> 16) & 0o777 for i in zf.infolist()}
    assert modes["prostate/configs/inference.json"] == 0o644 and modes["prostate/models/style_flows.pt"] & 0o044 == 0o044

    elsewhere = tmp_path / "hospital"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(elsewhere)
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(elsewhere / "prostate" / "configs" / "inference.json"),
         "--input_dir", str(data / "SiteB")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )
    out = check(proc)
    assert "case 2/2" in out  # progress per case
    results = elsewhere / "prostate" / "inference"
    for item in image_files(data / "SiteB"):
        image = nib.load(item["image"])
        mask = nib.load(results / f"{item['case']}_seg.nii.gz")
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-4)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    with open(results / "style_shift.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["case"] for r in rows) == sorted(it["case"] for it in image_files(data / "SiteB"))
    for r in rows:
        assert np.isfinite(float(r["score"])) and int(r["n_images"]) == 4
        assert int(r["flag"]) == int(float(r["score"]) > float(r["threshold"]))
    # the archive's evaluate.json evaluates the source site's validation patients of the recorded
    # split only, with no --source_site given (the real-data default has none)
    out = check(subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(elsewhere / "prostate" / "configs" / "evaluate.json"),
         "--dataset_dir", str(data)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    ))
    _, val = split_by_patient(image_files(data / "SiteA"), val_fraction=0.34, seed=1)
    with open(elsewhere / "prostate" / "eval" / "model_per_case.csv") as f:
        evaluated = list(csv.DictReader(f))
    assert sorted(r["case"] for r in evaluated if r["site"] == "SiteA") == sorted(d["case"] for d in val)
    assert len(val) == 1 and "source validation, n=1 of 3" in out
    # nothing was generated: no demo data in the unpacked bundle nor beside it
    assert not (elsewhere / "prostate" / "demo_data").exists()


@pytest.mark.slow
def test_package_accepts_a_unet_model_and_names_a_wrong_one(tmp_path):
    """``models/model.pt`` may be a MONAI ``UNet`` (``unet``, ``unet_mixstyleflow``): the
    archive's inference builds it from its keys; a file of neither network is refused by name."""
    module = _package_module()
    torch.save(reference_unet().state_dict(), tmp_path / "unet.pt")
    module._check_model(tmp_path / "unet.pt", 1, 1)
    torch.save(SegmentationOnlyNet().state_dict(), tmp_path / "dual.pt")
    module._check_model(tmp_path / "dual.pt", 1, 1)
    torch.save(reference_unet(3, 2).state_dict(), tmp_path / "fundus_unet.pt")
    with pytest.raises(module.PackagingError, match=r"fundus_unet\.pt.*unet, 1 -> 1 channels"):
        module._check_model(tmp_path / "fundus_unet.pt", 1, 1)
