"""Issue 16, item 6: one training run per checkpoint, and no phase built on an unfinished one.

* Phase I, II and III take a lock per checkpoint file (``<checkpoint>.lock``) before any work:
  a second run on the same checkpoint stops with a message naming the lock and its holder,
  while the first one goes on; a lock left by a killed run is taken over with a notice.
* Phase II (and Phase III's ``init_from_phase1`` and flows) read an earlier phase's output only
  when the training state saved next to it says that run finished.

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
from ignite.engine import Engine, Events

from bundle_utils import REPO, check, copy_bundle, run_bundle
from msf_monai.bundle import CheckpointLockedError, UnfinishedPhaseError
from msf_monai.locks import CheckpointLock, lock_holder
from msf_monai.networks import DualDecoderNet
from msf_monai.files import atomic_save, file_digest
from msf_monai.resume import TrainingCheckpointer, require_finished_run
from test_reliability import TINY, tiny_dataset

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


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---------------------------------------------------------------------------------------------
# two runs at once
# ---------------------------------------------------------------------------------------------
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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# a phase reads an earlier phase's output only when that run finished
# ---------------------------------------------------------------------------------------------
def _tiny_engine(checkpointer: TrainingCheckpointer, epochs: int) -> Engine:
    engine = Engine(lambda e, b: None)
    checkpointer.attach(engine)
    engine.run([0], max_epochs=epochs)
    return engine


def _checkpointer(folder: Path, resume=True) -> TrainingCheckpointer:
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    return TrainingCheckpointer(net, torch.optim.SGD(net.parameters(), 0.1), folder / "phase1_model_resume.pt",
                                best_path=folder / "phase1_model.pt", resume=resume)


@pytest.mark.slow
def test_require_finished_run_decisions(tmp_path, caplog):
    model, state = tmp_path / "phase1_model.pt", tmp_path / "phase1_model_resume.pt"
    torch.save(DualDecoderNet().state_dict(), model)
    # a bare model (e.g. from a packaged bundle): no state to check, used with a warning
    with caplog.at_level(logging.WARNING, logger="msf_monai.resume"):
        assert require_finished_run(model, what="Phase I", command=PHASE1_COMMAND) == str(model)
    assert f"no training state {state}" in caplog.text
    # an interrupted run
    atomic_save({"format": "msf_monai.resume", "finished": False, "epoch": 2, "max_epochs": 5}, state)
    with pytest.raises(UnfinishedPhaseError, match="did not finish") as err:
        require_finished_run(model, what="Phase I", command=PHASE1_COMMAND)
    assert str(model) in str(err.value) and str(state) in str(err.value) and "epoch 2 of 5" in str(err.value)
    assert PHASE1_COMMAND in str(err.value)
    # a finished run, and the model it saved
    atomic_save({"format": "msf_monai.resume", "finished": True, "epoch": 5, "output_sha1": file_digest(model)}, state)
    assert require_finished_run(model, what="Phase I", command=PHASE1_COMMAND) == str(model)
    # ... but not a model put there afterwards
    torch.save(DualDecoderNet(out_channels=2).state_dict(), model)
    with pytest.raises(UnfinishedPhaseError, match="not the model"):
        require_finished_run(model, what="Phase I", command=PHASE1_COMMAND)
    # an unreadable state
    state.write_bytes(b"garbage")
    with pytest.raises(UnfinishedPhaseError, match="cannot read"):
        require_finished_run(model, what="Phase I", command=PHASE1_COMMAND)
    state.unlink()
    # a run writing the model right now
    holder = _holder(model)
    try:
        with pytest.raises(CheckpointLockedError, match=f"process {holder.pid}"):
            require_finished_run(model, what="Phase I", command=PHASE1_COMMAND)
    finally:
        holder.kill()
        holder.wait()


def test_a_run_marks_its_state_unfinished_from_the_start(tmp_path):
    """A ``--resume false`` run (or a fresh one) killed before its first checkpoint must not
    leave the previous run's finished state next to a model it may already have replaced."""
    torch.save(DualDecoderNet().state_dict(), tmp_path / "phase1_model.pt")  # its best model
    _tiny_engine(_checkpointer(tmp_path), 2)
    state = torch.load(tmp_path / "phase1_model_resume.pt", weights_only=True)
    assert state["finished"] and state["epoch"] == 2

    class Killed(Exception):
        pass

    def killed(_):
        raise Killed

    engine = Engine(lambda e, b: None)
    _checkpointer(tmp_path, resume=False).attach(engine)
    engine.add_event_handler(Events.ITERATION_STARTED, killed)
    with pytest.raises(Killed):
        engine.run([0], max_epochs=2)
    state = torch.load(tmp_path / "phase1_model_resume.pt", weights_only=True)
    assert state["finished"] is False and state["epoch"] == 0
    with pytest.raises(UnfinishedPhaseError, match="epoch 0 of 2"):
        require_finished_run(tmp_path / "phase1_model.pt", what="Phase I", command=PHASE1_COMMAND)


def test_a_flow_fit_marks_its_state_unfinished_from_the_start(tmp_path):
    """Phase II likewise: Phase III must not take the previous fit's flows for finished ones
    while a --resume false fit that replaces them is under way or was killed."""
    import numpy as np

    from msf_monai.flows import StyleFlowBank
    from msf_monai.handlers import StyleFlowFitter, StyleStatisticsRecorder

    rng = np.random.default_rng(0)
    recorder = StyleStatisticsRecorder(layers=[2])
    recorder.stats = {2: {"mean": rng.normal(0, 1, (40, 4)).astype(np.float32), "var": rng.uniform(0.5, 2, (40, 4)).astype(np.float32)}}
    flows, state = tmp_path / "style_flows.pt", tmp_path / "style_flows_resume.pt"

    def fitter(resume=True):
        return StyleFlowFitter(recorder, StyleFlowBank({2: 4}, num_blocks=2), flows, epochs=2, lr=1e-3,
                               resume_path=state, resume=resume, checkpoint_every=1)

    fitter()(None)
    assert torch.load(state, weights_only=True)["output_sha1"] == file_digest(flows)
    assert require_finished_run(flows, what="Phase II") == str(flows)

    class Killed(Exception):
        pass

    again = fitter(resume=False)

    def killed(*args, **kwargs):
        raise Killed

    again.bank.fit = killed
    with pytest.raises(Killed):
        again(None)
    assert torch.load(state, weights_only=True)["finished"] is False
    with pytest.raises(UnfinishedPhaseError, match="Phase II run that did not finish"):
        require_finished_run(flows, what="Phase II", command="python -m monai.bundle run --config_file phase2.json")
