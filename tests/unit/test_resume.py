"""Training states (msf_monai.resume): resume decisions, and no phase built on an unfinished run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler, ValidationHandler

from bundle_utils import locking_process
from msf_monai.bundle import CheckpointLockedError, UnfinishedPhaseError
from msf_monai.files import atomic_save, file_digest
from msf_monai.networks import DualDecoderNet
from msf_monai.resume import PhaseFinishedError, ResumeError, TrainingCheckpointer, check_resume, require_finished_run
from training_utils import tiny_loader


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


# ----------------------------------------------------------------------------- the checkpointer on ignite's Checkpoint
SCORES = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7}  # the validator's key metric by epoch: the best is epoch 2's


class _ScriptedScore(Metric):
    """A key metric with the value of :data:`SCORES` for the epoch: the best epoch is known, and
    the epochs after it are worse."""

    def reset(self):
        pass

    def update(self, output):
        pass

    def compute(self):
        raise NotImplementedError  # completed() gives the value

    def iteration_completed(self, engine):
        pass

    def completed(self, engine, name):
        engine.state.metrics[name] = SCORES[engine.state.epoch]


class _Killed(Exception):
    pass


def _training(folder: Path, init_seed: int, stop_after: int | None = None, interval: int = 2):
    """A MONAI trainer (4 epochs, dropout: the run draws random numbers) validated every epoch by
    an evaluator with a scripted key metric, an lr scheduler, and the checkpointer as the configs
    attach it; ``stop_after``: the process is killed right after that epoch's handlers."""
    torch.manual_seed(init_seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Dropout(0.5), torch.nn.Conv2d(4, 1, 1))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    validator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=tiny_loader(1, size=8, batch=2), network=net,
                                    key_val_metric={"score": _ScriptedScore()}, decollate=False)
    checkpointer = TrainingCheckpointer(net, opt, folder / "model_resume.pt", best_path=folder / "model.pt", validator=validator,
                                        lr_scheduler=sched, interval=interval, settings={"seed": 0})
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=4, train_data_loader=tiny_loader(3, size=8, batch=2, seed=1), network=net,
        optimizer=opt, loss_function=torch.nn.MSELoss(), decollate=False,
        train_handlers=[ValidationHandler(validator=validator, interval=1, epoch_level=True),
                        LrScheduleHandler(sched, print_lr=False), checkpointer],
    )
    if stop_after is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda e: (_ for _ in ()).throw(_Killed()))
    return trainer, net, opt, validator


def _equal(a, b) -> bool:
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("stop_after", [2, 3])
def test_a_killed_and_resumed_run_ends_as_an_uninterrupted_one(tmp_path, stop_after):
    """Killed right after the state of epoch 2 was saved (``stop_after`` 2) or one epoch later,
    whose work is lost (3): the same command goes on from epoch 2 and ends with the weights,
    optimizer moments, scheduler, epoch count and best model of a run that was never stopped --
    the network, the optimizer and every random generator come from the saved state, and the
    restored best metric keeps epochs 3 and 4 (worse than epoch 2) from replacing the best model."""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    trainer, net, opt, validator = _training(whole, init_seed=0)
    trainer.run()
    assert validator.state.best_metric == 0.9 and validator.state.best_metric_epoch == 2

    trainer, *_ = _training(stopped, init_seed=0, stop_after=stop_after)
    with pytest.raises(_Killed):
        trainer.run()
    state = torch.load(stopped / "model_resume.pt", weights_only=True)
    assert state["epoch"] == 2 and not state["finished"]

    torch.manual_seed(1234)  # the generators as a new process finds them
    trainer, net2, opt2, validator2 = _training(stopped, init_seed=1)  # other initial weights: all comes from the state
    trainer.run()
    assert trainer.state.epoch == 4 and trainer.state.iteration == 4 * 3
    assert all(torch.equal(p, q) for p, q in zip(net.state_dict().values(), net2.state_dict().values()))
    assert _equal(opt.state_dict(), opt2.state_dict())
    assert (validator2.state.best_metric, validator2.state.best_metric_epoch) == (0.9, 2)
    best, best2 = (torch.load(folder / "model.pt", weights_only=True) for folder in (whole, stopped))
    assert _equal(best, best2) and not _equal(best, dict(net.state_dict()))  # epoch 2's weights, not the last ones
    final, final2 = (torch.load(folder / "model_resume.pt", weights_only=True) for folder in (whole, stopped))
    assert final2["finished"] and final2["epoch"] == 4 and final2["best_metric_epoch"] == 2
    assert final2["output_sha1"] == file_digest(stopped / "model.pt")
    assert require_finished_run(stopped / "model.pt") == str(stopped / "model.pt")
    del final["output_sha1"], final2["output_sha1"]  # each the digest of its own model file
    assert _equal(final, final2)  # network, optimizer, scheduler, random generators, epoch, best metric, settings
