"""Write every bundle's phase configs from the shared templates in ``bundles/_templates``.

The workflow of each phase is the same for every task; only the data (lists, preprocessing,
augmentation, datasets, inferer, post-processing, writer) and a few defaults differ. So the
workflow lives once, in ``bundles/_templates/<phase>.json`` (Phase III is Phase I plus
``phase3.json``'s overrides, merged with MONAI's multi-file config loading), and each task
file ``bundles/_templates/<task>.json`` holds the task's ids:

* ``"common"``: ids for every phase; they never replace an id the phase template defines
  (e.g. Phase II's ``epochs`` are flow epochs); ``bundles/_templates/shared.json`` holds such ids
  that are the same for every task (the training augmentation);
* ``"<phase>"``: ids for that phase only; these replace the template's. A key may name several
  phases (``"phase2, phase3"``) for ids that they share; sections apply in the file's order.

The result, ``bundles/<task>/configs/<phase>.json``, is one self-contained file per phase, so a
user runs ``python -m monai.bundle run --config_file bundles/<task>/configs/<phase>.json``
and a packaged bundle needs nothing else. Only the ids a phase refers to are written.
``tests/unit/test_bundle_configs.py`` fails when a generated file is out of date.

Overlays (``OVERLAYS``: ``multi_gpu_train.json``) are not phases: they are merged on top of a
phase config at run time (``--config_file "['.../phase1.json','.../multi_gpu_train.json']"``)
and are the same for every task, so they are copied to each bundle unchanged.

    python scripts/build_configs.py            # write all bundles
    python scripts/build_configs.py --check    # exit 1 if any file is out of date
"""

from __future__ import annotations

import json
import re
import sys
from collections import OrderedDict
from pathlib import Path

from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "bundles" / "_templates"
PHASES = {
    "phase1": ["phase1.json"],
    "phase2": ["phase2.json"],
    "phase3": ["phase1.json", "phase3.json"],
    "evaluate": ["evaluate.json"],
    "inference": ["inference.json"],
}
# overlays merged at run time on top of a phase config (e.g. multi-GPU training on Phase I or
# III): the same for every task, written to each bundle as they are
OVERLAYS = {"multi_gpu_train": "multi_gpu_train.json"}
TASKS = ("prostate", "fundus")
#: ids that every task shares and several phases use (e.g. the training augmentation): like a
#: task's "common" ids (which may replace them), written to a phase only where it refers to them
SHARED = TEMPLATES / "shared.json"
_REF = re.compile(r"[@%]([A-Za-z_]\w*)")
_LAST = ("initialize", "run")


def _references(value) -> set[str]:
    """Top-level ids referred to (``@id``, ``@id#sub``, or copied: ``%id#sub``) anywhere in ``value``."""
    if isinstance(value, str):
        return set(_REF.findall(value))
    if isinstance(value, dict):
        return set().union(*(_references(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_references(v) for v in value)) if value else set()
    return set()


def _section_phases(task: str, key: str) -> list[str]:
    """The phases a task file's section names (``"phase2, phase3"``); an error naming the file
    for a name that is no phase (a misspelt section would be left out of every config)."""
    phases = [p.strip() for p in key.split(",")]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise ValueError(f"{TEMPLATES / f'{task}.json'}: section {key!r} names {', '.join(map(repr, unknown))}, "
                         f"which is no phase; sections are 'common' or phases among {', '.join(PHASES)}")
    return phases


def render(task: str, phase: str) -> OrderedDict:
    """The config of ``phase`` for ``task``, as written to the bundle."""
    base = ConfigParser.load_config_files([str(TEMPLATES / f) for f in PHASES[phase]])
    spec = json.loads((TEMPLATES / f"{task}.json").read_text(), object_pairs_hook=OrderedDict)
    common = json.loads(SHARED.read_text(), object_pairs_hook=OrderedDict)
    common.update(spec.get("common", {}))
    task_ids = OrderedDict((k, v) for k, v in common.items() if k not in base)
    for key, ids in spec.items():  # "<phase>" or several phases: "phase2, phase3"
        if key != "common" and phase in _section_phases(task, key):
            task_ids.update(ids)
    # keep the task ids that the phase uses, directly or through other task ids
    used, todo = set(), set().union(*(_references(v) for k, v in base.items() if k not in task_ids))
    while todo:
        key = todo.pop()
        if key in task_ids and key not in used:
            used.add(key)
            todo |= _references(task_ids[key])
    # ids that an overlay (e.g. phase3.json) adds are written with the other settings, before
    # the network and the workflow blocks, not after them
    first = ConfigParser.load_config_file(str(TEMPLATES / PHASES[phase][0]))
    added = [k for k in base if k not in first and k not in _LAST and k not in task_ids]
    out = OrderedDict()
    for key, value in base.items():
        if key == "bundle_root":
            out["bundle_name"] = spec["common"]["bundle_name"]
            out[key] = value
            out.update((k, v) for k, v in task_ids.items() if k in used and k != "bundle_name")
        elif key == "network_def":
            out.update((k, base[k]) for k in added)
            out[key] = value
        elif key not in _LAST and key not in task_ids and key not in out:
            out[key] = value
    for key in _LAST:
        if key in base:
            out[key] = base[key]
    return out


def dumps(config: dict) -> str:
    """JSON with 4-space indents and short lists of scalars on one line."""
    text = json.dumps(config, indent=4)

    def _inline(match: re.Match) -> str:
        items = [s.strip() for s in match.group(1).split(",\n")]
        flat = "[" + ", ".join(items) + "]"
        return flat if len(flat) <= 60 else match.group(0)

    return re.sub(r"\[\n\s+((?:[^\[\]{}\n]+,\n\s+)*[^\[\]{}\n]+)\n\s*\]", _inline, text) + "\n"


def main(check: bool = False) -> int:
    from msf_monai.cli import as_bool

    check = as_bool(check, "--check")
    stale = []
    for task in TASKS:
        folder = REPO / "bundles" / task / "configs"
        outputs = {phase: lambda t=task, p=phase: dumps(render(t, p)) for phase in PHASES}
        outputs.update({name: lambda f=file: dumps(json.loads((TEMPLATES / f).read_text(), object_pairs_hook=OrderedDict))
                        for name, file in OVERLAYS.items()})
        for phase, make in outputs.items():
            path = folder / f"{phase}.json"
            text = make()
            if path.is_file() and path.read_text() == text:
                continue
            stale.append(path)
            if not check:
                folder.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path.relative_to(REPO)}")
    if check and stale:
        print("out of date (run python scripts/build_configs.py):", *[str(p.relative_to(REPO)) for p in stale], sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    from msf_monai.cli import fire_main

    sys.exit(fire_main(main))
