"""No silent wrong results from the inputs (issue 16): two inference images that would write the
same mask are refused up front; an inference run never mixes its outputs with an earlier run's;
a 4-D (multi-channel) image follows one rule in training, evaluation and inference.

Inference runs use a random-weight ``model.pt`` and volumes of 32 x 32 x 4 voxels: the tests
are about which files are read and written, not about the masks' quality."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from bundle_utils import check, copy_bundle, run_bundle
from msf_monai.data import DataValidationError
from msf_monai.tasks.prostate import check_volumes, image_files, prostate_datalist
from msf_monai.tasks.fundus import fundus_image_files
from msf_monai.networks import SegmentationOnlyNet
from msf_monai.tasks.prostate import prostate_preprocessing

SIZE = ("--image_size", "32")


def _nifti(path: Path, shape=(32, 32, 4), seed: int = 0, label: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if label:
        data = np.zeros(shape, np.uint8)
        data[8:20, 10:24, 1:3] = 1
    else:
        data = rng.normal(100, 20, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.6, 0.6, 3.0, 1.0])), str(path))
    return path


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


# ---------------------------------------------------------------------------------------------
# item 7: inference names and output folders
# ---------------------------------------------------------------------------------------------
def test_two_images_that_would_write_one_mask_are_refused_naming_both(tmp_path):
    images = tmp_path / "images"
    nii, niigz = _nifti(images / "Case00.nii"), _nifti(images / "Case00.nii.gz", seed=1)
    _nifti(images / "Case01.nii.gz", seed=2)
    with pytest.raises(DataValidationError) as err:
        image_files(images)
    assert len(err.value.problems) == 1
    assert str(nii) in err.value.problems[0] and str(niigz) in err.value.problems[0]
    # names that differ only in letter case are one file on macOS and Windows
    (images / "Case00.nii").unlink()
    _nifti(images / "case00.nii")
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


@pytest.mark.slow
def test_inference_refuses_ambiguous_names_before_any_work(tmp_path):
    bundle = _trained_bundle(tmp_path)
    images = tmp_path / "images"
    _nifti(images / "Case00.nii")
    _nifti(images / "Case00.nii.gz", seed=1)
    proc = run_bundle(tmp_path, "inference", "--input_dir", str(images), *SIZE)
    _assert_clean_failure(proc, images / "Case00.nii", images / "Case00.nii.gz")
    assert not (bundle / "inference").exists()  # nothing was written


@pytest.mark.slow
def test_an_inference_run_never_mixes_its_outputs_with_an_earlier_runs(tmp_path):
    bundle = _trained_bundle(tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    for name in ("Case00", "Case01"):
        _nifti(first / f"{name}.nii.gz")
    _nifti(second / "Case07.nii.gz", seed=3)
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


def test_overwrite_never_deletes_files_that_inference_did_not_write(tmp_path):
    from msf_monai.bundle import ConfigValueError
    from msf_monai.outputs import InferenceRunRecord

    images = tmp_path / "images"
    _nifti(images / "Case00.nii.gz")
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for overwrite in (False, True, "true"):
        with pytest.raises(ConfigValueError, match="notes.txt"):
            InferenceRunRecord(mine, input_dir=images, overwrite=overwrite).check()
    assert _listing(mine) == ["notes.txt"]
    # the input folder itself is never an output folder
    with pytest.raises(ConfigValueError, match="input"):
        InferenceRunRecord(images, input_dir=images, overwrite=True).check()
    # an empty or missing folder is fine; hidden files (.DS_Store) do not count
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"")
    InferenceRunRecord(tmp_path / "empty", input_dir=images).check()
    InferenceRunRecord(tmp_path / "new", input_dir=images).check()
    with pytest.raises(ConfigValueError, match="overwrite"):
        InferenceRunRecord(tmp_path / "new", input_dir=images, overwrite="maybe")


# ---------------------------------------------------------------------------------------------
# item 8: 4-D images
# ---------------------------------------------------------------------------------------------
def _data_with_a_4d_image(data):
    """Two 3-D cases and ``multi.nii.gz``, a 2-channel 4-D image (plain images/ + labels/ layout)."""
    for i in range(2):
        _nifti(data / "images" / f"case{i}.nii.gz", seed=i)
        _nifti(data / "labels" / f"case{i}.nii.gz", label=True)
    four_d = _nifti(data / "images" / "multi.nii.gz", shape=(32, 32, 4, 2))
    _nifti(data / "labels" / "multi.nii.gz", label=True)
    return four_d


def test_4d_image_outside_the_decathlon_layout_is_a_data_problem_in_training(tmp_path):
    data = tmp_path / "data"
    four_d = _data_with_a_4d_image(data)
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
        prostate_preprocessing(32)(dict(item))
    assert isinstance(err.value.__cause__, ValueError) and str(four_d) in str(err.value.__cause__)


@pytest.mark.slow
def test_4d_image_gets_the_same_answer_from_training_and_inference(tmp_path):
    bundle = _trained_bundle(tmp_path)
    data = tmp_path / "data"
    four_d = _data_with_a_4d_image(data)
    proc = run_bundle(tmp_path, "phase1", "--dataset_dir", str(data), *SIZE, "--epochs", "1")
    _assert_clean_failure(proc, four_d, "(32, 32, 4, 2)")
    proc = run_bundle(tmp_path, "inference", "--input_dir", str(data / "images"), *SIZE)
    _assert_clean_failure(proc, four_d, "(32, 32, 4, 2)")
    assert not (bundle / "inference").exists()
    # the Decathlon layout names the channel (dataset.json: T2), for training and inference alike
    task = tmp_path / "Task05_Prostate"
    for i in range(2):
        _nifti(task / "imagesTr" / f"prostate_{i:02d}.nii.gz", shape=(32, 32, 4, 2), seed=i)
        _nifti(task / "labelsTr" / f"prostate_{i:02d}.nii.gz", label=True)
    _nifti(task / "imagesTs" / "prostate_07.nii.gz", shape=(32, 32, 4, 2), seed=7)
    (task / "dataset.json").write_text(json.dumps({"modality": {"0": "ADC", "1": "T2"}}))
    assert {it["channel"] for it in prostate_datalist(task)} == {1}
    (tested,) = image_files(task / "imagesTs")
    assert tested["channel"] == 1
    check_volumes([tested], label_values=None)
    check(run_bundle(tmp_path, "inference", "--input_dir", str(task / "imagesTs"), *SIZE))
    mask = nib.load(bundle / "inference" / "prostate_07_seg.nii.gz")
    assert mask.shape == (32, 32, 4)
