"""Which data and split trained a checkpoint: a small JSON record written next to it.

Evaluation must never count a training patient as a source-site result. The split of the
source site into training and validation patients depends on the run's ``source_site``,
``seed`` and ``val_fraction``; a training run writes them (with the data folder and image size)
to ``models/<checkpoint stem>_training.json`` when it starts, and ``evaluate.json`` reads them
back (:func:`read_training_record`) to evaluate exactly the validation side of that split, or
refuses settings that would give another one (:func:`msf_monai.bundle.evaluation_split`).

``model.pt`` and ``model_final.pt`` share the record ``model_training.json``. Runs made before
the record existed still have their settings in the saved training state
(``model_resume.pt``), which is read instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from .errors import ConfigValueError
from .files import atomic_write_json
from .saved_state import load_resume_state

__all__ = ["read_training_record", "training_record_file", "write_training_record"]

_FINAL = "_final"


def _base(checkpoint: str | os.PathLike) -> Path:
    """``models/model_final.pt`` -> ``models/model``: the name shared by a run's files."""
    path = Path(checkpoint)
    stem = path.stem[: -len(_FINAL)] if path.stem.endswith(_FINAL) else path.stem
    return path.with_name(stem)


def training_record_file(checkpoint: str | os.PathLike) -> Path:
    """Where the record of the run that wrote ``checkpoint`` lives."""
    base = _base(checkpoint)
    return base.with_name(base.name + "_training.json")


def write_training_record(checkpoint: str | os.PathLike, settings: Mapping) -> Path:
    """Write (atomically) the settings of the run that trains ``checkpoint``."""
    path = training_record_file(checkpoint)
    atomic_write_json(path, {"checkpoint": Path(checkpoint).name, "settings": dict(settings)})
    return path


def read_training_record(checkpoint: str | os.PathLike) -> dict | None:
    """``{"settings": {...}, "file": path}`` of the run that trained ``checkpoint``, from its
    ``*_training.json`` record or else its saved training state; ``None`` when there is neither
    (a bare checkpoint, e.g. someone else's weights)."""
    record = training_record_file(checkpoint)
    if record.is_file():
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError) as err:
            raise ConfigValueError(f"cannot read the training record {record} ({err}); delete it to evaluate without it") from None
        return {"settings": dict(data.get("settings") or {}), "file": str(record)}
    base = _base(checkpoint)
    state_file = base.with_name(base.name + "_resume.pt")
    if state_file.is_file():
        settings = load_resume_state(state_file).get("settings") or {}
        if settings:
            return {"settings": dict(settings), "file": str(state_file)}
    return None
