"""Unseen test sites kept in folders of their own (``--test_dirs``), next to the training data.

The papers train on one data set and test on others: MSD Task05 as the source, the six sites of
the multi-site prostate set as unseen targets. Each test folder is read with the task's own
data-list function, so it may be in any layout the task reads; its sites are named by folder
(the site sub-folders of a multi-site folder, the folder itself for an ``images/``+``labels/``
one).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .core import DataListError
from .validation import exit_on_data_errors

__all__ = ["external_datalist", "parse_test_dirs"]


@exit_on_data_errors
def parse_test_dirs(test_dirs) -> list[str]:
    """``--test_dirs`` as a list of folders: one path, a comma-separated string, or a list/tuple
    (as ``monai.bundle run``/``fire`` give ``"['a','b']"`` or ``a,b``); ``None``/empty: none."""
    if test_dirs is None or test_dirs == "" or test_dirs == []:
        return []
    if isinstance(test_dirs, (str, os.PathLike)):
        parts = [p.strip() for p in str(test_dirs).split(",")]
    elif isinstance(test_dirs, Sequence):
        parts = [str(p).strip() for p in test_dirs]
    else:
        raise DataListError([f"--test_dirs {test_dirs!r}: give a folder or a list of folders"])
    return [p for p in parts if p]


@exit_on_data_errors
def external_datalist(test_dirs, lister: Callable[..., list[dict]], source_sites: Sequence[str] = (), **kwargs) -> list[dict] | None:
    """Every case of the ``test_dirs`` folders, read with ``lister`` (e.g.
    :func:`msf_monai.tasks.prostate.prostate_datalist`; ``kwargs`` go to it), or ``None`` when no folder is
    given (evaluation then takes the unseen sites of ``dataset_dir``). Items get ``test_dir``.

    Stops with one error naming every problem: a site that two folders both give, or a test
    site named like a training (``source_sites``) site, would mix cases in one row of the table.
    """
    folders = parse_test_dirs(test_dirs)
    if not folders:
        return None
    items: list[dict] = []
    origin: dict[str, str] = {}
    problems: list[str] = []
    for folder in folders:
        path = Path(folder).expanduser().absolute()
        found = lister(str(path), **kwargs)
        for site in sorted({str(it["site"]) for it in found}):
            if site in origin and origin[site] != str(path):
                problems.append(f"site {site!r} is in two test folders: {origin[site]} and {path}; rename one")
            elif site in source_sites:
                problems.append(f"test site {site!r} ({path}) has the name of a training site; rename its folder")
            origin[site] = str(path)
        items += [dict(it, test_dir=str(path)) for it in found]
    if problems:
        raise DataListError(problems)
    return items
