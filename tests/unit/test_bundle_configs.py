"""The bundles' configs: generated from bundles/_templates and current, valid metadata, and what their parsed parts do."""

import json
import shutil

import pytest
import torch

from bundle_utils import REPO, copy_bundle, load_script, task_transform


def _build_configs():
    return load_script("build_configs")


@pytest.mark.slow
def test_generated_configs_are_up_to_date(capsys):
    assert _build_configs().main(check=True) == 0, capsys.readouterr().out


def test_phase3_is_phase1_plus_the_method_overrides():
    build = _build_configs()
    for task in build.TASKS:
        p1, p3 = build.render(task, "phase1"), build.render(task, "phase3")
        assert p1["train"]["iteration"]["_target_"] == "msf_monai.engines.DualDecoderIteration"
        # phase3 builds the step and the style layers of the chosen method (default MixStyleFlow)
        assert p3["style_method"] == "mixstyleflow"
        assert p3["train"]["iteration"]["_target_"] == "$@dg_method.iteration"
        assert "@dg_method.image_decoder_styles(" in p3["network_def"]["image_decoder_styles"]
        assert "image_decoder_styles" not in p1["network_def"]
        # everything else about the data and validation is shared
        assert p1["train_dataset"] == p3["train_dataset"] and p1["validate"] == p3["validate"]
        # every id a phase refers to is defined in it
        for phase in build.PHASES:
            config = build.render(task, phase)
            assert build._references(config) <= set(config), (task, phase, build._references(config) - set(config))


def test_task_sections_name_phases_and_ids_copied_with_percent_are_written(tmp_path, monkeypatch):
    build = _build_configs()
    templates = tmp_path / "_templates"
    shutil.copytree(build.TEMPLATES, templates)
    monkeypatch.setattr(build, "TEMPLATES", templates)
    monkeypatch.setattr(build, "SHARED", templates / "shared.json")
    spec = json.loads((templates / "prostate.json").read_text())
    # an id that a phase reaches only through a % copy is written with the ids that use it
    spec["common"]["extra_step"] = {"_target_": "Identityd", "keys": "image"}
    spec["common"]["augmentation_extra"] = "%extra_step"
    (templates / "prostate.json").write_text(json.dumps(spec))
    assert build.render("prostate", "phase1")["extra_step"] == {"_target_": "Identityd", "keys": "image"}
    # a misspelt section would be left out of every config: an error naming the file
    spec["phase2, phase 3"] = {"epochs": 1}
    (templates / "prostate.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"prostate.json: section 'phase2, phase 3' names 'phase 3', which is no phase"):
        build.render("prostate", "phase1")


def _expressions(value, where=""):
    """(place, text) of every ``$`` expression in a config value."""
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in _expressions(v, f"{where}#{k}")]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _expressions(v, f"{where}#{i}")]
    return [(where, value)] if isinstance(value, str) and value.startswith("$") else []


def test_configs_read_like_model_zoo_configs():
    """Transforms and calls with many arguments are ``_target_`` components, not long ``$``
    expressions: no expression in a written config is over 100 characters."""
    for path in sorted((REPO / "bundles").glob("*/configs/*.json")):
        long = [(where, len(text)) for where, text in _expressions(json.loads(path.read_text())) if len(text) > 100]
        assert not long, (str(path), long)
    # the preprocessing is a list of transforms that each phase builds from the config
    config = json.loads((REPO / "bundles" / "prostate" / "configs" / "evaluate.json").read_text())
    targets = [t["_target_"] for t in config["preprocessing"]["transforms"]]
    assert targets[0] == "LoadImaged" and "Spacingd" in targets and targets[-1] == "EnsureTyped"


@pytest.mark.parametrize("task, steps", [("prostate", ["LoadImaged", "AsDiscreted", "EnsureTyped"]),
                                         ("fundus", ["LoadImaged", "FundusMaskToChannelsd", "EnsureTyped"])])
def test_label_loader_reuses_the_label_steps_of_the_preprocessing(task, steps):
    """``label_loader`` copies preprocessing steps by position (``%preprocessing#transforms#N``):
    a step inserted before them must not change what it copies."""
    loader = task_transform(task, name="label_loader")
    assert [type(t).__name__ for t in loader.transforms] == steps
    assert all(tuple(t.keys) == ("label",) for t in loader.transforms)


def test_metadata_is_valid_against_the_model_zoo_schema():
    import pytest
    from monai.bundle import verify_metadata

    from bundle_utils import SHARED_DATA

    schema = SHARED_DATA.parent / "schemas" / "meta_schema_20240725.json"
    if not schema.is_file():
        pytest.skip("needs ../shared/schemas")
    for meta in sorted((REPO / "bundles").glob("*/configs/metadata.json")):
        verify_metadata(meta_file=str(meta), filepath=str(schema))  # raises on an invalid file


def test_prostate_bias_field_augmentation_is_an_option_off_by_default():
    import torch
    from monai.bundle import ConfigParser

    def augment(**overrides):
        parser = ConfigParser()
        parser.read_config("bundles/prostate/configs/phase1.json")
        parser.update(overrides)
        torch.manual_seed(0)
        aug = parser.get_parsed_content("augmentation")
        for t in aug.transforms:  # the spatial transforms off: only the intensity change is left
            if hasattr(t, "prob") and type(t).__name__ != "RandBiasFieldd":
                t.prob = 0.0
        label = torch.zeros(1, 96, 96)
        label[:, 30:60, 30:60] = 1
        image = torch.rand(1, 96, 96) + 0.5
        out = aug({"image": image.clone(), "label": label.clone()})
        return image, label, out

    image, label, out = augment()
    assert torch.equal(out["image"], image)  # default 0: no bias field
    image, label, out = augment(bias_field_prob=1.0, bias_field_coeff=0.1)
    ratio = out["image"] / image
    assert torch.equal(out["label"], label) and float(ratio.std()) > 0.01  # a smooth multiplicative field
    assert float((ratio[:, :, 1:] - ratio[:, :, :-1]).abs().max()) < 0.1


@pytest.mark.slow
def test_every_module_the_configs_name_is_imported_with_the_package():
    """Configs import only ``msf_monai``; a ``msf_monai.<module>.`` they name must be an
    attribute of the package in a fresh interpreter (not only after a test imported it)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    named = set()
    for config in Path("bundles").glob("*/configs/*.json"):
        named |= set(re.findall(r"msf_monai\.([a-z_]+)\.", config.read_text()))
    code = "import sys, msf_monai; print(' '.join(m for m in sys.argv[1:] if not hasattr(msf_monai, m)))"
    missing = subprocess.run([sys.executable, "-c", code, *sorted(named)], capture_output=True, text=True, check=True).stdout.split()
    assert named and missing == []


def test_cup_inside_disc_after_post_processing(tmp_path):
    """Thresholded predictions of a (barely trained) model obey cup ⊆ disc after the bundle's
    post-processing, on images where the raw outputs violate it."""
    from monai.bundle import ConfigParser

    bundle = copy_bundle("fundus", tmp_path)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "evaluate.json"))
    parser["bundle_root"] = str(bundle)
    parser["eval_space"] = "resized"  # plain tensors on the model's grid (nothing to invert)
    post = parser.get_parsed_content("postprocessing")
    logits = torch.randn(2, 32, 32) * 3  # independent random disc and cup: many cup pixels outside the disc
    raw = torch.sigmoid(logits) > 0.5
    assert (raw[1] & ~raw[0]).any()
    out = post({"pred": logits, "label": torch.zeros(2, 32, 32)})["pred"]
    disc, cup = out[0] > 0, out[1] > 0
    assert not (cup & ~disc).any()
    assert torch.equal(disc, raw[0])
