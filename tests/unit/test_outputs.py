"""Inference output folders (msf_monai.outputs): a run never deletes what it did not write."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_utils import nifti


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_overwrite_never_deletes_files_that_inference_did_not_write(tmp_path):
    from msf_monai.bundle import ConfigValueError
    from msf_monai.outputs import InferenceRunRecord

    images = tmp_path / "images"
    nifti(images / "Case00.nii.gz")
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
