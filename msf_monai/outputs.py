"""One inference run per output folder: a listing of the folder never mixes two runs.

Inference writes one mask per input image (named after the image) and ``style_shift.csv`` into
``output_dir``. A second run into the same folder would replace the masks of the images both
runs share, replace the CSV, and leave the first run's other masks next to it: a listing that
looks like one run but is not. So :class:`InferenceRunRecord`, which the bundles' inference
config calls before any work, allows

* a new, missing or empty folder (hidden files such as ``.DS_Store`` do not count);
* a folder that an earlier inference run wrote (it holds that run's ``inference_run.json``)
  only with ``--overwrite true``: the earlier run's files are then all removed, after the data
  check passed and before the first new mask is written, so the folder holds this run alone.

Anything else is refused with a :class:`~msf_monai.bundle.ConfigValueError` (message only, exit
status 1), and nothing is deleted: a folder with files inference did not write (even with
``--overwrite true``), sub-folders, or the input folder itself.

``inference_run.json`` records which run the files belong to (input folder, checkpoint, start
time) and, once the run completes, its end time and number of cases; ``"finished": null`` marks
a run that stopped early (its masks are incomplete).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from ignite.engine import Engine, Events

from .bundle import ConfigValueError
from .cli import as_bool
from .files import atomic_write_json

__all__ = ["RECORD_NAME", "InferenceRunRecord"]

logger = logging.getLogger("msf_monai.outputs")

#: the file that marks a folder as an inference run's output folder
RECORD_NAME = "inference_run.json"
RECORD_FORMAT = "msf_monai.inference_run/1"
_SHOWN = 5  # file names listed in a message


def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def _visible_entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _names(paths) -> str:
    paths = list(paths)
    shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in paths[:_SHOWN])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > _SHOWN else "")


class InferenceRunRecord:
    """Checks, clears and records an inference run's output folder (see the module docstring).

    In the bundles' ``inference.json``: :meth:`check` early in ``initialize`` (a refusal costs
    nothing), :meth:`start` after the data check (removes the earlier run's files when
    ``overwrite``, writes ``inference_run.json``), and the object itself among the evaluator's
    handlers, last, so that the record is completed after the masks and ``style_shift.csv``.

    Args:
        output_dir: the folder the masks are written to.
        input_dir: the folder of images (never accepted as ``output_dir``, nor a folder inside
            which it lies).
        overwrite: replace an earlier inference run's outputs in ``output_dir``
            (``true``/``false``, see :func:`msf_monai.cli.as_bool`).
        checkpoint: the model file, written to the record.
    """

    def __init__(self, output_dir, input_dir=None, overwrite=False, checkpoint=None):
        self.output_dir = Path(output_dir)
        self.input_dir = None if input_dir is None else Path(input_dir)
        try:
            self.overwrite = as_bool(overwrite, "--overwrite")
        except ValueError as err:
            raise ConfigValueError(f"{err}; nothing was run or deleted.") from None
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.record: dict = {}
        self.cases = 0

    @property
    def record_file(self) -> Path:
        return self.output_dir / RECORD_NAME

    def _refuse(self, why: str) -> None:
        raise ConfigValueError(f"--output_dir {self.output_dir} {why}; nothing was run or deleted.")

    def check(self) -> list[Path]:
        """The files of an earlier run that :meth:`start` will remove (empty for a new or empty
        folder); a :class:`ConfigValueError` when the folder cannot be used."""
        out = self.output_dir
        if self.input_dir is not None:
            inp, res = self.input_dir.resolve(), out.resolve()
            if inp == res or res in inp.parents:
                self._refuse(f"is the input folder {self.input_dir} or holds it: masks would be mixed with the images "
                             "(and read as images by the next run). Choose another --output_dir")
        if not out.exists():
            return []
        if not out.is_dir():
            self._refuse("exists and is not a folder")
        entries = _visible_entries(out)
        if not entries:
            return []
        ours = self.record_file.is_file()
        if not ours:
            self._refuse(f"holds files that no inference run of this bundle wrote ({_names(entries)}), as it has no "
                         f"{RECORD_NAME}: a run's outputs are never mixed with other files, and --overwrite only "
                         "replaces an earlier inference run's outputs. Choose a new or empty --output_dir "
                         "(or empty this one yourself)")
        folders = [p for p in entries if p.is_dir()]
        if folders:
            self._refuse(f"holds sub-folders ({_names(folders)}) that inference does not write; --overwrite deletes "
                         "no folder. Choose a new or empty --output_dir (or remove them yourself)")
        if not self.overwrite:
            earlier = self._earlier_run()
            self._refuse(f"already holds the outputs of an earlier inference run{earlier} ({_names(entries)}): "
                         "a run's outputs are never mixed with another's. Choose a new --output_dir, or pass "
                         "--overwrite true to replace that run's outputs")
        return entries

    def _earlier_run(self) -> str:
        try:
            record = json.loads(self.record_file.read_text())
        except (OSError, ValueError):
            return ""
        state = "finished" if record.get("finished") else "did not finish"
        return f" (started {record.get('started')} on {record.get('input_dir')}, {state})"

    def start(self) -> dict:
        """Check again, remove the earlier run's files (``overwrite``), write the record."""
        earlier = self.check()
        for path in earlier:
            path.unlink()
        if earlier:
            logger.info("removed the %d file(s) of the earlier inference run in %s (--overwrite true)",
                        len(earlier), self.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.cases = 0
        self.record = {
            "format": RECORD_FORMAT,
            "input_dir": None if self.input_dir is None else str(self.input_dir),
            "checkpoint": self.checkpoint,
            "started": _now(),
            "finished": None,
            "cases": None,
        }
        self._write()
        return self.record

    def _write(self) -> None:
        atomic_write_json(self.record_file, self.record, indent=2)

    # evaluator handler ---------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._count)
        engine.add_event_handler(Events.COMPLETED, self._finish)

    def _count(self, engine: Engine) -> None:
        batch = engine.state.batch
        if isinstance(batch, list):
            self.cases += len(batch)
        elif isinstance(batch, dict) and "image" in batch:
            self.cases += len(batch["image"])

    def _finish(self, engine: Engine) -> None:
        if not self.record:  # start() was not called (e.g. a config without it)
            return
        self.record.update(finished=_now(), cases=self.cases)
        self._write()
        logger.info("inference outputs of %d case(s) in %s (%s)", self.cases, self.output_dir, RECORD_NAME)
