"""The bundle helpers (msf_monai.bundle): settings checked before any work, the evaluation split and checkpoint paths."""

from __future__ import annotations

import os

import pytest
import torch

from bundle_utils import REPO
from msf_monai.bundle import (
    ConfigValueError,
    check_overrides,
    check_settings,
    evaluation_split,
    select_sites,
    unknown_overrides,
)
from msf_monai.data import split_by_patient
from msf_monai.training_record import read_training_record, training_record_file, write_training_record


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# the evaluation split: never a training patient counted as a source result
# ---------------------------------------------------------------------------------------------
def _datalist(n_source=10, n_other=3):
    items = [{"image": f"A/Case{i:02d}.nii.gz", "label": "l", "site": "SiteA", "case": f"Case{i:02d}"} for i in range(n_source)]
    items += [{"image": f"B/Case{i:02d}.nii.gz", "label": "l", "site": "SiteB", "case": f"Case{i:02d}"}
              for i in range(n_source, n_source + n_other)]
    return items


def _cases(split, site):
    return sorted(d["case"] for d in split["cases"] if d["site"] == site)


def test_split_follows_the_training_record(tmp_path):
    data = _datalist()
    ckpt = tmp_path / "model.pt"
    torch.save({}, ckpt)
    write_training_record(ckpt, {"source_site": "SiteA", "seed": 3, "val_fraction": 0.4, "dataset_dir": "/d"})
    _, val = split_by_patient(select_sites(data, "SiteA"), val_fraction=0.4, seed=3)
    _, default_val = split_by_patient(select_sites(data, "SiteA"), val_fraction=0.2, seed=0)
    expected = sorted(d["case"] for d in val)
    assert expected != sorted(d["case"] for d in default_val)  # the test can tell the two splits apart

    split = evaluation_split(data, ckpt)  # nothing given: everything from the record
    assert _cases(split, "SiteA") == expected and len(_cases(split, "SiteB")) == 3
    info = {k: split["info"][k] for k in ("source_site", "seed", "val_fraction", "source_cases", "source_total")}
    assert info == {"source_site": "SiteA", "seed": 3, "val_fraction": 0.4, "source_cases": len(expected), "source_total": 10}
    # the same values given explicitly are fine; the final checkpoint shares the record
    assert _cases(evaluation_split(data, ckpt, source_site="SiteA", seed=3, val_fraction=0.4), "SiteA") == expected
    assert _cases(evaluation_split(data, tmp_path / "model_final.pt"), "SiteA") == expected
    # another split would count training patients: refused, naming the setting and the record
    for kwargs in ({"seed": 0}, {"val_fraction": 0.2}, {"source_site": "SiteB"}):
        with pytest.raises(ConfigValueError) as err:
            evaluation_split(data, ckpt, **kwargs)
        key = next(iter(kwargs))
        assert f"--{key}" in str(err.value) and str(training_record_file(ckpt)) in str(err.value)


def test_split_without_a_record(tmp_path):
    data = _datalist()
    bare = tmp_path / "weights.pt"
    assert read_training_record(bare) is None
    split = evaluation_split(data, bare, source_site="SiteA")
    _, val = split_by_patient(select_sites(data, "SiteA"), val_fraction=0.2, seed=0)
    assert _cases(split, "SiteA") == sorted(d["case"] for d in val)
    everything = evaluation_split(data, bare)
    assert len(everything["cases"]) == len(data) and everything["info"]["source_site"] is None


# ---------------------------------------------------------------------------------------------
# checkpoint paths
# ---------------------------------------------------------------------------------------------
def test_checkpoint_paths_and_hints(tmp_path, monkeypatch):
    from msf_monai.bundle import MissingPhaseOutputError, find_checkpoint

    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    torch.save({}, bundle / "models" / "phase1_model.pt")
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # relative to the bundle when it is not relative to the current directory
    assert find_checkpoint("models/phase1_model.pt", bundle) == str((bundle / "models" / "phase1_model.pt").resolve())
    torch.save({}, elsewhere / "mine.pt")
    assert find_checkpoint("mine.pt", bundle) == str((elsewhere / "mine.pt").resolve())
    # a missing file names the phase that writes it
    with pytest.raises(MissingPhaseOutputError, match="phase1.json"):
        find_checkpoint("models/phase1_model_final.pt", bundle)
    with pytest.raises(MissingPhaseOutputError, match="phase3.json"):
        find_checkpoint("models/model_dsu.pt", bundle)


def test_checkpoint_architecture_looks_where_find_checkpoint_looks(tmp_path, monkeypatch):
    from msf_monai.bundle import checkpoint_architecture
    from msf_monai.networks import SegmentationOnlyNet, reference_unet

    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    torch.save(reference_unet().state_dict(), bundle / "models" / "model.pt")
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert checkpoint_architecture("models/model.pt", bundle) == "unet"  # relative to the bundle
    assert checkpoint_architecture(str(bundle / "models" / "model.pt")) == "unet"
    # a file of that name in the current directory comes first, as for find_checkpoint
    (elsewhere / "models").mkdir()
    torch.save(SegmentationOnlyNet().state_dict(), elsewhere / "models" / "model.pt")
    assert checkpoint_architecture("models/model.pt", bundle) == "dual_decoder"
    # no file at all (export and verify_net_in_out without a trained model): the default network
    assert checkpoint_architecture("models/missing.pt", bundle) == "dual_decoder"
