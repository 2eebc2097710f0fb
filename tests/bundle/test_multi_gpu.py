"""Multi-process data-parallel training through the bundle: ``torchrun`` runs of Phase I and III with ``multi_gpu_train.json`` on CPU.

:mod:`multi_gpu_probe` records what each rank was given: the ranks train on disjoint shares of the
training slices and validate disjoint shares of the validation cases, the *parameters* (not only
the buffers) moved by real optimizer steps, and the replicas end identical (gloo backend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bundle_utils import REPO, copy_bundle
from msf_monai.tasks.prostate import generate_demo_prostate

pytestmark = pytest.mark.slow


LR = 1e-3


def _torchrun(tmp_path, phase: str):
    """Two CPU processes run ``<phase>.json + multi_gpu_train.json`` for one epoch, with
    :class:`multi_gpu_probe.RankProbe` on the trainer and the evaluator."""
    data = tmp_path / "data"
    generate_demo_prostate(data, cases_per_site={"SiteA": 10, "SiteB": 1}, sites=["SiteA", "SiteB"], shape=(48, 48, 4))
    bundle = copy_bundle("prostate", tmp_path)
    if phase == "phase3":  # MixStyleFlow needs Phase II's flows: a bank fitted briefly on random statistics
        from msf_monai.flows import StyleFlowBank
        from msf_monai.networks import image_decoder_channels

        rng = np.random.default_rng(0)
        bank = StyleFlowBank({k: image_decoder_channels()[k] for k in (2, 3, 4)})
        bank.fit({k: {"mean": rng.normal(size=(40, c)), "var": rng.uniform(0.5, 2.0, size=(40, c))}
                  for k, c in bank.layer_channels.items()}, epochs=1, lr=1e-3, log_every=0)
        (bundle / "models").mkdir()
        bank.save(bundle / "models" / "style_flows.pt")
    probe_dir, states = tmp_path / "probe", tmp_path / "rank_states"
    probe = {
        "probe_dir": str(probe_dir),
        "+train#extra_handlers": [{"_target_": "multi_gpu_probe.RankProbe", "network": "@network", "save_dir": "@probe_dir", "tag": "train"}],
        "+validate#handlers": [{"_target_": "multi_gpu_probe.RankProbe", "network": "@network", "save_dir": "@probe_dir", "tag": "validate"}],
    }
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    configs = f"['bundles/prostate/configs/{phase}.json','bundles/prostate/configs/multi_gpu_train.json','probe.json']"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "--config_file", configs,
           "--dataset_dir", str(data), "--source_site", "SiteA", "--image_size", "32", "--batch_size", "4",
           "--epochs", "1", "--val_interval", "1", "--lr", str(LR), "--rank_state_dir", str(states)]
    path = os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=path)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc.stdout, bundle, probe_dir, states


def _check_data_parallel_run(out, probe_dir, states):
    assert "rank 1 of 2, backend gloo" in out and "rank 0 of 2, backend gloo" in out
    assert "2 replicas in sync" in out

    # each rank trained on its own share of the slices (DistributedSampler): no slice on both
    # ranks, except the at most one that the sampler repeats to make the shares even
    train = [[tuple(x) for x in json.loads((probe_dir / f"train_rank{r}.json").read_text())] for r in (0, 1)]
    assert train[0] and train[1] and len(train[0]) == len(train[1])
    assert len(set(train[0])) == len(train[0]) and len(set(train[1])) == len(train[1])
    assert len(set(train[0]) & set(train[1])) <= 1, sorted(set(train[0]) & set(train[1]))
    # ... and validated its own share of the validation cases (no padding: none twice)
    val = [[c for c, _ in json.loads((probe_dir / f"validate_rank{r}.json").read_text())] for r in (0, 1)]
    assert val[0] and val[1] and not set(val[0]) & set(val[1]), val
    assert not {c for c, _ in train[0] + train[1]} & set(val[0] + val[1]), "a validation case was trained on"

    # both ranks ended with the same weights (parameters and batch-norm statistics) ...
    s0 = torch.load(states / "rank0.pt", weights_only=True)
    s1 = torch.load(states / "rank1.pt", weights_only=True)
    assert s0.keys() == s1.keys()
    for key in s0:
        torch.testing.assert_close(s0[key], s1[key], rtol=0, atol=0, msg=key)
    # ... started from the same weights, and the *parameters* moved by optimizer steps: AdamW
    # moves an entry with a gradient by about lr per step, its weight decay alone by lr * 0.01 * |w|
    # (num_batches_tracked changes without any step, so buffers prove nothing)
    init = [torch.load(probe_dir / f"train_initial_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert init[0].keys() == init[1].keys() and set(init[0]) < set(s0)
    for key in init[0]:
        torch.testing.assert_close(init[0][key], init[1][key], rtol=0, atol=0, msg=key)
    delta = torch.cat([(s0[k] - v).abs().flatten() for k, v in init[0].items()])
    decay_only = torch.cat([(LR * 0.01 * v.abs()).flatten() for v in init[0].values()])
    assert float((delta > 0.3 * LR).float().mean()) > 0.5, float((delta > 0.3 * LR).float().mean())
    assert float((delta > 2 * decay_only + 1e-7).float().mean()) > 0.5


@pytest.mark.slow
def test_torchrun_phase1_two_cpu_processes_train_disjoint_shares_in_sync(tmp_path):
    out, bundle, probe_dir, states = _torchrun(tmp_path, "phase1")
    _check_data_parallel_run(out, probe_dir, states)
    assert "val_mean_dice" in out
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


@pytest.mark.slow
def test_torchrun_phase3_mixstyleflow_two_cpu_processes_stay_in_sync(tmp_path):
    """Phase III's two backward passes per step (clean, then stylized) are averaged once, after
    both; the stylized pass runs on every rank's own share."""
    out, bundle, probe_dir, states = _torchrun(tmp_path, "phase3")
    _check_data_parallel_run(out, probe_dir, states)
    assert (bundle / "models" / "model.pt").is_file()
    assert out.count("saved final checkpoint") == 1
