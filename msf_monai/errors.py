"""The package's error policy: library code raises :class:`MsfError`, the process shows it.

Every problem a user can fix (a wrong setting, a missing or unreadable file, bad data, an
earlier phase that did not run) is an :class:`MsfError`: a ``ValueError`` whose message names
the file or setting and what to do. Being an ordinary exception, it can be caught with
``except ValueError`` (or ``except Exception``) by code that calls the library, and ignite's
``Events.EXCEPTION_RAISED`` handlers see it.

Only at the process boundary does it become a clean exit: importing ``msf_monai`` installs
:func:`show_user_errors` as ``sys.excepthook``, so an uncaught ``MsfError`` (also when MONAI's
config parser has wrapped it in its own ``RuntimeError``) prints its message alone, without a
traceback, and Python exits with status 1. Any other uncaught exception keeps its full
traceback. ``MSF_TRACEBACK=1`` in the environment shows the traceback of user errors too.
"""

from __future__ import annotations

import os
import sys

__all__ = [
    "CheckpointLockedError",
    "ConfigValueError",
    "MissingPhaseOutputError",
    "MsfError",
    "PhaseError",
    "UnfinishedPhaseError",
    "install_excepthook",
    "show_user_errors",
    "user_error_in",
]


class MsfError(ValueError):
    """A problem the user can fix, explained by its message; exit status 1 when uncaught."""


class MissingPhaseOutputError(MsfError):
    """A phase needs a file that an earlier phase writes.

    An :class:`~msf_monai.errors.MsfError`: catchable as a ``ValueError``; uncaught, the user
    sees its message alone (not MONAI's config-parser traceback) and exit status 1."""


class ConfigValueError(MsfError):
    """A config value that cannot work (e.g. an unknown ``style_method``), found before any work;
    message only and exit status 1 when uncaught."""


class PhaseError(MsfError):
    """A phase stopped on a problem it explains (e.g. a diverged flow fit); message only, exit 1."""


class CheckpointLockedError(PhaseError):
    """Another run holds the lock of the checkpoint this run would write (or read while it is
    being written); see :mod:`msf_monai.locks`. Message only, exit 1."""


class UnfinishedPhaseError(MissingPhaseOutputError):
    """A phase's input comes from an earlier phase's run that did not finish (or was replaced
    after it finished); see :func:`msf_monai.resume.require_finished_run`. Message only, exit 1."""


def user_error_in(error: BaseException | None) -> MsfError | None:
    """The :class:`MsfError` that ``error`` is or was raised from (following ``__cause__`` and
    ``__context__``, as MONAI's ``RuntimeError("Failed to evaluate ...") from err`` keeps it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, MsfError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def show_user_errors(exc_type, error, traceback, fallback=None) -> None:
    """``sys.excepthook``: the message of a user error alone; anything else as Python shows it."""
    found = user_error_in(error)
    if found is None or os.environ.get("MSF_TRACEBACK", "").strip() not in ("", "0"):
        (fallback or sys.__excepthook__)(exc_type, error, traceback)
        return
    print(str(found), file=sys.stderr, flush=True)


def install_excepthook() -> None:
    """Make :func:`show_user_errors` the process's ``sys.excepthook`` (once), keeping whatever
    hook was there for every other exception."""
    current = sys.excepthook
    if getattr(current, "_msf_user_errors", False):
        return

    def hook(exc_type, error, traceback):
        show_user_errors(exc_type, error, traceback, fallback=current)

    hook._msf_user_errors = True
    sys.excepthook = hook
