"""Training states (msf_monai.resume): resume decisions, and no phase built on an unfinished run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from bundle_utils import locking_process
from msf_monai.bundle import CheckpointLockedError, UnfinishedPhaseError
from msf_monai.files import atomic_save, file_digest
from msf_monai.networks import DualDecoderNet
from msf_monai.resume import PhaseFinishedError, ResumeError, TrainingCheckpointer, check_resume, require_finished_run


PHASE1_COMMAND = "python -m monai.bundle run --config_file bundles/prostate/configs/phase1.json"


def test_check_resume_decisions(tmp_path):
    path = tmp_path / "state.pt"
    assert check_resume(path, resume=True, max_epochs=5) is None  # nothing saved yet
    atomic_save({"format": "msf_monai.resume", "finished": False, "epoch": 3, "settings": {"image_size": 32}}, path)
    assert check_resume(path, resume=True, max_epochs=5, settings={"image_size": 32})["epoch"] == 3
    assert check_resume(path, resume=False, max_epochs=5, settings={"image_size": 64}) is None
    with pytest.raises(ResumeError, match="image_size: saved 32, now 64"):
        check_resume(path, resume=True, max_epochs=5, settings={"image_size": 64})
    assert check_resume(path, resume=True, settings={"image_size": 64}, on_mismatch="restart") is None
    with pytest.raises(ResumeError, match="beyond --epochs 2"):
        check_resume(path, resume=True, max_epochs=2, settings={"image_size": 32})
    atomic_save({"format": "msf_monai.resume", "finished": True, "epoch": 5, "settings": {}}, path)
    with pytest.raises(PhaseFinishedError, match="already finished"):
        check_resume(path, resume=True, max_epochs=5)
    assert check_resume(path, resume=True, max_epochs=8)["epoch"] == 5  # train longer
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError, match=str(path)):
        check_resume(path, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temporary files


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
    holder = locking_process(model)
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
