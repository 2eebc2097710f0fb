"""In-plane geometry (the prostate preprocessing, msf_monai.bundle's trained geometry) and Dice on each scan's own grid.

``--resample spacing`` keeps the organs' physical size whatever the scanner's field of view,
predictions go back on the scan's own grid, Dice is computed in the original geometry, and the
geometry a model was trained with is carried to the later phases', evaluation's and inference's configs."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from bundle_utils import REPO, SHARED_DATA, inverted_label_dice, task_transform
from msf_monai.bundle import ConfigValueError, check_geometry, trained_geometry
from msf_monai.handlers import case_dice
from msf_monai.training_record import write_training_record
from msf_monai.tasks.prostate import canvas_size, geometry_settings, spacing_canvas


RADIUS_MM = 15.0


def _disc_volume(folder, name, spacing, size, slices=4):
    """A bright disc of radius 15 mm in the middle of a ``size`` x ``size`` grid at ``spacing`` mm,
    as image and label NIfTI files; returns the item."""
    folder.mkdir(parents=True, exist_ok=True)
    centre = (size - 1) / 2
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - centre) ** 2 + (xx - centre) ** 2) * spacing**2 <= RADIUS_MM**2
    label = np.repeat(disc[..., None], slices, axis=-1).astype(np.uint8)
    image = (100.0 + 400.0 * label + np.random.default_rng(0).normal(0, 5, label.shape)).astype(np.float32)
    affine = np.diag([spacing, spacing, 3.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), folder / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / f"{name}_Segmentation.nii.gz")
    return {"image": str(folder / f"{name}.nii.gz"), "label": str(folder / f"{name}_Segmentation.nii.gz")}


@pytest.mark.slow
def test_spacing_keeps_the_physical_size_resize_does_not(tmp_path):
    # the same anatomy from a 120 mm (0.5 mm) and a 160 mm (0.8 mm) field of view
    fine = _disc_volume(tmp_path, "fine", 0.5, 240)
    coarse = _disc_volume(tmp_path, "coarse", 0.8, 200)

    def area(item, **kw):
        return float(task_transform("prostate", image_size=64, **kw)(dict(item))["label"][..., 0].sum())

    expected = np.pi * RADIUS_MM**2 / (140 / 64) ** 2  # the disc in pixels of 140/64 mm
    for item in (fine, coarse):
        assert area(item, resample="spacing") == pytest.approx(expected, rel=0.05)
    # resizing each field of view to 64 pixels: the disc's size follows the field of view
    assert area(fine, resample="resize") / area(coarse, resample="resize") == pytest.approx((160 / 120) ** 2, rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("image_size", [64, 224])
def test_spacing_predictions_go_back_to_the_original_grid(tmp_path, image_size):
    """A prediction equal to the preprocessed label, inverted, is the original label on the
    original grid (with and without the final resize: 224 is the 140 mm canvas itself)."""
    item = _disc_volume(tmp_path, "case", 0.8, 200)
    pre = task_transform("prostate", image_size=image_size, resample="spacing")
    assert tuple(pre(dict(item))["image"].shape) == (1, image_size, image_size, 4)
    assert inverted_label_dice(pre, item) > (0.9 if image_size == 64 else 0.98)


def test_geometry_settings_and_their_errors(tmp_path):
    assert spacing_canvas(0.625, 140) == 224 and spacing_canvas(0.625, 240) == 384
    assert geometry_settings("resize") is None
    assert geometry_settings("spacing", 0.5, 200) == {"resample": "spacing", "pixel_spacing": 0.5, "field_of_view": 200.0}
    with pytest.raises(ValueError, match="resample 'voxel'"):
        geometry_settings("voxel")
    with pytest.raises(ValueError, match="only 5 pixels"):
        geometry_settings("spacing", 2.0, 10)
    with pytest.raises(RuntimeError) as err:  # the config parser wraps the ValueError
        task_transform("prostate", image_size=32, resample="spacing", pixel_spacing=0)
    assert isinstance(err.value.__cause__, ValueError) and "must be positive" in str(err.value.__cause__)
    # resize has no canvas: its unused pixel_spacing and field_of_view are not checked
    assert canvas_size(None, 96) == 96 and canvas_size(geometry_settings("spacing", 0.625, 140), 96) == 224
    pre = task_transform("prostate", image_size=32, resample="resize", pixel_spacing=1, field_of_view=5)
    assert tuple(pre(dict(_disc_volume(tmp_path, "case", 0.8, 200)))["image"].shape) == (1, 32, 32, 4)
    # a checkpoint's geometry comes from its training record; without one it is 'resize'
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"")
    assert trained_geometry(checkpoint)["resample"] == "resize"
    assert trained_geometry(checkpoint, image_size=96)["image_size"] == 96
    assert check_geometry(checkpoint, None)
    write_training_record(checkpoint, {"image_size": 32, "geometry": geometry_settings("spacing", 0.625, 140)})
    assert trained_geometry(checkpoint, image_size=96) == {"resample": "spacing", "pixel_spacing": 0.625,
                                                          "field_of_view": 140.0, "image_size": 32}
    assert check_geometry(checkpoint, geometry_settings("spacing", 0.625, 140))
    with pytest.raises(ConfigValueError, match=r"--resample 'resize' \(trained with 'spacing'\).*--resample spacing --pixel_spacing 0.625 --field_of_view 140"):
        check_geometry(checkpoint, None, "this evaluation")
    with pytest.raises(ConfigValueError, match=r"--field_of_view 200.0 \(trained with 140.0\)"):
        check_geometry(checkpoint, geometry_settings("spacing", 0.625, 200))
    # a relative --checkpoint is found in the bundle folder; a missing one gives the defaults
    # without an error, so the settings check runs before the missing file is reported
    assert trained_geometry("model.pt", image_size=96, bundle_root=tmp_path)["image_size"] == 32
    assert trained_geometry(tmp_path / "absent.pt", image_size=96) == {"resample": "resize", "pixel_spacing": 0.625,
                                                                     "field_of_view": 140.0, "image_size": 96}


@pytest.mark.parametrize("config", ["phase2", "phase3", "evaluate", "inference"])
def test_later_phases_take_the_trained_size_and_geometry(tmp_path, config):
    """Real data (not the demo folder): Phase I defaults to resample spacing at 224 px; the
    later phases, evaluation and inference take image size and geometry from the training
    record of the checkpoint they read, and the real-data defaults when it has none."""
    models = tmp_path / "models"
    models.mkdir()
    checkpoint = models / ("phase1_model.pt" if config in ("phase2", "phase3") else "model.pt")
    checkpoint.write_bytes(b"")

    def parsed(name):
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / "prostate" / "configs" / f"{name}.json"))
        parser.update({"bundle_root": str(REPO / "bundles" / "prostate"), "dataset_dir": str(tmp_path),
                       "input_dir": str(tmp_path), "ckpt_dir": str(models), "checkpoint_file": str(checkpoint)})
        return {key: parser.get_parsed_content(key) for key in ("image_size", "resample", "field_of_view")}

    assert parsed("phase1") == {"image_size": 224, "resample": "spacing", "field_of_view": 140}
    assert parsed(config)["image_size"] == 224  # no record: the real-data default
    write_training_record(checkpoint, {"image_size": 64, "geometry": geometry_settings("spacing", 0.625, 160)})
    assert parsed(config) == {"image_size": 64, "resample": "spacing", "field_of_view": 160.0}
    write_training_record(checkpoint, {"image_size": 96, "geometry": None})  # trained with resize
    assert parsed(config) == {"image_size": 96, "resample": "resize", "field_of_view": 140.0}


def _evaluate_postprocessing(tmp_path, eval_space):
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "prostate" / "configs" / "evaluate.json"))
    parser.update({"bundle_root": str(REPO / "bundles" / "prostate"), "dataset_dir": str(tmp_path), "image_size": 32,
                   "eval_space": eval_space, "resample": "resize", "pixel_spacing": 0.625, "field_of_view": 140})
    return parser.get_parsed_content("preprocessing"), parser.get_parsed_content("postprocessing")


@pytest.mark.parametrize("eval_space", ["original", "resized"])
def test_original_geometry_dice_is_computed_on_the_scans_grid(tmp_path, eval_space):
    """evaluate.json's post-processing on a 50 x 40 x 4 case (not the 32 x 32 grid): a prediction
    of 'prostate everywhere' scores 2|L| / (N + |L|) with N the voxels of the grid Dice is
    computed on, so the value says which grid that was."""
    item = _disc_volume(tmp_path / "data", "case", 0.8, 50)
    original = np.asarray(nib.load(item["label"]).dataobj) > 0
    pre, post = _evaluate_postprocessing(tmp_path, eval_space)
    data = pre(dict(item))
    data["pred"] = torch.full_like(data["label"], 10.0)  # logits: sigmoid 1 everywhere
    out = post(data)
    dice = case_dice(out["pred"], out["label"]).item()
    if eval_space == "original":
        assert tuple(out["label"].shape) == (1, *original.shape)
        assert torch.equal(out["label"][0].bool(), torch.as_tensor(original))
        assert dice == pytest.approx(2 * original.sum() / (original.size + original.sum()), rel=1e-4)
    else:
        resized = data["label"].numpy() > 0
        assert tuple(out["label"].shape) == (1, 32, 32, 4)
        assert dice == pytest.approx(2 * resized.sum() / (resized.size + resized.sum()), rel=1e-4)


@pytest.mark.skipif(not (SHARED_DATA / "prostate_nci_isbi").is_dir(), reason="needs ../shared/data")
def test_inverted_preprocessing_puts_masks_back_on_the_original_grid():
    """Inference's geometry on a real, non-RAS volume: a 'prediction' equal to the preprocessed
    label, inverted with the preprocessing, matches the original label."""
    src = SHARED_DATA / "prostate_nci_isbi"
    item = {"image": str(src / "Case30.nii.gz"), "label": str(src / "Case30_Segmentation.nii.gz")}
    assert inverted_label_dice(task_transform("prostate", image_size=128), item) > 0.9
