"""Checkpoint locks (msf_monai.locks): one training run per checkpoint, stale locks taken over."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bundle_utils import locking_process
from msf_monai.bundle import CheckpointLockedError
from msf_monai.locks import CheckpointLock, lock_holder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.slow
def test_a_live_lock_stops_a_second_holder_and_other_checkpoints_of_the_folder_stay_free(tmp_path):
    dsu, mixstyle = tmp_path / "model_dsu.pt", tmp_path / "model_mixstyle.pt"
    holder = locking_process(dsu)
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


@pytest.mark.slow
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


@pytest.mark.slow
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
