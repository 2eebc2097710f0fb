"""multi_gpu_train.json: two CPU processes (torchrun, gloo) train one tiny Phase I epoch; the
replicas must end identical and exactly one set of checkpoints must be written (rank 0)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bundle_utils import copy_bundle
from msf_monai.data import generate_demo_prostate


def test_torchrun_two_cpu_processes_keep_identical_weights(tmp_path):
    data = tmp_path / "data"
    generate_demo_prostate(data, cases_per_site={"SiteA": 10, "SiteB": 1}, sites=["SiteA", "SiteB"], shape=(48, 48, 4))
    bundle = copy_bundle("prostate", tmp_path)
    states = tmp_path / "rank_states"
    configs = "['bundles/prostate/configs/phase1.json','bundles/prostate/configs/multi_gpu_train.json']"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "--config_file", configs,
           "--dataset_dir", str(data), "--source_site", "SiteA", "--image_size", "32", "--batch_size", "4",
           "--epochs", "1", "--val_interval", "1", "--rank_state_dir", str(states)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]
    out = proc.stdout
    assert "rank 1 of 2, backend gloo" in out and "rank 0 of 2, backend gloo" in out
    assert "2 replicas in sync" in out
    assert "val_mean_dice" in out
    # both ranks trained and ended with the same weights (parameters and BatchNorm statistics)
    s0 = torch.load(states / "rank0.pt", weights_only=True)
    s1 = torch.load(states / "rank1.pt", weights_only=True)
    assert s0.keys() == s1.keys()
    for key in s0:
        torch.testing.assert_close(s0[key], s1[key], rtol=0, atol=0, msg=key)
    # ... and not the initial weights: the step was taken
    from msf_monai.networks import DualDecoderNet

    torch.manual_seed(0)
    assert any(not torch.equal(s0[k], v) for k, v in DualDecoderNet().state_dict().items() if k in s0)
    # rank 0 alone wrote the checkpoints (the best on validation and the final one) and logged
    models = {p.name for p in (bundle / "models").iterdir()}
    assert {"phase1_model.pt", "phase1_model_final.pt"} <= models, models
    assert out.count("saved final checkpoint") == 1
    # a fresh run: rank 0 marks the state unfinished only after every rank saw there was none
    assert out.count("marked the training state") == 1 and "Resuming from" not in out
    assert not (bundle / "models" / "phase1_model.pt.lock").exists()  # rank 0's lock, released
    assert out.count("train_loss:") == 1 and out.count("Epoch[1] Metrics") == 1
    # both ranks validated (on their share of the split) and agree on the all-gathered metric
    assert out.count("SupervisedEvaluator - INFO - Engine run finished") == 2
