"""Data checks before any work (msf_monai.data.validation, the tasks' lists and checks): every problem named with its file."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from bundle_utils import task_transform
from data_utils import data_with_a_4d_image, nifti, tiny_dataset, volume, write_case
from msf_monai.data import DataValidationError
from msf_monai.tasks.fundus import check_fundus_images, fundus_image_files
from msf_monai.tasks.prostate import check_volumes, image_files, prostate_datalist


# ---------------------------------------------------------------------------------------------
# lists: file pairs and names
# ---------------------------------------------------------------------------------------------
def test_broken_symbolic_links_are_named_as_such(tmp_path):
    from msf_monai.tasks.fundus import fundus_datalist
    from msf_monai.tasks.prostate import prostate_datalist
    from msf_monai.data.validation import DataValidationError

    data = tiny_dataset(tmp_path / "data", n=3)
    (data / "images" / "case1.nii.gz").unlink()
    (data / "images" / "case1.nii.gz").symlink_to(tmp_path / "gone.nii.gz")  # dangling
    (data / "labels" / "case2.nii.gz").unlink()
    (data / "labels" / "case2.nii.gz").symlink_to("case2.nii.gz")  # loops on itself
    with pytest.raises(DataValidationError) as err:
        prostate_datalist(str(data))
    text = "\n".join(err.value.problems)
    assert f"broken symbolic link: {data / 'images' / 'case1.nii.gz'} -> {tmp_path / 'gone.nii.gz'}" in text
    assert f"broken symbolic link: {data / 'labels' / 'case2.nii.gz'} -> case2.nii.gz" in text
    assert "without image" not in text and "without label" not in text  # the partners are not blamed

    fundus = tmp_path / "fundus"
    for folder in ("images", "masks"):
        (fundus / folder).mkdir(parents=True)
    (fundus / "images" / "a.png").symlink_to(tmp_path / "gone.png")
    (fundus / "masks" / "a.png").write_bytes(b"")
    with pytest.raises(DataValidationError) as err:
        fundus_datalist(str(fundus), layout="folder")
    assert f"broken symbolic link: {fundus / 'images' / 'a.png'}" in "\n".join(err.value.problems)


def test_two_images_that_would_write_one_mask_are_refused_naming_both(tmp_path):
    images = tmp_path / "images"
    nii, niigz = nifti(images / "Case00.nii"), nifti(images / "Case00.nii.gz", seed=1)
    nifti(images / "Case01.nii.gz", seed=2)
    with pytest.raises(DataValidationError) as err:
        image_files(images)
    assert len(err.value.problems) == 1
    assert str(nii) in err.value.problems[0] and str(niigz) in err.value.problems[0]
    # names that differ only in letter case are one file on macOS and Windows
    (images / "Case00.nii").unlink()
    nifti(images / "case00.nii")
    with pytest.raises(DataValidationError, match="case00.nii"):
        image_files(images)
    # fundus: x.png and x.jpg would both write x_mask.png
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("x.png", "x.jpg", "y.png"):
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(photos / name)
    with pytest.raises(DataValidationError) as err:
        fundus_image_files(photos)
    assert len(err.value.problems) == 1
    assert str(photos / "x.png") in err.value.problems[0] and str(photos / "x.jpg") in err.value.problems[0]
    (photos / "x.jpg").unlink()
    assert [it["case"] for it in fundus_image_files(photos)] == ["x", "y"]


# ---------------------------------------------------------------------------------------------
# prostate volumes
# ---------------------------------------------------------------------------------------------
def _one_case(tmp_path, image, label, **kw):
    write_case(tmp_path, "bad", image, label, **kw)
    return [{"image": str(tmp_path / "images" / "bad.nii.gz"), "label": str(tmp_path / "labels" / "bad.nii.gz"), "site": "x", "case": "bad"}]


def _problem(items, **kw) -> str:
    with pytest.raises(DataValidationError) as err:
        check_volumes(items, **kw)
    assert len(err.value.problems) == 1, err.value.problems
    return err.value.problems[0]


def test_shape_mismatch_names_the_label(tmp_path):
    rng = np.random.default_rng(0)
    items = _one_case(tmp_path, volume(rng)[0], volume(rng, shape=(32, 30, 6))[1])
    assert _problem(items).startswith(items[0]["label"]) and "shape" in _problem(items)


def test_affine_mismatch_names_the_label(tmp_path):
    moved = np.eye(4)
    moved[0, 3] = 5.0
    items = _one_case(tmp_path, *volume(np.random.default_rng(0)), label_affine=moved)
    assert _problem(items).startswith(items[0]["label"]) and "affine" in _problem(items)


def test_truncated_nifti_names_the_file(tmp_path):
    items = _one_case(tmp_path, *volume(np.random.default_rng(0)))
    path = Path(items[0]["image"])
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    text = _problem(items)
    assert text.startswith(str(path)) and "cannot read" in text


def test_non_finite_voxels_name_the_image(tmp_path):
    image, label = volume(np.random.default_rng(0))
    image[3, 4, 2] = np.inf
    items = _one_case(tmp_path, image, label)
    assert _problem(items).startswith(items[0]["image"]) and "1 non-finite" in _problem(items)


def test_blank_image_is_named_before_preprocessing_divides_by_zero(tmp_path):
    image, label = volume(np.random.default_rng(0))
    items = _one_case(tmp_path, np.zeros_like(image), label)
    problem = _problem(items)
    assert problem.startswith(items[0]["image"]) and "every voxel has the value 0" in problem


def test_label_values_outside_the_set_name_the_label(tmp_path):
    image, label = volume(np.random.default_rng(0))
    label[label > 0] = 255
    items = _one_case(tmp_path, image, label)
    assert _problem(items).startswith(items[0]["label"]) and "255" in _problem(items)
    assert check_volumes(items, label_values=[0, 255]).no_foreground == []


def test_too_small_image_names_the_file(tmp_path):
    items = _one_case(tmp_path, *volume(np.random.default_rng(0), shape=(12, 32, 4)))
    assert _problem(items).startswith(items[0]["image"]) and "minimum 16 x 16" in _problem(items)


def test_volume_without_foreground_is_skipped_for_training_kept_for_evaluation(tmp_path, caplog):
    rng = np.random.default_rng(0)
    data = tiny_dataset(tmp_path, n=2)
    write_case(data, "empty", *volume(rng, foreground=False))
    items = prostate_datalist(data)
    with caplog.at_level(logging.WARNING, logger="msf_monai.data"):
        report = check_volumes(items)
    empty = str(data / "images" / "empty.nii.gz")
    assert report.no_foreground == [empty] and empty in caplog.text
    assert [it["case"] for it in report.for_training(items)] == ["case0", "case1"]
    assert len(report.items) == 3  # evaluation keeps it


def test_4d_image_outside_the_decathlon_layout_is_a_data_problem_in_training(tmp_path):
    data = tmp_path / "data"
    four_d = data_with_a_4d_image(data)
    nan = np.asarray(nib.load(data / "images" / "case1.nii.gz").dataobj).copy()
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, np.diag([0.6, 0.6, 3.0, 1.0])), str(data / "images" / "case1.nii.gz"))
    items = prostate_datalist(data)
    with pytest.raises(DataValidationError) as err:
        check_volumes(items)
    # listed with the other problems, naming the file and its shape
    assert len(err.value.problems) == 2, err.value.problems
    (problem,) = [p for p in err.value.problems if p.startswith(str(four_d))]
    assert "(32, 32, 4, 2)" in problem and "channel" in problem
    # the loader follows the same rule: no silent channel 0 for a list that names no channel
    (item,) = [it for it in items if it["image"] == str(four_d)]
    with pytest.raises(RuntimeError) as err:  # MONAI's Compose wraps the transform's error
        task_transform("prostate", image_size=32)(dict(item))
    assert isinstance(err.value.__cause__, ValueError) and str(four_d) in str(err.value.__cause__)


# ---------------------------------------------------------------------------------------------
# fundus images
# ---------------------------------------------------------------------------------------------
def test_fundus_truncated_png_and_mask_problems_name_the_files(tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for name, mask_size, mask_values in (("ok", 40, (255, 128, 0)), ("small", 24, (255, 128, 0)), ("pal", 40, (0, 1, 7))):
        image_path, mask_path = tmp_path / f"{name}.png", tmp_path / f"{name}_mask.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(image_path)
        mask = np.full((mask_size, mask_size), mask_values[0], np.uint8)
        mask[8:20, 8:20] = mask_values[1]
        mask[12:16, 12:16] = mask_values[2]
        Image.fromarray(mask).save(mask_path)
        items.append({"image": str(image_path), "label": str(mask_path), "label_format": "palette" if name == "pal" else "grey"})
    truncated = tmp_path / "ok.png"
    truncated.write_bytes(truncated.read_bytes()[:-200])
    with pytest.raises(DataValidationError) as err:
        check_fundus_images(items)
    problems = err.value.problems
    assert len(problems) == 3
    assert problems[0].startswith(str(truncated)) and "cannot read" in problems[0]
    assert problems[1].startswith(str(tmp_path / "small_mask.png")) and "differs" in problems[1]
    assert problems[2].startswith(str(tmp_path / "pal_mask.png")) and "7" in problems[2]
