"""Checkpoint locks and unfinished phases in bundle runs: one training run per checkpoint, no phase built on an unfinished one.

A second run on the same checkpoint stops before any work while the first goes on; a killed run's
stale lock is taken over; Phase II and Phase III refuse the unfinished Phase I model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bundle_utils import TINY, check, copy_bundle, run_bundle
from data_utils import tiny_dataset

pytestmark = pytest.mark.slow


PHASE1_COMMAND = "python -m monai.bundle run --config_file bundles/prostate/configs/phase1.json"


def _start(cwd: Path, config: str, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"bundles/prostate/configs/{config}.json", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _read_until(proc: subprocess.Popen, text: str) -> list[str]:
    lines = []
    while True:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the run ended before printing {text!r}:\n{''.join(lines[-40:])}")
        lines.append(line)
        if text in line:
            return lines


def _clean_failure(proc: subprocess.CompletedProcess, *names) -> str:
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-4000:]
    for name in names:
        assert str(name) in proc.stdout, (name, proc.stdout[-4000:])
    return proc.stdout


@pytest.mark.slow
def test_a_second_run_on_the_same_checkpoint_stops_before_any_work_and_the_first_finishes(tmp_path):
    bundle = copy_bundle("prostate", tmp_path)
    data = tiny_dataset(tmp_path / "data")
    models = bundle / "models"
    state_file, lock = models / "phase1_model_resume.pt", models / "phase1_model.pt.lock"
    args = ("--dataset_dir", str(data), *TINY, "--epochs", "3", "--checkpoint_interval", "1")
    first = _start(tmp_path, "phase1", *args)
    try:
        _read_until(first, "epoch 1: saved the training state")
        # the first run is stopped (not ended) while the second starts: it still holds its checkpoint
        first.send_signal(signal.SIGSTOP)
        try:
            saved = state_file.read_bytes()
            second = run_bundle(tmp_path, "phase1", *args)
            assert state_file.read_bytes() == saved  # the second run neither resumed nor wrote the state
        finally:
            first.send_signal(signal.SIGCONT)
        rest, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    out = _clean_failure(second, lock, f"process {first.pid}", "--ckpt_dir")
    assert "Epoch[" not in out and "Resuming" not in out and "cache" not in out.lower()
    assert first.returncode == 0, rest[-4000:]
    state = torch.load(state_file, weights_only=True)
    assert state["finished"] and state["epoch"] == 3
    assert "Epoch[3] Complete" in rest
    assert not lock.exists()  # released at the end of the run


@pytest.mark.slow
def test_a_killed_run_leaves_a_stale_lock_the_next_run_takes_over_and_phase2_waits_for_phase1(tmp_path):
    bundle = copy_bundle("prostate", tmp_path)
    data = tiny_dataset(tmp_path / "data")
    models = bundle / "models"
    lock = models / "phase1_model.pt.lock"
    args = ("--dataset_dir", str(data), *TINY, "--epochs", "3", "--checkpoint_interval", "1")
    proc = _start(tmp_path, "phase1", *args)
    try:
        _read_until(proc, "epoch 1: saved the training state")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads(lock.read_text())["pid"] == proc.pid  # left behind: nothing could release it
    assert (models / "phase1_model.pt").is_file()  # the best model of epoch 1, from an unfinished run

    # Phase II (and Phase III initialized from Phase I) refuse the unfinished Phase I model
    phase2 = ("--dataset_dir", str(data), "--image_size", "32", "--batch_size", "8", "--epochs", "2")
    _clean_failure(run_bundle(tmp_path, "phase2", *phase2), models / "phase1_model.pt",
                   models / "phase1_model_resume.pt", "did not finish", PHASE1_COMMAND)
    assert not (models / "style_flows.pt").exists() and not (models / "style_stats.npz").exists()
    _clean_failure(run_bundle(tmp_path, "phase3", "--dataset_dir", str(data), *TINY, "--epochs", "1",
                              "--style_method", "dsu", "--init_from_phase1", "true"),
                   models / "phase1_model_resume.pt", "did not finish")

    # the same Phase I command takes the stale lock over (with a notice) and finishes the run
    out = check(run_bundle(tmp_path, "phase1", *args))
    assert f"stale lock {lock}" in out and f"process {proc.pid}" in out
    assert f"Resuming from {models / 'phase1_model_resume.pt'}" in out
    assert not lock.exists()
    out = check(run_bundle(tmp_path, "phase2", *phase2))
    assert "did not finish" not in out and (models / "style_flows.pt").is_file()
    assert not (models / "style_flows.pt.lock").exists()
