"""The training record (msf_monai.training_record): the settings a checkpoint was trained with."""

from __future__ import annotations

import torch

from msf_monai.training_record import read_training_record


def test_record_of_runs_before_it_existed_comes_from_the_saved_state(tmp_path):
    from msf_monai.resume import RESUME_FORMAT

    ckpt = tmp_path / "phase1_model.pt"
    torch.save({"format": RESUME_FORMAT, "settings": {"source_site": "SiteA", "seed": 5, "val_fraction": 0.3}},
               tmp_path / "phase1_model_resume.pt")
    record = read_training_record(ckpt)
    assert record["settings"]["seed"] == 5 and record["file"].endswith("phase1_model_resume.pt")
