"""Settings are checked before any work (issue 16, item 5 and the bad-value list): an unknown
setting or a bad value stops ``python -m monai.bundle run`` with a message naming it, exit 1,
no traceback, nothing generated."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bundle_utils import REPO, copy_bundle, run_bundle
from msf_monai.bundle import ConfigValueError, check_overrides, check_settings, unknown_overrides

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


def test_all_bad_values_are_reported_together():
    with pytest.raises(ConfigValueError) as err:
        check_settings(image_size=96, epochs=0, lr=-1.0, statistic="var", style_guard_range=0, resume="maybe")
    text = str(err.value)
    for part in ("--epochs 0", "--lr -1.0", "--statistic 'var'", "--style_guard_range 0", "--resume 'maybe'"):
        assert part in text
    assert check_settings(image_size=96, epochs=1, lr=1e-4, statistic="variance", style_guard_range=None, resume="false")
    with pytest.raises(ConfigValueError):
        check_settings(epochs=True)  # a boolean is not a number of epochs
    with pytest.raises(TypeError):
        check_settings(epoch=3)  # a rule must exist for every checked id


@pytest.mark.slow
def test_unknown_setting_stops_the_run_with_the_nearest_ids(tmp_path):
    bundle = copy_bundle("prostate", tmp_path)
    proc = run_bundle(tmp_path, "phase1", "--epoch", "1", "--image_size", "32", timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "--epoch (did you mean --epochs?)" in proc.stdout and "Traceback" not in proc.stdout
    assert not (bundle / "demo_data").exists()


def test_override_keys_against_config_ids():
    ids = {"epochs", "lr", "network_def", "network_def#_target_", "network_def#in_channels", "train", "train#handlers",
           "train#handlers#0"}
    found = unknown_overrides(["epochs", "epoch", "network_def#dropout", "train#handlers#0", "train#handler", "config_file"], ids)
    assert set(found) == {"epoch", "train#handler"}  # a component's new keyword and run's own arguments are fine
    assert found["epoch"] == ["epochs"] and found["train#handler"][0] == "train#handlers"
    # only `python -m monai.bundle run` command lines are checked
    cfg = str(REPO / "bundles" / "prostate" / "configs" / "phase1.json")
    main = os.path.join("x", "monai", "bundle", "__main__.py")
    assert check_overrides(["pytest", "--config_file", cfg, "--epoch", "1"])
    with pytest.raises(ConfigValueError):
        check_overrides([main, "run", "--config_file", cfg, "--epoch=1"])
    assert check_overrides([main, "run", "--config_file", cfg, "--epochs", "1", "--meta_file", "m.json"])


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


def test_one_set_of_settings_for_several_configs():
    """scripts/demo.sh passes its extra settings to each config that has them."""
    from msf_monai.bundle import arguments_for

    configs = REPO / "bundles" / "prostate" / "configs"
    every = [configs / f"{p}.json" for p in ("phase1", "phase2", "phase3", "evaluate")]
    args = ["--epochs", "2", "--val_interval", "1", "--image_size", "32", "--style_layers", "[2, 3]"]
    assert arguments_for(configs / "phase1.json", args, every) == ["--epochs", "2", "--val_interval", "1", "--image_size", "32"]
    assert arguments_for(configs / "phase2.json", args, every) == ["--epochs", "2", "--image_size", "32", "--style_layers", "[2, 3]"]
    assert arguments_for(configs / "evaluate.json", args, every) == ["--image_size", "32"]
    with pytest.raises(ConfigValueError, match=r"--epoch \(did you mean --epochs\?\)"):
        arguments_for(configs / "evaluate.json", ["--epoch", "2"], every)
