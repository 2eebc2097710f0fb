"""Issue 16, item 6: one training run per checkpoint.

* Phase I, II and III take a lock per checkpoint file (``<checkpoint>.lock``) before any work:
  a second run on the same checkpoint stops with a message naming the lock and its holder,
  while the first one goes on; a lock left by a killed run is taken over with a notice.

The bundle runs use the tiny data set of ``test_reliability.py`` (a Phase I epoch: seconds)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bundle_utils import REPO, check, copy_bundle, run_bundle
from msf_monai.bundle import CheckpointLockedError
from msf_monai.locks import CheckpointLock, lock_holder
from test_reliability import TINY, tiny_dataset

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


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---------------------------------------------------------------------------------------------
# two runs at once
# ---------------------------------------------------------------------------------------------
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


def test_a_killed_run_leaves_a_stale_lock_the_next_run_takes_over(tmp_path):
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

    # the same Phase I command takes the stale lock over (with a notice) and finishes the run
    out = check(run_bundle(tmp_path, "phase1", *args))
    assert f"stale lock {lock}" in out and f"process {proc.pid}" in out
    assert f"Resuming from {models / 'phase1_model_resume.pt'}" in out
    assert not lock.exists()


# ---------------------------------------------------------------------------------------------
# the lock itself
# ---------------------------------------------------------------------------------------------
_HOLDER = textwrap.dedent("""
    import sys, time
    from msf_monai.locks import CheckpointLock
    CheckpointLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def _holder(checkpoint: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(checkpoint)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_lock_stops_a_second_holder_and_other_checkpoints_of_the_folder_stay_free(tmp_path):
    dsu, mixstyle = tmp_path / "model_dsu.pt", tmp_path / "model_mixstyle.pt"
    holder = _holder(dsu)
    try:
        with pytest.raises(CheckpointLockedError) as err:
            CheckpointLock(dsu).acquire()
        text = str(err.value)
        assert f"{dsu}.lock" in text and f"process {holder.pid}" in text and socket.gethostname() in text
        assert lock_holder(dsu)["pid"] == holder.pid
        # another checkpoint in the same models folder: another lock (Phase III dsu and mixstyle at once)
        other = CheckpointLock(mixstyle).acquire()
        assert lock_holder(mixstyle)["pid"] == os.getpid()
        other.release()
        assert not Path(f"{mixstyle}.lock").exists() and lock_holder(mixstyle) is None
    finally:
        holder.kill()
        holder.wait()
    # its process has ended: the lock it left is stale, taken over by the next run
    assert Path(f"{dsu}.lock").exists() and lock_holder(dsu) is None
    lock = CheckpointLock(dsu).acquire()
    try:
        assert json.loads(Path(f"{dsu}.lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_lock_file_naming_a_dead_process_is_taken_over_with_a_notice(tmp_path, caplog):
    checkpoint = tmp_path / "phase1_model.pt"
    dead = _dead_pid()
    Path(f"{checkpoint}.lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "earlier"}))
    with caplog.at_level(logging.WARNING, logger="msf_monai.locks"):
        lock = CheckpointLock(checkpoint).acquire()
    try:
        assert f"stale lock {checkpoint}.lock" in caplog.text and f"process {dead}" in caplog.text
        assert json.loads(Path(f"{checkpoint}.lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not Path(f"{checkpoint}.lock").exists()


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    checkpoint = tmp_path / "phase1_model.pt"
    Path(f"{checkpoint}.lock").write_text(json.dumps({"pid": 1234, "host": "elsewhere.example", "started": "earlier"}))
    with pytest.raises(CheckpointLockedError, match="elsewhere.example") as err:
        CheckpointLock(checkpoint).acquire()
    assert "delete" in str(err.value)
    assert Path(f"{checkpoint}.lock").exists()


def test_without_os_file_locks_the_pid_decides(tmp_path, monkeypatch):
    """Where the file system has no ``flock`` (e.g. some network mounts), a lock naming a live
    process of this host is respected and one naming a dead process is taken over."""
    import msf_monai.locks as locks

    monkeypatch.setattr(locks, "_try_flock", lambda fd: None)  # None: not supported here
    checkpoint = tmp_path / "phase1_model.pt"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        Path(f"{checkpoint}.lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(CheckpointLockedError, match=f"process {sleeper.pid}"):
            CheckpointLock(checkpoint).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = CheckpointLock(checkpoint).acquire()  # the sleeper has ended
    lock.release()
    assert not Path(f"{checkpoint}.lock").exists()


def test_only_rank_zero_of_a_distributed_run_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    lock = CheckpointLock(tmp_path / "phase1_model.pt").acquire()
    assert not Path(f"{tmp_path / 'phase1_model.pt'}.lock").exists()
    lock.release()
