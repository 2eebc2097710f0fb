"""Training states (msf_monai.resume): resume decisions, and no phase built on an unfinished run."""

from __future__ import annotations

import copy
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.metrics import Metric
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler, ValidationHandler

from bundle_utils import locking_process
from msf_monai.bundle import CheckpointLockedError, UnfinishedPhaseError
from msf_monai.files import atomic_save, file_digest
from msf_monai.flows import StylePool
from msf_monai.networks import DualDecoderNet
from msf_monai.resume import (AtomicFileSaver, PhaseFinishedError, ResumeError, StyleSamplerStates, TrainingCheckpointer,
                               check_resume, load_resume_state, require_finished_run)
from msf_monai.styles import MixStyleFlow
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


class _RandomStyles(torch.nn.Module):
    """A stand-in for a fitted flow bank: ``sample`` draws 4-channel styles from torch's generator."""

    def sample(self, layer, n):
        return torch.randn(n, 4), torch.rand(n, 4) + 0.5


class _Outside(torch.nn.Module):
    """Applies ``layer`` without registering it: the trained network's ``named_modules`` and
    ``state_dict`` do not see it (like the frozen stylizer next to a trained UNet)."""

    def __init__(self, layer):
        super().__init__()
        self.__dict__["layer"] = layer

    def forward(self, x):
        return self.layer(x)


def _training(folder: Path, init_seed: int, stop_after: int | None = None, interval: int = 2, styles: bool = False):
    """A MONAI trainer (4 epochs, dropout: the run draws random numbers) validated every epoch by
    an evaluator with a scripted key metric, an lr scheduler, and the checkpointer as the configs
    attach it; ``stop_after``: the process is killed right after that epoch's handlers. ``styles``:
    a MixStyleFlow layer draws its styles from a pool of 5 (one per step: the pool outlives epochs)."""
    torch.manual_seed(init_seed)
    layers = [torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Dropout(0.5), torch.nn.Conv2d(4, 1, 1)]
    stylizer = None
    if styles == "stylizer":  # the pool in a network outside the trained one, as unet_mixstyleflow's stylizer
        stylizer = MixStyleFlow(style_sampler=StylePool(_RandomStyles(), 2, pool_size=5), p=1.0)
        layers.insert(1, _Outside(stylizer))
    elif styles:
        layers.insert(1, MixStyleFlow(style_sampler=StylePool(_RandomStyles(), 2, pool_size=5), p=1.0))
    net = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    validator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=tiny_loader(1, size=8, batch=2), network=net,
                                    key_val_metric={"score": _ScriptedScore()}, decollate=False)
    checkpointer = TrainingCheckpointer(net, opt, folder / "model_resume.pt", best_path=folder / "model.pt", validator=validator,
                                        lr_scheduler=sched, interval=interval, settings={"seed": 0},
                                        style_sources={"stylizer": stylizer})
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


@pytest.mark.parametrize("stop_after,styles", [(2, False), (3, False), (2, True), (2, "stylizer")])
def test_a_killed_and_resumed_run_ends_as_an_uninterrupted_one(tmp_path, stop_after, styles):
    """Killed right after the state of epoch 2 was saved (``stop_after`` 2) or one epoch later,
    whose work is lost (3): the same command goes on from epoch 2 and ends with the weights,
    optimizer moments, scheduler, epoch count and best model of a run that was never stopped --
    the network, the optimizer and every random generator come from the saved state, and the
    restored best metric keeps epochs 3 and 4 (worse than epoch 2) from replacing the best model.
    With a MixStyleFlow layer (``styles``) the styles its pool had not handed out yet come from
    the state too (a refilled pool would train on other styles), also when the layer is in
    another network than the trained one (``"stylizer"``, passed as ``style_sources``)."""
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    trainer, net, opt, validator = _training(whole, init_seed=0, styles=styles)
    trainer.run()
    assert validator.state.best_metric == 0.9 and validator.state.best_metric_epoch == 2

    trainer, *_ = _training(stopped, init_seed=0, stop_after=stop_after, styles=styles)
    with pytest.raises(_Killed):
        trainer.run()
    state = torch.load(stopped / "model_resume.pt", weights_only=True)
    assert state["epoch"] == 2 and not state["finished"]

    torch.manual_seed(1234)  # the generators as a new process finds them
    trainer, net2, opt2, validator2 = _training(stopped, init_seed=1, styles=styles)  # other initial weights: all comes from the state
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


def test_a_state_saved_before_the_ignite_checkpointer_resumes(tmp_path, caplog):
    """A state file of the previous TrainingCheckpointer (its own flat dict, with ``best_saved_epoch``
    and ``lr_scheduler: None``) resumes: network, optimizer moments, epoch and iteration, best
    metric and every random generator come back, the unfinished file is not rewritten at the
    start, and the run ends with a finished state in the same format."""
    torch.manual_seed(5)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    net(torch.rand(4, 3)).sum().backward()
    opt.step()  # moments to restore
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    old = {"format": "msf_monai.resume", "version": 1, "finished": False, "epoch": 2, "iteration": 6, "max_epochs": 4,
           "network": {k: v.detach().clone() for k, v in net.state_dict().items()}, "optimizer": copy.deepcopy(opt.state_dict()),
           "lr_scheduler": None, "best_metric": 0.9, "best_metric_epoch": 2, "best_saved_epoch": 2,
           "rng": {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
                   "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                             "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}},
           "settings": {"seed": 0}, "output_sha1": None}
    draws = (torch.rand(3), np.random.rand(3), random.random())  # what the restored generators give next
    path = tmp_path / "model_resume.pt"
    torch.save(old, path)
    saved = path.read_bytes()
    assert check_resume(path, max_epochs=4, settings={"seed": 0})["epoch"] == 2

    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(net2.parameters(), 1e-2)
    validator = Engine(lambda e, b: None)
    validator.state.best_metric, validator.state.best_metric_epoch = -1, -1
    checkpointer = TrainingCheckpointer(net2, opt2, path, best_path=tmp_path / "model.pt", validator=validator, settings={"seed": 0})
    engine = Engine(lambda e, b: None)
    checkpointer.attach(engine)
    seen = {}

    @engine.on(Events.EPOCH_STARTED(once=3))
    def _look(e):
        seen.update(epoch=e.state.epoch, iteration=e.state.iteration, file=path.read_bytes(), network=copy.deepcopy(net2.state_dict()),
                    optimizer=copy.deepcopy(opt2.state_dict()), draws=(torch.rand(3), np.random.rand(3), random.random()))

    with caplog.at_level(logging.INFO, logger="msf_monai.resume"):
        engine.run([0, 1, 2], max_epochs=4)
    assert f"Resuming from {path} at epoch 2 of 4, best validation metric 0.9000 at epoch 2" in caplog.text
    assert (seen["epoch"], seen["iteration"]) == (3, 6)  # epoch 3 is the first one run again
    assert seen["file"] == saved  # an unfinished state is not marked again
    assert _equal(seen["network"], old["network"]) and _equal(seen["optimizer"], old["optimizer"])
    assert torch.equal(seen["draws"][0], draws[0]) and np.array_equal(seen["draws"][1], draws[1]) and seen["draws"][2] == draws[2]
    assert (validator.state.best_metric, validator.state.best_metric_epoch) == (0.9, 2)
    final = load_resume_state(path)
    assert final["finished"] and (final["epoch"], final["iteration"], final["max_epochs"]) == (4, 12, 4)
    assert (final["best_metric"], final["best_metric_epoch"], final["settings"]) == (0.9, 2, {"seed": 0})
    assert set(old) - set(final) == {"best_saved_epoch", "lr_scheduler"}  # no scheduler here: no entry
    assert not set(final) - set(old)


def test_the_save_handler_never_leaves_no_file(tmp_path, monkeypatch):
    """ignite removes a checkpoint's previous item *before* it writes the next one: a write that
    fails there (a full disk, a kill) must leave the previous file whole, never none -- for a
    bare ``Checkpoint`` and for the training state of a run."""
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    first = {k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path / "model.pt"
    saver = AtomicFileSaver(path)
    removed = []
    remove = saver.remove
    saver.remove = lambda name: (removed.append(name), remove(name))
    checkpoint = Checkpoint({"model": net}, saver, filename_pattern="model", n_saved=1)
    engine = Engine(lambda e, b: None)
    engine.state.iteration = 1
    checkpoint(engine)
    with torch.no_grad():
        net.weight.add_(1.0)

    def disk_full(obj, fh, *args, **kwargs):
        fh.write(b"half a checkpoint")
        raise OSError("No space left on device")

    engine.state.iteration = 2
    with monkeypatch.context() as m:
        m.setattr(torch, "save", disk_full)
        with pytest.raises(OSError, match="No space"):
            checkpoint(engine)
    assert removed == ["model"]  # ignite did drop the old item before this write
    assert _equal(torch.load(path, weights_only=True), first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file either

    # the same in a run: the save of epoch 2 fails, the state of epoch 1 is still there and resumes
    run = tmp_path / "run"
    checkpointer = _checkpointer(run)

    def fail_from_now(_):
        monkeypatch.setattr(torch, "save", disk_full)

    engine = Engine(lambda e, b: None)
    checkpointer.attach(engine)
    engine.add_event_handler(Events.EPOCH_STARTED(once=2), fail_from_now)
    with pytest.raises(OSError, match="No space"):
        engine.run([0], max_epochs=3)
    monkeypatch.undo()
    state = load_resume_state(run / "phase1_model_resume.pt")
    assert state["epoch"] == 1 and not state["finished"]
    assert check_resume(run / "phase1_model_resume.pt", max_epochs=3)["epoch"] == 1


def test_style_pools_missing_from_a_saved_state_are_named(caplog):
    def network():
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 1), MixStyleFlow(style_sampler=StylePool(_RandomStyles(), 2, pool_size=5)))

    saved = StyleSamplerStates(network())
    assert list(saved.samplers()) == ["1"]
    state = saved.state_dict()
    wrapped = StyleSamplerStates(torch.nn.Sequential(network()))  # the same pool under another module name: "0.1"
    with caplog.at_level(logging.WARNING, logger="msf_monai.resume"):
        StyleSamplerStates(network()).load_state_dict(state)
        assert not caplog.records
        wrapped.load_state_dict(state)
    assert "no style pool for 0.1 (it has pools for: 1)" in caplog.text
