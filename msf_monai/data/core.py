"""The shared core of the data lists of every task: the error type that collects problems,
file-name and folder helpers, and the split of a data list by patient.

The tasks' data lists (:mod:`msf_monai.tasks.prostate.lists`, :mod:`msf_monai.tasks.fundus.lists`)
build on these public names.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from ..errors import MsfError

__all__ = [
    "DataListError",
    "broken_link_problem",
    "check_root",
    "group_by_site",
    "is_broken_link",
    "is_visible",
    "natural_key",
    "pair_by_case",
    "patient_key",
    "same_output_name_problems",
    "split_by_patient",
]

_IGNORED_DIRS = {"__macosx"}


class DataListError(MsfError):
    """Problems found while building a data list; ``problems`` lists each one."""

    def __init__(self, problems: Sequence[str] | str, root=None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems: list[str] = list(problems)
        self.root = None if root is None else str(root)
        where = f" in {self.root}" if self.root else ""
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} found{where}:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))



def natural_key(text: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def is_visible(path: Path) -> bool:
    """False for hidden files, macOS ``._`` resource forks and ``__MACOSX`` folders."""
    return not path.name.startswith(".") and path.name.lower() not in _IGNORED_DIRS


def is_broken_link(path: Path) -> bool:
    """A symbolic link whose target is missing (or that loops back on itself)."""
    return path.is_symlink() and not path.exists()


def broken_link_problem(path: Path) -> str | None:
    """The problem text for a broken symbolic link, else ``None``."""
    if not is_broken_link(path):
        return None
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return f"broken symbolic link: {path} -> {target} (its target is missing or the link loops)"



def check_root(root) -> Path:
    if root is None or str(root) == "":
        raise DataListError(["no data root given"])
    path = Path(root).expanduser()
    if not path.exists():
        raise DataListError([f"data root does not exist: {path}"], root=path)
    if not path.is_dir():
        raise DataListError([f"data root is not a folder: {path}"], root=path)
    if not any(is_visible(p) for p in path.iterdir()):
        raise DataListError([f"data root is empty: {path}"], root=path)
    return path.absolute()



def pair_by_case(images: Iterable[tuple[str, Path]], labels: Iterable[tuple[str, Path]], problems: list[str],
                 missing_label: Callable[[str, Path], str], missing_image: Callable[[str, Path], str],
                 label_word: str = "label", prefer_same_name: bool = False) -> list[tuple[str, Path, Path]]:
    """Pair images and labels given as ``(case, path)``: ``(case, image, label)`` for every case
    with one of each, in natural order of the cases.

    A case with several images or labels, an image without a label and a label without an
    image are appended to ``problems``, each naming the files; ``missing_label(case, image)``
    and ``missing_image(case, label)`` say where the partner was looked for, ``label_word``
    names the label kind (``"label"``, ``"mask"``). ``prefer_same_name``: when a case has
    several files on one side, the ones whose whole name also exists on the other side are
    taken (``x.nii`` with ``x.nii`` when ``x.nii.gz`` lies next to it)."""
    def by_case(named):
        out: dict[str, list[Path]] = {}
        for case, path in named:
            out.setdefault(case, []).append(path)
        return out

    imgs, labs = by_case(images), by_case(labels)
    pairs = []
    for case in sorted(set(imgs) | set(labs), key=natural_key):
        i, lab = imgs.get(case, []), labs.get(case, [])
        if prefer_same_name and len(i) > 1 and lab:
            i = [p for p in i if any(q.name == p.name for q in lab)] or i
        if prefer_same_name and len(lab) > 1 and i:
            lab = [q for q in lab if any(q.name == p.name for p in i)] or lab
        if len(i) > 1:
            problems.append(f"several images for case {case!r}: " + ", ".join(map(str, i)))
        if len(lab) > 1:
            problems.append(f"several {label_word}s for case {case!r}: " + ", ".join(map(str, lab)))
        if i and not lab:
            problems.extend(f"image without {label_word}: {p} ({missing_label(case, p)})" for p in i)
        elif lab and not i:
            problems.extend(f"{label_word} without image: {q} ({missing_image(case, q)})" for q in lab)
        elif len(i) == 1 and len(lab) == 1:
            pairs.append((case, i[0], lab[0]))
    return pairs


def patient_key(item: Mapping) -> tuple[str, str]:
    """The patient identity of an item: ``(site, case)``.

    Case ids restart in every site of the multi-site layout (``BIDMC/Case00`` and
    ``HK/Case00`` are different patients), so the site is part of the key.
    """
    return (str(item.get("site", "")), str(item["case"]))


def split_by_patient(items: Iterable[Mapping], val_fraction: float = 0.2,
                     seed: int = 0) -> tuple[list, list]:
    """Split items into (train, val) so that no patient is in both.

    Patients (see :func:`patient_key`) are shuffled with ``seed`` (independently of the input
    order) and drawn per site in proportion, so every site keeps its share.  With
    ``val_fraction > 0`` and at least two patients, val holds at least one patient and train
    at least one.  Items keep their input order inside each part.
    """
    items = list(items)
    vf = float(val_fraction)
    if not 0.0 <= vf < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_site: dict[str, list[tuple[str, str]]] = {}
    for key in sorted({patient_key(it) for it in items},
                      key=lambda k: (natural_key(k[0]), natural_key(k[1]))):
        by_site.setdefault(key[0], []).append(key)
    n_total = sum(len(v) for v in by_site.values())
    n_val = int(round(vf * n_total))
    if vf > 0 and n_total >= 2:
        n_val = min(max(n_val, 1), n_total - 1)
    rng = random.Random(int(seed))
    for keys in by_site.values():
        rng.shuffle(keys)
    # proportional allocation per site (largest remainder), then take the first keys
    quota = {s: vf * len(k) for s, k in by_site.items()}
    alloc = {s: min(int(q), len(by_site[s])) for s, q in quota.items()}
    rest = n_val - sum(alloc.values())
    order = sorted(by_site, key=lambda s: (-(quota[s] - int(quota[s])), rng.random()))
    while rest > 0:
        progressed = False
        for s in order:
            if rest > 0 and alloc[s] < len(by_site[s]):
                alloc[s] += 1
                rest -= 1
                progressed = True
        if not progressed:
            break
    while rest < 0:  # rounding gave too many: take back from the largest allocations
        s = max(alloc, key=lambda k: alloc[k])
        alloc[s] -= 1
        rest += 1
    val_keys = {k for s, keys in by_site.items() for k in keys[: alloc[s]]}
    train = [it for it in items if patient_key(it) not in val_keys]
    val = [it for it in items if patient_key(it) in val_keys]
    return train, val


def group_by_site(items: Iterable[Mapping]) -> dict[str, list]:
    """``{site: [items]}`` with sites in natural sort order, items in input order."""
    groups: dict[str, list] = {}
    for it in items:
        groups.setdefault(str(it.get("site", "")), []).append(it)
    return {s: groups[s] for s in sorted(groups, key=natural_key)}


def same_output_name_problems(named: Sequence[tuple[str, Path]]) -> list[str]:
    """Problems for inference inputs that would write the same output: ``named`` holds
    ``(name, path)`` pairs, ``name`` being the file name without its extension, from which the
    mask's name is made (``Case00.nii`` and ``Case00.nii.gz`` both give ``Case00_seg.nii.gz``;
    ``x.png`` and ``x.jpg`` both ``x_mask.png``). Names that differ only in letter case count as
    the same: they are one file on macOS and Windows."""
    groups: dict[str, list[tuple[str, Path]]] = {}
    for name, path in named:
        groups.setdefault(name.casefold(), []).append((name, path))
    problems = []
    for group in groups.values():
        if len(group) > 1:
            names = sorted({n for n, _ in group})
            case = " (names that differ only in letter case are one file on macOS and Windows)" if len(names) > 1 else ""
            problems.append(f"{len(group)} images would write the same mask and style-shift row (name "
                            f"{' / '.join(repr(n) for n in names)}){case}: {', '.join(str(p) for _, p in group)}; "
                            "keep one of them in the input folder, or rename the others")
    return problems
