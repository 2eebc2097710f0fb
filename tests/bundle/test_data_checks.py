"""Bad data sets stop a bundle run before any work, with every problem named."""

from __future__ import annotations

import numpy as np
import pytest

from bundle_utils import TINY, assert_clean_failure, copy_bundle, run_bundle
from data_utils import tiny_dataset, volume, write_case
from msf_monai.data import DataValidationError
from msf_monai.tasks.prostate import prostate_datalist

pytestmark = pytest.mark.slow


@pytest.mark.slow
def test_missing_and_empty_dataset_dir_fail_cleanly(tmp_path):
    copy_bundle("prostate", tmp_path)
    missing = tmp_path / "nowhere"
    assert_clean_failure(run_bundle(tmp_path, "phase1", "--dataset_dir", str(missing), *TINY), missing, "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataValidationError, match="empty") as err:
        prostate_datalist(empty)
    assert str(empty) in str(err.value)


@pytest.mark.slow
def test_every_problem_of_a_data_set_is_reported_at_once_before_training(tmp_path):
    bundle = copy_bundle("prostate", tmp_path)
    data = tiny_dataset(tmp_path / "data", n=3)
    rng = np.random.default_rng(1)
    write_case(data, "nolabel", volume(rng)[0], None)
    write_case(data, "noimage", None, volume(rng)[1])
    image, label = volume(rng)
    image[0, 0, 0] = np.nan
    write_case(data, "nan", image, label)
    out = run_bundle(tmp_path, "phase1", "--dataset_dir", str(data), *TINY, "--epochs", "1")
    assert_clean_failure(out, data / "images" / "nolabel.nii.gz", data / "labels" / "noimage.nii.gz")
    # pairing problems come from the list builder, before the voxels are read; every one is named
    assert "image without label" in out.stdout and "label without image" in out.stdout
    assert not (bundle / "models").exists() or not list((bundle / "models").iterdir())
    # once the pairing is fixed, the voxel check names the NaN volume
    (data / "images" / "nolabel.nii.gz").unlink()
    (data / "labels" / "noimage.nii.gz").unlink()
    out = run_bundle(tmp_path, "phase1", "--dataset_dir", str(data), *TINY, "--epochs", "1")
    assert_clean_failure(out, data / "images" / "nan.nii.gz", "non-finite")
