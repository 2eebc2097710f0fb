"""Command-line helpers shared by the ``scripts/`` tools (``fire``) and the config options.

* :func:`as_bool` - one way to read a yes/no setting everywhere: ``true/false``, ``1/0``,
  ``yes/no``, ``on/off`` in any case (and real booleans); anything else is an error naming the
  setting. (``fire`` alone turns ``--reuse false`` into the string ``"false"``, which is true.)
* :func:`fire_main` - ``fire.Fire`` that prints the help and exits 0 for ``-h``/``--help``
  even when the function takes ``**overrides`` (plain ``fire`` would pass ``help=True`` on as a
  config id and run the script).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

__all__ = ["as_bool", "fire_main"]

_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")


def as_bool(value, name: str = "value") -> bool:
    """``value`` as a bool; a ``ValueError`` naming ``name`` for anything that is not clearly one."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise ValueError(f"{name} must be true or false (or 1/0, yes/no), got {value!r}")


def fire_main(fn: Callable, argv: Sequence[str] | None = None):
    """Run ``fn`` (a function, or a dict of commands) with ``fire`` on ``argv`` (default
    ``sys.argv[1:]``); ``-h``/``--help`` print the help (of the named command, for a dict) and
    exit 0 without running anything."""
    import fire

    args = list(sys.argv[1:] if argv is None else argv)
    options = args[: args.index("--")] if "--" in args else args
    if any(a in ("-h", "--help") for a in options):
        # a command of a multi-command tool (``prepare_data.py msd_prostate --help``) gets its own help
        words = [a for a in options if not a.startswith("-")]
        command = words[:1] if isinstance(fn, dict) and words and words[0] in fn else []
        return fire.Fire(fn, command=command + ["--", "--help"])
    return fire.Fire(fn, command=args)
