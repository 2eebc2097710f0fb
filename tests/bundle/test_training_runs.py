"""Phase I runs on a tiny data set: resume after a kill, Ctrl-C, and bit-identical losses with the same seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bundle_utils import TINY, check, copy_bundle, run_bundle
from data_utils import tiny_dataset
from msf_monai.networks import DualDecoderNet

pytestmark = pytest.mark.slow


def _signal_phase1_after(tmp_path, args, marker: str, sig) -> tuple[subprocess.Popen, list[str]]:
    """Run Phase I in a subprocess, send ``sig`` when a line contains ``marker``; returns the
    finished process and every line it printed."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundles/prostate/configs/phase1.json", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                proc.send_signal(sig)
                break
        lines += proc.stdout.readlines()
        proc.wait(timeout=300)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    return proc, lines


@pytest.mark.slow
def test_phase1_killed_after_a_checkpoint_resumes_with_the_same_command(tmp_path):
    bundle = copy_bundle("prostate", tmp_path)
    data = tiny_dataset(tmp_path / "data")
    models = bundle / "models"
    args = ("--dataset_dir", str(data), *TINY, "--epochs", "6", "--checkpoint_interval", "1")
    proc, first = _signal_phase1_after(tmp_path, args, "epoch 2: saved the training state", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "".join(first[-40:])
    state = torch.load(models / "phase1_model_resume.pt", weights_only=True)
    assert not state["finished"] and state["epoch"] >= 2

    out = check(run_bundle(tmp_path, "phase1", *args))
    assert f"Resuming from {models / 'phase1_model_resume.pt'} at epoch {state['epoch']} of 6" in out
    assert f"Epoch[{state['epoch'] + 1}] Complete" in out and "Epoch[6] Complete" in out
    assert "Epoch[1] Complete" not in out  # the numbering goes on, nothing is trained twice
    final = torch.load(models / "phase1_model_resume.pt", weights_only=True)
    assert final["finished"] and final["epoch"] == 6 and final["iteration"] == 6 * (state["iteration"] // state["epoch"])
    DualDecoderNet().load_state_dict(torch.load(models / "phase1_model_final.pt", weights_only=True), strict=True)
    DualDecoderNet().load_state_dict(torch.load(models / "phase1_model.pt", weights_only=True), strict=True)
    leftovers = [p.name for p in models.iterdir() if p.name.startswith((".tmp", "tmp"))]
    assert leftovers == []

    # a finished phase is not retrained silently
    again = run_bundle(tmp_path, "phase1", *args)
    # a finished phase is "up to date": exit 0 with the message, nothing retrained or overwritten
    assert again.returncode == 0 and "Traceback" not in again.stdout, again.stdout[-3000:]
    assert "has already finished" in again.stdout and "--resume false" in again.stdout
    assert "Epoch[1] Complete" not in again.stdout


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_and_exit_130(tmp_path):
    bundle = copy_bundle("prostate", tmp_path)
    data = tiny_dataset(tmp_path / "data")
    models = bundle / "models"
    args = ("--dataset_dir", str(data), *TINY, "--epochs", "50", "--checkpoint_interval", "1")
    proc, lines = _signal_phase1_after(tmp_path, args, "epoch 1: saved the training state", signal.SIGINT)
    out = "".join(lines)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "Ctrl-C: stopping after the current iteration" in out
    state = torch.load(models / "phase1_model_resume.pt", weights_only=True)
    assert f"the training state of epoch {state['epoch']} is in {models / 'phase1_model_resume.pt'}: run the same command to resume" in out
    assert not state["finished"] and not (models / "phase1_model_final.pt").exists()  # no "final" model of a stopped run


def _tensorboard_losses(folder: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [e.value for e in acc.Scalars("train_loss")]


@pytest.mark.slow
def test_same_seed_gives_bit_identical_phase1_losses_on_cpu(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    runs = []
    for name in ("a", "b"):
        bundle = copy_bundle("prostate", tmp_path / name)
        check(run_bundle(tmp_path / name, "phase1", "--dataset_dir", str(data), "--image_size", "32", "--batch_size", "4",
                         "--val_interval", "1", "--epochs", "1", "--device", "cpu"))
        runs.append((_tensorboard_losses(bundle / "logs" / "phase1"), torch.load(bundle / "models" / "phase1_model_final.pt", weights_only=True)))
    (losses_a, weights_a), (losses_b, weights_b) = runs
    assert len(losses_a) == 3 and losses_a == losses_b  # every iteration's loss, bit for bit
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
