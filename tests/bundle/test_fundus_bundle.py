"""The fundus bundle's workflows end to end, as a user runs them from the repository root: on
the built-in demo domains and on real Drishti-GS images arranged as one domain of the 5-domain
layout next to a synthetic second domain."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from bundle_utils import SHARED_DATA, check, copy_bundle, run_bundle
from msf_monai.tasks.fundus import generate_demo_fundus
from msf_monai.flows import StyleFlowBank
from msf_monai.networks import DualDecoderNet, SegmentationOnlyNet

pytestmark = pytest.mark.slow


TINY = ("--image_size", "32", "--batch_size", "8", "--val_interval", "1")


def _run_all(cwd, *common):
    check(run_bundle(cwd, "phase1", *common, *TINY, "--epochs", "2", bundle="fundus"))
    check(run_bundle(cwd, "phase2", *common, "--image_size", "32", "--epochs", "2", bundle="fundus"))
    check(run_bundle(cwd, "phase3", *common, *TINY, "--epochs", "2", "--image_log_interval", "1", bundle="fundus"))
    check(run_bundle(cwd, "evaluate", *common, "--image_size", "32", bundle="fundus"))


def _assert_outputs(bundle, domains: set[str]):
    models = bundle / "models"
    DualDecoderNet(3, 2).load_state_dict(torch.load(models / "phase1_model.pt", weights_only=True), strict=True)
    net = SegmentationOnlyNet(3, 2)
    net.load_state_dict(torch.load(models / "model.pt", weights_only=True), strict=True)
    bank = StyleFlowBank.load(models / "style_flows.pt")
    for layer, channels in {2: 32, 3: 16, 4: 16}.items():
        mean, std = bank.sample(layer, 20)
        assert mean.shape == (20, channels) and torch.isfinite(mean).all() and torch.isfinite(std).all()
    assert list((bundle / "logs" / "phase3" / "stylized").glob("*.png"))
    with open(bundle / "eval" / "model_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["site"] for r in rows} == domains
    assert len({(r["site"], r["case"]) for r in rows}) == len(rows)
    for r in rows:
        assert 0.0 <= float(r["disc"]) <= 1.0 and 0.0 <= float(r["cup"]) <= 1.0
    summary = json.loads((bundle / "eval" / "model_summary.json").read_text())
    assert summary["channels"] == ["disc", "cup"]
    for domain, s in summary["sites"].items():
        for channel in ("disc", "cup"):
            values = [float(r[channel]) for r in rows if r["site"] == domain]
            assert s[channel]["mean"] == pytest.approx(np.mean(values))
    return net


@pytest.mark.slow
def test_demo_workflows_end_to_end(tmp_path):
    bundle = copy_bundle("fundus", tmp_path)
    _run_all(tmp_path)
    _assert_outputs(bundle, {"Domain1", "Domain2", "Domain3", "Domain4"})
    # inference: one PNG mask per image at the image's size, in the benchmark's grey coding
    images = bundle / "demo_data" / "Domain3" / "test" / "ROIs" / "image"
    check(run_bundle(tmp_path, "inference", "--input_dir", str(images), "--image_size", "32", bundle="fundus"))
    for image in sorted(images.glob("*.png"))[:3]:
        mask = np.array(Image.open(bundle / "inference" / f"{image.stem}_mask.png"))
        assert mask.shape == np.array(Image.open(image)).shape[:2]
        assert set(np.unique(mask)) <= {0, 128, 255}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundles"]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "fundus_drishti_gs").is_dir(), reason="needs ../shared/data")
def test_real_drishti_domain_next_to_a_synthetic_domain(tmp_path):
    data = tmp_path / "data"
    src = SHARED_DATA / "fundus_drishti_gs"
    image_dir = data / "Domain1" / "train" / "ROIs" / "image"
    mask_dir = data / "Domain1" / "train" / "ROIs" / "mask"
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    for path in sorted((src / "images").glob("*.png"))[:8]:
        shutil.copy(path, image_dir / path.name)
        # the benchmark's grey coding: 255 background, 128 rim, 0 cup
        palette = np.array(Image.open(src / "masks" / path.name))
        grey = np.select([palette == 2, palette == 1], [0, 128], 255).astype(np.uint8)
        Image.fromarray(grey).save(mask_dir / path.name)
    synthetic = tmp_path / "synthetic"
    generate_demo_fundus(synthetic, seed=1, images_per_domain=(3, 3), size=64, domains=["Domain3"])
    shutil.copytree(synthetic / "Domain3", data / "Domain2")
    bundle = copy_bundle("fundus", tmp_path)
    _run_all(tmp_path, "--dataset_dir", str(data), "--source_domain", "Domain1")
    _assert_outputs(bundle, {"Domain1", "Domain2"})
    rows = list(csv.DictReader(open(bundle / "eval" / "model_per_case.csv")))
    assert sum(r["site"] == "Domain2" for r in rows) == 6  # every image of the unseen domain
    assert sum(r["site"] == "Domain1" for r in rows) == 2  # the source's validation images only
