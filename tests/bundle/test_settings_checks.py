"""Settings checked before any work in bundle runs and scripts: a message naming the setting, exit 1, no traceback, nothing made."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bundle_utils import REPO, assert_clean_failure, copy_bundle, run_bundle
from msf_monai.bundle import ConfigValueError, check_settings
from msf_monai.networks import DualDecoderNet

pytestmark = pytest.mark.slow


NO_CUDA = not torch.cuda.is_available()

BAD_VALUES = [
    ("phase1", ["--epochs", "-1"], "--epochs -1: must be a whole number >= 1"),
    ("phase1", ["--epochs", "0"], "--epochs 0: must be a whole number >= 1"),
    ("phase1", ["--batch_size", "0"], "--batch_size 0: must be a whole number >= 1"),
    ("phase1", ["--lr", "abc"], "--lr 'abc': must be a number > 0"),
    ("phase1", ["--seed", "abc"], "--seed 'abc': must be a whole number >= 0"),
    ("phase1", ["--val_fraction", "1.5"], "--val_fraction 1.5: must be a number > 0 and < 1"),
    ("phase2", ["--statistic", "foo"], "--statistic 'foo': must be one of 'std', 'variance'"),
    ("phase3", ["--style_p", "2"], "--style_p 2: must be a number >= 0 and <= 1"),
    ("phase3", ["--stylize_mode", "sharp"], "--stylize_mode 'sharp': must be one of 'decoded', 'residual'"),
    ("evaluate", ["--batch_size", "-3"], "--batch_size -3: must be a whole number >= 1"),
    ("inference", ["--image_size", "100"], "--image_size 100: must be a positive multiple of 16"),
    pytest.param("phase1", ["--device", "cuda:0"], "this machine has no CUDA device",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="the machine has CUDA")),
]


@pytest.mark.slow
@pytest.mark.parametrize("config,args,message", BAD_VALUES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_values_stop_before_any_work(tmp_path, config, args, message):
    bundle = copy_bundle("prostate", tmp_path)
    proc = run_bundle(tmp_path, config, *args, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "invalid settings, nothing was run" in proc.stdout and message in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
    assert not (bundle / "demo_data").exists() and not (bundle / "models").exists()


@pytest.mark.slow
def test_unknown_setting_stops_the_run_with_the_nearest_ids(tmp_path):
    bundle = copy_bundle("prostate", tmp_path)
    proc = run_bundle(tmp_path, "phase1", "--epoch", "1", "--image_size", "32", timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "--epoch (did you mean --epochs?)" in proc.stdout and "Traceback" not in proc.stdout
    assert not (bundle / "demo_data").exists()


@pytest.mark.slow
def test_scripts_refuse_unknown_settings(tmp_path):
    bundle = copy_bundle("prostate", tmp_path)
    for script in ("benchmark_dg.py", "style_gallery.py"):
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), str(bundle), "--epoch", "1"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert proc.returncode == 1 and "--epoch (did you mean --epochs?)" in proc.stdout, (script, proc.stdout[-2000:])
    # an arm's setting that its Phase III does not have would be dropped: refused too
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_dg.py"), str(bundle), "--methods",
                           "none,dsu(style_pp=1)"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 1 and "--style_pp (did you mean --style_p " in proc.stdout, proc.stdout[-2000:]
    assert not (bundle / "demo_data").exists()


@pytest.mark.slow
def test_bad_settings_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigValueError, match="divisible|multiple of 16"):
        check_settings(image_size=100)
    with pytest.raises(ConfigValueError, match="2 value.*has 3"):
        check_settings(image_size=32, style_layers=[2, 3, 4], temperatures=[3.5, 2.5])
    assert check_settings(image_size=96, style_layers=[2, 3, 4], temperatures=[3.5, 2.5, 1.5])
    bundle = copy_bundle("prostate", tmp_path)
    assert_clean_failure(run_bundle(tmp_path, "phase1", "--image_size", "100", "--epochs", "1"), "--image_size 100")
    assert not (bundle / "demo_data").exists()  # nothing was generated or trained
    (bundle / "models").mkdir()
    torch.save(DualDecoderNet().state_dict(), bundle / "models" / "phase1_model.pt")
    assert_clean_failure(run_bundle(tmp_path, "phase2", "--temperatures", "[3.5,2.5]"), "--temperatures", "one temperature per style layer")
