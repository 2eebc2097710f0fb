"""One training run per checkpoint: a lock file next to each checkpoint a phase writes.

Two runs of the same phase on the same checkpoint would overwrite each other's models and
training state, and a second launch would resume from the state the first one is still
writing; both would end with exit status 0. So Phase I, II and III take, before any work,
the lock of the checkpoint they write (:class:`CheckpointLock`): ``<checkpoint>.lock``, e.g.
``models/phase1_model.pt.lock``, ``models/model_dsu.pt.lock``, ``models/style_flows.pt.lock``.

The granularity is one checkpoint *file*, not the models folder: Phase III runs of different
methods write different checkpoints (``model.pt``, ``model_dsu.pt``, ...) and may run at the
same time into one models folder; only runs that would write the same file exclude each other.

How the lock works:

* The lock file is held with an OS file lock (``flock``) for the whole run, and names its
  holder (process id, host, start time, command). The operating system drops the file lock
  when the process ends in any way, ``kill -9`` included, so a lock whose file lock is free
  was left by a run that ended without releasing it: it is *stale* and the next run takes it
  over with a notice naming the process that left it.
* A held lock stops the second run with :class:`msf_monai.bundle.CheckpointLockedError`
  (message only, exit status 1): the lock file, the holder's process id, host, start time and
  command, and what to do.
* A lock file written on another host is never taken over automatically (this host cannot
  tell whether that run still goes on, and a network file system may not share file locks
  between hosts): the message says to delete the lock file once that run is over.
* Where the file system has no ``flock`` (some network mounts) the process id decides: a lock
  naming a live process of this host is respected, one naming a dead process is stale.
* The lock is released (the file removed) when the process exits, normally or by an
  exception; in a multi-GPU (``torchrun``) run only rank 0, the rank that writes the
  checkpoints, takes it.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from .errors import CheckpointLockedError

__all__ = ["CheckpointLock", "describe_holder", "lock_checkpoint", "lock_holder", "lock_path"]

logger = logging.getLogger("msf_monai.locks")

LOCK_SUFFIX = ".lock"
#: locks this process holds, by absolute lock path: a run that refers to its lock twice (or a
#: later run in the same Python process) gets the one it already holds
_HELD: dict[str, CheckpointLock] = {}

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: the process id decides
    fcntl = None


def lock_path(checkpoint: str | os.PathLike) -> Path:
    """The lock file of ``checkpoint``: ``<checkpoint>.lock``."""
    return Path(f"{os.fspath(checkpoint)}{LOCK_SUFFIX}")


def _try_flock(fd: int) -> bool | None:
    """Take the OS file lock of ``fd`` without waiting: ``True`` taken, ``False`` held by another
    process, ``None`` not supported by this file system."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP, ENOSYS, ...: no file locks on this mount


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return True


def _read_info(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while True:
        block = os.read(fd, 65536)
        if not block:
            break
        raw += block
    try:
        info = json.loads(raw.decode("utf-8", "replace")) if raw.strip() else {}
    except ValueError:
        return {"unreadable": raw[:200].decode("utf-8", "replace")}
    return info if isinstance(info, dict) else {"unreadable": str(info)[:200]}


def describe_holder(info: dict) -> str:
    """The process a lock file names, in words (for messages)."""
    if not info or "pid" not in info:
        return "an unknown process (the lock file does not say which)"
    text = f"process {info['pid']} on host {info.get('host', '?')}"
    if info.get("started"):
        text += f", started {info['started']}"
    if info.get("command"):
        text += f", command: {info['command']}"
    return text


def _this_host(info: dict) -> bool:
    return info.get("host") in (None, socket.gethostname())


def _command_line() -> str:
    """This process's command as typed: ``python -m monai.bundle run ...`` rather than the
    path of ``monai/bundle/__main__.py``."""
    argv = list(sys.argv)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if argv and spec is not None and spec.name.endswith("__main__") and spec.parent:
        argv[0] = f"python -m {spec.parent}"
    elif argv and spec is not None and spec.name:
        argv[0] = f"python -m {spec.name}"
    return " ".join(argv)


def _is_writing_rank() -> bool:
    """False on the non-zero ranks of a ``torchrun`` launch (they never write checkpoints)."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


class CheckpointLock:
    """The lock of one checkpoint file, held from :meth:`acquire` to :meth:`release` (or the
    end of the process). See the module docstring for the rules.

    Args:
        checkpoint: the checkpoint the run writes (the lock is ``<checkpoint>.lock``).
    """

    def __init__(self, checkpoint: str | os.PathLike):
        self.checkpoint = Path(checkpoint)
        self.path = lock_path(checkpoint)
        self._fd: int | None = None
        self._owner: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None and self._owner == os.getpid()

    def acquire(self) -> CheckpointLock:
        """Take the lock, or raise :class:`msf_monai.bundle.CheckpointLockedError` when another
        run holds it. Returns the lock that this process holds (``self``, or the one it took
        earlier for the same checkpoint)."""
        if not _is_writing_rank():
            return self
        key = os.path.abspath(self.path)
        earlier = _HELD.get(key)
        if earlier is not None and earlier.held:
            return earlier
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                previous = self._take(fd)
            except BaseException:
                os.close(fd)
                raise
            if previous is None:  # the file was replaced while we opened it: try again
                os.close(fd)
                continue
            self._fd, self._owner = fd, os.getpid()
            self._write_info(fd)
            _HELD[key] = self
            atexit.register(self.release)
            return self
        raise CheckpointLockedError(f"could not take the lock {self.path}: other runs keep replacing it. "
                                    "Check which runs write to this models folder.")

    def _take(self, fd: int) -> dict | None:
        """Lock ``fd``; returns the previous holder's info (``{}`` for a new lock), or ``None``
        when ``fd`` no longer is the file at :attr:`path`. Raises when the lock is held."""
        got = _try_flock(fd)
        info = _read_info(fd)
        if got is False:
            if not info:  # its holder is writing its name right now
                time.sleep(0.2)
                info = _read_info(fd)
            raise CheckpointLockedError(self._held_message(info))
        try:
            if not os.path.samestat(os.fstat(fd), os.stat(self.path)):
                return None
        except FileNotFoundError:  # its holder released (removed) it in the meantime
            return None
        if not info:
            return {}
        if not _this_host(info):
            raise CheckpointLockedError(
                self._held_message(info) + f"\nThe lock was taken on another host, so this host cannot tell whether "
                f"that run still goes on. If it has ended, delete {self.path} and run again.")
        pid = info.get("pid")
        if got is None and isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
            # no file locks on this file system: a live process of this host still holds it
            raise CheckpointLockedError(self._held_message(info))
        logger.warning("took over the stale lock %s of %s: that run ended without releasing it (killed?); "
                       "its checkpoint %s is now written by this run (process %d)",
                       self.path, describe_holder(info), self.checkpoint, os.getpid())
        return info

    def _held_message(self, info: dict) -> str:
        return (
            f"another run is writing {self.checkpoint}: its lock {self.path} is held by {describe_holder(info)}.\n"
            "Two runs on one checkpoint would overwrite each other's models and training state, so this run "
            "stopped before any work. Wait for that run to end (or stop it) before running this command again, "
            "or give this run its own models folder (--ckpt_dir) or checkpoint file name."
        )

    @staticmethod
    def _write_info(fd: int) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": _command_line()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (nothing when this process does not hold it,
        e.g. in a forked data-loader worker)."""
        if not self.held:
            return
        fd, self._fd = self._fd, None
        _HELD.pop(os.path.abspath(self.path), None)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                os.unlink(self.path)  # while still locked: a waiting run then finds no file, or a new one
        except OSError:
            pass
        finally:
            os.close(fd)  # drops the file lock
        try:
            atexit.unregister(self.release)
        except Exception:  # noqa: BLE001 - best effort
            pass

    def __enter__(self) -> CheckpointLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_checkpoint(checkpoint: str | os.PathLike) -> str:
    """Take the lock of ``checkpoint`` for the rest of this process (the bundle configs call
    this before any work); returns the checkpoint path."""
    CheckpointLock(checkpoint).acquire()
    return os.fspath(checkpoint)


def lock_holder(checkpoint: str | os.PathLike) -> dict | None:
    """Who holds the lock of ``checkpoint`` now (the lock file's ``pid``, ``host``, ``started``,
    ``command``), or ``None`` when no run holds it (no lock file, or a stale one). A lock file
    of another host counts as held. Takes nothing."""
    path = lock_path(checkpoint)
    held = _HELD.get(os.path.abspath(path))
    if held is not None and held.held:
        return {"pid": os.getpid(), "host": socket.gethostname()}
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        info = _read_info(fd)
        if not _this_host(info):
            return info
        if fcntl is not None:
            try:  # a shared lock: free exactly when no run holds the exclusive one
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return None
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    return info or {"pid": "?"}
        pid = info.get("pid")
        return info if isinstance(pid, int) and _pid_alive(pid) else None
    finally:
        os.close(fd)
