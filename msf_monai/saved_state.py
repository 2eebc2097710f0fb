"""The saved training state's file format: what a resumable run writes next to its model
(``<model>_resume.pt``) and what the checks before a run and the evaluation read back.

Written by :class:`msf_monai.resume.TrainingCheckpointer` and Phase II's flow fitter
(:class:`msf_monai.handlers.StyleFlowFitter`); read by :func:`load_resume_state` (and through it
by :mod:`msf_monai.resume`'s checks and :func:`msf_monai.training_record.read_training_record`).
A state is a dict of tensors and plain Python values (``torch.load(weights_only=True)`` reads
it) with ``format`` = :data:`RESUME_FORMAT` and the run's ``settings``, which
:func:`setting_differences` compares with a new run's (:func:`plain_settings`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .errors import MsfError

__all__ = [
    "RESUME_FORMAT",
    "RESUME_VERSION",
    "ResumeError",
    "detached_cpu_copy",
    "load_resume_state",
    "plain_settings",
    "setting_differences",
]

RESUME_FORMAT = "msf_monai.resume"
RESUME_VERSION = 1


class ResumeError(MsfError):
    """A saved training state cannot be used (unreadable, other data or settings, fewer epochs
    asked for than already trained); message only and exit status 1 when uncaught."""


def load_resume_state(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read a resume file written by :class:`~msf_monai.resume.TrainingCheckpointer` or the Phase II flow fitter;
    :class:`ResumeError` naming the file when it is not one."""
    try:
        state = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure: the file is named
        raise ResumeError(
            f"cannot read the saved training state {path} ({type(err).__name__}: {err}). "
            "Delete it, or run with --resume false to start this phase from scratch."
        ) from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ResumeError(f"{path} is not a saved training state of this toolkit; delete it or run with --resume false")
    return state


def plain_settings(settings: Mapping | None) -> dict:
    """``settings`` as values a resume file can hold and compare: paths as strings, numpy scalars
    as Python numbers, anything else unknown as its ``str``."""
    out = {}
    for key, value in dict(settings or {}).items():
        if isinstance(value, (os.PathLike,)):
            value = os.fspath(value)
        elif isinstance(value, (tuple, list)):
            value = [v.item() if isinstance(v, np.generic) else v for v in value]
        elif isinstance(value, np.generic):
            value = value.item()
        elif value is not None and not isinstance(value, (bool, int, float, str, dict)):
            value = str(value)
        out[str(key)] = value
    return out


def setting_differences(saved: Mapping, current: Mapping) -> list[str]:
    """One ``"key: saved ..., now ..."`` line per setting that differs."""
    return [f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def detached_cpu_copy(value: Any) -> Any:
    """A detached CPU copy of nested dicts/lists of tensors (an optimiser state)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, Mapping):
        return {k: detached_cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(detached_cpu_copy(v) for v in value)
    return value
