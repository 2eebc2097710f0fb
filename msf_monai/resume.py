"""Resumable training: full training checkpoints written atomically, and picked up again when
the same command is run after a crash, a pre-empted GPU or a ``kill``.

* :class:`TrainingCheckpointer` -- ignite handler for the Phase I / III trainers, built on
  ignite's ``Checkpoint``. Every ``interval`` epochs it writes the *latest* full training state
  (network, optimizer, lr scheduler, epoch/iteration, best validation metric, torch/numpy/python
  RNG states: :class:`RNGStates`, the style layers' style pools: :class:`StyleSamplerStates`) and, whenever the validation metric improves, the *best* model
  weights (the bundle's ``models/<checkpoint_name>``). On ``Events.STARTED`` it loads the latest
  state again (``Checkpoint.load_objects``) when ``resume`` is true, so the epoch numbering, the
  optimizer moments and the best metric go on where the interrupted run stopped.
* :class:`AtomicFileSaver` -- its save handler: :func:`msf_monai.files.atomic_save` to one fixed
  file, so a reader (or a resumed run) sees the old file or the new one, never half a file or none.
* :func:`check_resume` -- called in the configs' ``initialize`` (before any work): refuses to
  silently retrain a phase whose saved state says it finished, and refuses to resume a state
  saved with other data or settings.
* :func:`require_finished_run` -- called before a phase reads an earlier phase's output (Phase
  II reads Phase I's model, Phase III the flows and, with ``init_from_phase1``, Phase I's
  model): refuses an output whose run did not finish, is still running, or was replaced after
  it finished; an output without a saved state (e.g. from a packaged bundle) is used with a
  warning.

A run marks its saved state *unfinished* as soon as it starts (a fresh or ``--resume false``
run replaces the previous run's state at once), and writes ``finished`` with the SHA-1 of the
model it saved (``output_sha1``) when it ends; so the state next to a model always says whether
the run that wrote it finished. Concurrent runs on one checkpoint are prevented by
:mod:`msf_monai.locks`.

Resume files hold tensors and plain Python values only, so ``torch.load(weights_only=True)``
reads them; every entry sits at the file's top level (:mod:`msf_monai.saved_state`, version 1),
as before the handler was built on ignite, so states of older runs still resume.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler, Checkpoint

from .cli import as_bool
from .errors import CheckpointLockedError, MissingPhaseOutputError, UnfinishedPhaseError
from .files import atomic_save, file_digest, remove_stale_temporaries
from .locks import describe_holder, lock_holder, lock_path
from .saved_state import RESUME_FORMAT, RESUME_VERSION, ResumeError, detached_cpu_copy, load_resume_state, plain_settings, setting_differences
from .training_record import write_training_record

__all__ = [
    "RESUME_FORMAT",
    "AtomicFileSaver",
    "PhaseFinishedError",
    "RNGStates",
    "StyleSamplerStates",
    "ResumeError",
    "TrainingCheckpointer",
    "check_resume",
    "load_finished_weights",
    "load_resume_state",
    "plain_settings",
    "require_finished_run",
    "setting_differences",
    "state_path_of",
]

logger = logging.getLogger("msf_monai.resume")

class PhaseFinishedError(SystemExit):
    """The phase has already run to its end: nothing to do, and its models are not overwritten.
    Not an error (hence a ``SystemExit``, like :class:`InterruptedRun`: both end the process on
    purpose).

    Exit status 0 (success, as ``make`` treats a target that is up to date: a pipeline that
    reruns every step goes on), with the message saying how to retrain or train longer."""

    def __init__(self, message: str):
        self.message = message
        print(message, file=sys.stderr, flush=True)  # exit status 0 prints nothing itself
        super().__init__(0)

    def __str__(self) -> str:
        return self.message


class InterruptedRun(SystemExit):
    """Ctrl-C (``KeyboardInterrupt``) during a phase: one line saying where the run stopped and
    how to go on, exit status 130 (the shell's code for SIGINT), no traceback."""

    def __init__(self, message: str):
        self.message = message
        print(message, file=sys.stderr, flush=True)  # an int exit status prints nothing itself
        super().__init__(130)

    def __str__(self) -> str:
        return self.message


def exit_on_interrupt(engine: Engine, error: BaseException, message: str) -> None:
    """``Events.EXCEPTION_RAISED`` handler body: :class:`InterruptedRun` with ``message`` for a
    ``KeyboardInterrupt``; any other exception goes on as it came (ignite re-raises nothing
    itself once a handler is registered)."""
    if isinstance(error, KeyboardInterrupt):
        raise InterruptedRun(message) from None
    raise error


# ---------------------------------------------------------------------------------------------
# random number generators
# ---------------------------------------------------------------------------------------------
class RNGStates:
    """The torch (CPU and every CUDA device), numpy and python ``random`` generators as one object
    with ``state_dict`` / ``load_state_dict`` (plain values), for ignite's ``Checkpoint``."""

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss = random.getstate()
        states = {
            "torch": torch.get_rng_state(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": [version, list(internal), gauss],
        }
        if torch.cuda.is_available():
            states["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
        return states

    def load_state_dict(self, states: Mapping) -> None:
        """Restore what :meth:`state_dict` returned (CUDA states only where the devices exist)."""
        if "torch" in states:
            torch.set_rng_state(states["torch"].cpu())
        if "numpy" in states:
            s = states["numpy"]
            keys = np.asarray(s["keys"].numpy() if isinstance(s["keys"], torch.Tensor) else s["keys"], dtype=np.uint32)
            np.random.set_state((s["kind"], keys, int(s["pos"]), int(s["has_gauss"]), float(s["cached_gaussian"])))
        if "python" in states:
            version, internal, gauss = states["python"]
            random.setstate((version, tuple(internal), gauss))
        if states.get("cuda") and torch.cuda.is_available():
            cuda = list(states["cuda"])[: torch.cuda.device_count()]
            for i, s in enumerate(cuda):
                torch.cuda.set_rng_state(s, i)


# ---------------------------------------------------------------------------------------------
# the resume check before any work
# ---------------------------------------------------------------------------------------------
def check_resume(
    path: str | os.PathLike,
    resume: bool = True,
    max_epochs: int | None = None,
    settings: Mapping | None = None,
    on_mismatch: str = "error",
    what: str = "this phase",
) -> dict | None:
    """Decide, before any work, what a run does with the saved state at ``path``.

    Returns the state to resume from, or ``None`` to start from scratch (no state, ``resume``
    false, or -- with ``on_mismatch="restart"`` -- a state saved with other ``settings``).
    Raises :class:`PhaseFinishedError` when the state says the phase finished (and
    ``max_epochs`` does not ask for more epochs), and :class:`ResumeError` when the state was
    saved with other ``settings`` (``on_mismatch="error"``), when it has more epochs than
    ``max_epochs``, or when it is unreadable.
    """
    if on_mismatch not in ("error", "restart"):
        raise ValueError(f"on_mismatch must be 'error' or 'restart', got {on_mismatch!r}")
    path = Path(path)
    if not _as_bool(resume):
        if path.is_file():
            logger.info("--resume false: %s starts from scratch (the saved state %s will be replaced)", what, path)
        return None
    if not path.is_file():
        return None
    state = load_resume_state(path)
    diff = setting_differences(state.get("settings", {}), plain_settings(settings))
    if diff:
        if on_mismatch == "restart":
            logger.warning("the saved state %s was made with other inputs or settings (%s); %s starts from scratch",
                           path, "; ".join(diff), what)
            return None
        raise ResumeError(
            f"the saved training state {path} was made with other data or settings ({'; '.join(diff)}). "
            "Run with the settings of that run to continue it, or with --resume false to start this phase "
            "from scratch (this replaces its models)."
        )
    epoch = int(state.get("epoch", 0))
    if state.get("finished") and (max_epochs is None or int(max_epochs) <= epoch):
        done = f" after {epoch} epochs" if max_epochs is not None else ""
        raise PhaseFinishedError(
            f"{what} has already finished{done} (saved state: {path}); its models are not overwritten. "
            "To train it again from scratch, run the same command with --resume false"
            + ("; to train it longer, give a larger --epochs." if max_epochs is not None else ".")
        )
    if max_epochs is not None and int(max_epochs) < epoch:
        raise ResumeError(
            f"the saved training state {path} is at epoch {epoch}, beyond --epochs {max_epochs}. "
            "Give --epochs of at least that, or --resume false to start from scratch."
        )
    return state


def _as_bool(value) -> bool:
    return as_bool(value, "resume")


def state_path_of(path: str | os.PathLike) -> Path:
    """The training state saved next to an output: ``<name>_resume.pt`` (the configs'
    ``resume_checkpoint`` / ``flow_resume_checkpoint``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}_resume{path.suffix}")


def require_finished_run(
    path: str | os.PathLike,
    state_path: str | os.PathLike | None = None,
    what: str = "the earlier phase",
    command: str | None = None,
) -> str:
    """Return ``path`` (an earlier phase's output, e.g. ``models/phase1_model.pt``) if the run
    that wrote it finished; else stop with a message naming the file, its saved state and the
    command that finishes it.

    Decisions, from the training state at ``state_path`` (default: ``<name>_resume.pt`` next to
    ``path``, what :class:`TrainingCheckpointer` and Phase II's flow fitter write):

    * ``path`` missing: :class:`~msf_monai.errors.MissingPhaseOutputError` with ``command``;
    * a run holds ``path``'s lock now (it is being written): :class:`~msf_monai.errors.CheckpointLockedError`;
    * no state: a warning, and ``path`` is used as it is -- a model from a packaged bundle or
      another machine comes without one, and then nothing here can tell how it was made;
    * a state saying the run did not finish (interrupted, killed, a ``--resume false`` run
      stopped early), an unreadable state, or a finished state whose ``output_sha1`` is not
      ``path``'s (the file was replaced after that run): :class:`~msf_monai.errors.UnfinishedPhaseError`.
    """
    path = Path(path)
    again = f":\n  {command}" if command else "."
    if not path.is_file():
        raise MissingPhaseOutputError(f"required file not found: {path}\nCreate it first with{again}")
    holder = lock_holder(path)
    if holder is not None:
        raise CheckpointLockedError(
            f"{path} is being written by a {what} run that has not ended: its lock {lock_path(path)} is held by "
            f"{describe_holder(holder)}. Wait for that run to finish, then run this command again."
        )
    state_path = state_path_of(path) if state_path is None else Path(state_path)
    if not state_path.is_file():
        logger.warning("no training state %s next to %s: cannot check that the %s run that wrote it finished; "
                       "using it as it is (a model from a packaged bundle has no state)", state_path, path, what)
        return str(path)
    try:
        state = load_resume_state(state_path)
    except ResumeError:
        raise UnfinishedPhaseError(
            f"cannot read the training state {state_path} saved next to {path}, so it is unknown whether the {what} "
            f"run that wrote {path.name} finished. Run {what} again{again}\n(or delete {state_path} to use {path} as it is)"
        ) from None
    if not state.get("finished"):
        where = ""
        if state.get("max_epochs") is not None:
            where = f" (it stopped at epoch {int(state.get('epoch', 0))} of {int(state['max_epochs'])})"
        raise UnfinishedPhaseError(
            f"{path} comes from a {what} run that did not finish: its training state {state_path} says so{where}. "
            f"Using it would build on a partly trained model. Finish that run: run {what} again with the same "
            f"settings, it resumes where it stopped{again}"
        )
    digest = state.get("output_sha1")
    if digest and file_digest(path) != digest:
        raise UnfinishedPhaseError(
            f"{path} is not the model that the finished {what} run saved (its training state {state_path}): the file "
            f"was replaced after that run. Run {what} again (with --resume false){again}\n"
            f"or, to use {path} as it is, delete {state_path}."
        )
    return str(path)


def load_finished_weights(
    network: torch.nn.Module,
    path: str | os.PathLike,
    what: str = "the earlier phase",
    command: str | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Load into ``network`` the weights an earlier, finished run saved at ``path`` (checked as
    :func:`require_finished_run` checks it: same errors and messages), e.g. Phase III's
    ``init_from_phase1``. Returns ``network``."""
    path = require_finished_run(path, what=what, command=command)
    network.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    return network


class StyleSamplerStates:
    """The state of every style sampler in ``network`` (the ``style_sampler`` of a style layer,
    where it has ``state_dict``: :class:`msf_monai.flows.StylePool`) as one object for ignite's
    ``Checkpoint``, keyed by the layer's module name. Without it a resumed Phase III would refill
    its style pools from scratch and draw other styles than an uninterrupted run.

    ``style_sources``: other networks whose style layers the run samples from, by name (the frozen
    stylizer of ``unet_mixstyleflow``); their samplers are keyed ``<name>.<layer module name>``."""

    def __init__(self, network: torch.nn.Module, style_sources: Mapping[str, torch.nn.Module] | None = None):
        self.network = network
        self.style_sources = {str(k): v for k, v in (style_sources or {}).items() if v is not None}

    def samplers(self) -> dict:
        """``{layer module name: sampler}`` of the samplers that have a state."""
        found = {}
        for prefix, net in [("", self.network)] + [(f"{k}.", v) for k, v in self.style_sources.items()]:
            for name, module in net.named_modules():
                sampler = getattr(module, "style_sampler", None)
                if callable(getattr(sampler, "state_dict", None)):
                    found[prefix + name] = sampler
        return found

    def state_dict(self) -> dict:
        return {name: sampler.state_dict() for name, sampler in self.samplers().items()}

    def load_state_dict(self, states: Mapping) -> None:
        samplers = self.samplers()
        fresh = sorted(set(samplers) - set(states))
        if fresh:  # e.g. a network wrapped or renamed since the state was saved
            logger.warning("the saved training state has no style pool for %s (it has pools for: %s); resumed with "
                           "empty pools there, so this run draws other styles than an uninterrupted one would",
                           ", ".join(fresh), ", ".join(sorted(states)) or "none")
        for name, sampler in samplers.items():
            if name in states:
                sampler.load_state_dict(states[name])


# ---------------------------------------------------------------------------------------------
# the handler
# ---------------------------------------------------------------------------------------------
def _is_rank_zero() -> bool:
    """True unless this is a non-zero rank of a torch.distributed process group: every rank
    loads a saved state (they must agree), only rank 0 writes."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


class AtomicFileSaver(BaseSaveHandler):
    """ignite save handler: every checkpoint to the one file ``path`` with :func:`~msf_monai.files.atomic_save`
    (rank 0 only, tensors on the CPU; ``flatten``: the entry whose items go to the top level; ``saved``:
    called after each write). :meth:`remove` deletes nothing: ignite removes the previous item *before*
    it writes the next one, so a crash in between would leave no file; the atomic write replaces it."""

    def __init__(self, path: str | os.PathLike, flatten: str | None = None, saved: Callable[[], Any] = lambda: None):
        self.path, self.flatten, self.saved = Path(path), flatten, saved

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if not _is_rank_zero():
            return
        checkpoint = dict(checkpoint)
        checkpoint.update(checkpoint.pop(self.flatten) if self.flatten else {})
        atomic_save(detached_cpu_copy(checkpoint), self.path)
        self.saved()

    def remove(self, filename: str) -> None:
        """Nothing: the next write replaces the file (see the class doc)."""


class TrainingCheckpointer:
    """Latest full training state every ``interval`` epochs, best model on every improvement,
    and resume on start: two ignite ``Checkpoint`` handlers writing through :class:`AtomicFileSaver`.
    The latest state holds ``network``, ``optimizer``, ``lr_scheduler``, ``rng`` (:class:`RNGStates`),
    ``style_samplers`` (:class:`StyleSamplerStates`, where the network or a ``style_sources`` network has style pools) and this object's :meth:`state_dict`, all at the top level (:mod:`msf_monai.saved_state`); the
    best model is a plain ``state_dict``, scored by the epoch of the validator's best metric (which
    moves on exactly when the key metric improves, whichever way the metric compares).

    Attach to a MONAI ``SupervisedTrainer`` after its ``ValidationHandler`` (so that the
    validation of an epoch has run when the epoch's checkpoint is written). In multi-GPU
    training every rank loads the saved state and only rank 0 writes.

    Args:
        network, optimizer: trained objects (``state_dict``/``load_state_dict``).
        path: the latest full training state (e.g. ``models/phase1_model_resume.pt``).
        best_path: where the best model's weights go (a plain ``state_dict``, what the bundle's
            ``CheckpointLoader`` and ``torch.load(weights_only=True)`` read); ``None``: not saved.
        validator: the MONAI evaluator whose ``state.best_metric`` / ``best_metric_epoch`` say
            when the key metric improved; restored on resume so a worse metric after the
            restart never replaces the best model.
        lr_scheduler: optional scheduler whose state is saved too.
        interval: epochs between two saves of the latest state (the last epoch is always saved).
        resume: load ``path`` on start when it exists (``False``: start from scratch and replace it).
        settings: plain values (data folder, image size, ...) stored with the state;
            :func:`check_resume` compares them before a resumed run.
        style_sources: networks besides ``network`` whose style pools the state keeps, by name
            (``{"stylizer": ...}``, the frozen network that stylizes ``unet_mixstyleflow``'s
            batches; ``None`` entries are skipped); see :class:`StyleSamplerStates`.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        path: str | os.PathLike,
        best_path: str | os.PathLike | None = None,
        validator: Engine | None = None,
        lr_scheduler: Any = None,
        interval: int = 1,
        resume: bool = True,
        settings: Mapping | None = None,
        style_sources: Mapping[str, torch.nn.Module | None] | None = None,
    ):
        if int(interval) < 1:
            raise ValueError(f"checkpoint_interval must be >= 1 epoch, got {interval}")
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.path = Path(path)
        self.best_path = None if best_path is None else Path(best_path)
        self.validator = validator
        self.interval = int(interval)
        self.resume = _as_bool(resume)
        self.settings = plain_settings(settings)
        self.resumed_from: int | None = None
        self._engine: Engine | None = None
        self._why = ""  # of the save under way: "", "finished" or "mark"
        self._last_saved_epoch: int | None = None
        self._previous_sigint = None
        self._stop_requested = False
        self._objects = {"network": network, "optimizer": optimizer, "rng": RNGStates()}
        samplers = StyleSamplerStates(network, style_sources)
        if samplers.samplers():  # Phase III with style pools; Phase I's state has no such entry
            self._objects["style_samplers"] = samplers
        if lr_scheduler is not None:
            self._objects["lr_scheduler"] = lr_scheduler
        # one item, replaced at every save (each saver writes its own file, whatever the item's name)
        self._latest = Checkpoint({**self._objects, "run": self}, AtomicFileSaver(self.path, "run", self._log_saved),
                                  filename_pattern="latest", n_saved=1, greater_or_equal=True)
        self._best = None
        if self.best_path is not None and validator is not None:
            self._best = Checkpoint({"model": network}, AtomicFileSaver(self.best_path, saved=self._log_best),
                                    filename_pattern="best", score_function=self._best_metric_epoch, n_saved=1)

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        engine.add_event_handler(Events.STARTED, self.started)
        if self._best is not None:  # before the latest state, which records the best metric
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._best)
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=self._periodic), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save, "finished")
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._stop_if_asked)
        engine.add_event_handler(Events.COMPLETED, self._restore_sigint)

    # -- Ctrl-C ----------------------------------------------------------------------------
    # The first Ctrl-C lets the current iteration (or validation) finish and then stops with one
    # line and exit status 130; a second one stops at once (KeyboardInterrupt).
    def _interrupted_message(self, engine: Engine) -> str:
        saved = (f"the training state of epoch {self._last_saved_epoch} is in {self.path}"
                 if self._last_saved_epoch is not None else "no epoch had been saved yet")
        return (f"interrupted at epoch {engine.state.epoch} (iteration {engine.state.iteration}); "
                f"{saved}: run the same command to resume")

    def _install_sigint(self) -> None:
        if threading.current_thread() is threading.main_thread() and self._previous_sigint is None:
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        if self._stop_requested:
            self._restore_sigint()
            raise KeyboardInterrupt
        self._stop_requested = True
        print("Ctrl-C: stopping after the current iteration (press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def _restore_sigint(self, engine: Engine | None = None) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def _stop_if_asked(self, engine: Engine) -> None:
        if self._stop_requested:
            self._restore_sigint()
            raise InterruptedRun(self._interrupted_message(engine))

    def exception_raised(self, engine: Engine, error: BaseException) -> None:
        """Ctrl-C: say which epoch was interrupted and which saved state a rerun continues from."""
        self._restore_sigint()
        exit_on_interrupt(engine, error, self._interrupted_message(engine))

    # -- the run's own entries of the saved state --------------------------------------------
    def state_dict(self) -> dict:
        """The run's entries of the saved state: format, ``finished`` (with ``output_sha1``: the
        model this finished run vouches for, see :func:`require_finished_run`), epoch, iteration,
        the best validation metric and the settings."""
        engine, val_state = self._engine, getattr(self.validator, "state", None)
        finished = self._why == "finished"
        return {
            "format": RESUME_FORMAT,
            "version": RESUME_VERSION,
            "finished": finished,
            "epoch": int(engine.state.epoch),
            "iteration": int(engine.state.iteration),
            "max_epochs": None if engine.state.max_epochs is None else int(engine.state.max_epochs),
            "best_metric": None if val_state is None else float(getattr(val_state, "best_metric", -1)),
            "best_metric_epoch": None if val_state is None else int(getattr(val_state, "best_metric_epoch", -1)),
            "settings": dict(self.settings),
            "output_sha1": file_digest(self.best_path) if finished and self.best_path is not None
            and self.best_path.is_file() else None,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Put the saved epoch, iteration and best validation metric back into the engine and the
        validator (so a worse metric after the restart never replaces the best model)."""
        engine, epoch = self._engine, int(state["epoch"])
        if engine.state.max_epochs is not None and epoch > engine.state.max_epochs:
            raise ResumeError(f"the saved training state {self.path} is at epoch {epoch}, beyond max_epochs {engine.state.max_epochs}")
        engine.state.epoch, engine.state.iteration = epoch, int(state["iteration"])
        if self.validator is not None and state.get("best_metric") is not None:
            self.validator.state.best_metric = float(state["best_metric"])
            self.validator.state.best_metric_epoch = int(state["best_metric_epoch"])

    # -- saving ----------------------------------------------------------------------------
    def _periodic(self, engine: Engine, epoch: int) -> bool:
        """Every ``interval`` epochs but the last (its state is written on ``COMPLETED``, finished)."""
        return epoch % self.interval == 0 and (engine.state.max_epochs is None or epoch < engine.state.max_epochs)

    def _best_metric_epoch(self, engine: Engine | None = None) -> int:
        """The best model's score: the epoch of the validator's best key metric."""
        return int(getattr(self.validator.state, "best_metric_epoch", -1))

    def _log_best(self) -> None:
        state = self.validator.state
        name = getattr(state, "key_metric_name", None) or "key metric"
        logger.info("epoch %d: new best %s %.4f, saved the model to %s", self._best_metric_epoch(), name,
                    state.best_metric, self.best_path)

    def _log_saved(self) -> None:
        epoch = int(self._engine.state.epoch)
        if self._why == "mark":
            logger.info("epoch %d: marked the training state %s as unfinished until this run completes", epoch, self.path)
        else:
            self._last_saved_epoch = epoch
            logger.info("epoch %d: saved the training state to %s%s", epoch, self.path, " (finished)" if self._why else "")

    def save(self, engine: Engine, why: str = "") -> None:
        """Write the latest training state; ``why``: ``"finished"`` (the run completed) or
        ``"mark"`` (the unfinished mark at its start)."""
        self._why = why
        self._latest(engine)

    # -- resuming --------------------------------------------------------------------------
    def started(self, engine: Engine) -> None:
        self._install_sigint()
        if _is_rank_zero():
            remove_stale_temporaries(self.path)
            if self.best_path is not None:
                remove_stale_temporaries(self.best_path)
                # which data and split train this model: evaluation reads it back
                write_training_record(self.best_path, self.settings)
        mark = True
        if not self.resume:
            if self.path.is_file():
                logger.info("--resume false: the previous training state %s is replaced; training from scratch", self.path)
        elif not self.path.is_file():
            logger.info("no saved training state at %s: training from scratch", self.path)
        else:
            # the network, optimizer, scheduler, engine, validator and random generators, as saved
            state = load_resume_state(self.path, map_location="cpu")
            to_load = {"run": self, **self._objects}
            for key in ("lr_scheduler", "style_samplers"):  # absent from states saved without them
                if state.get(key) is None:
                    to_load.pop(key, None)
            Checkpoint.load_objects(to_load, {**state, "run": state})
            epoch = self.resumed_from = self._last_saved_epoch = int(state["epoch"])
            best = ""
            if state.get("best_metric_epoch") is not None and int(state["best_metric_epoch"]) > 0:
                best = f", best validation metric {float(state['best_metric']):.4f} at epoch {int(state['best_metric_epoch'])}"
            logger.info("Resuming from %s at epoch %d of %s%s", self.path, epoch, engine.state.max_epochs, best)
            mark = bool(state.get("finished"))  # an unfinished state already says so
        # ignite's record of this run's items: the latest state is replaced at every save, the
        # best model once the validator's best epoch moves past the (restored) one
        self._latest.reset()
        if self._best is not None:
            self._best.load_state_dict({"_saved": [(self._best_metric_epoch(), "best")]})
        # from now on the state next to the model says "unfinished" until this run completes:
        # a run killed before its first checkpoint (or a --resume false run replacing a finished
        # one) never leaves the previous run's "finished" next to a model it may have replaced
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            # every rank has read the saved state (or seen none) before rank 0 replaces it
            dist.barrier()
        if mark:
            self.save(engine, "mark")
