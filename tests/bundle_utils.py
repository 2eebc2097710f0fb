"""Helpers for tests that run bundle workflows as a user would: ``python -m monai.bundle run``
in a subprocess, on a copy of the bundle in a temporary folder (so the repository stays clean);
and a separate process that holds a checkpoint lock."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # this file is tests/bundle_utils.py
SHARED_DATA = REPO.parent / "shared" / "data"
TINY = ("--image_size", "32", "--batch_size", "8", "--val_interval", "1")  # training settings for a tiny data set


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: the geometry the task transforms are built with in tests unless a test says otherwise
TASK_DEFAULTS = {
    "prostate": {"image_size": 384, "resample": "resize", "pixel_spacing": 0.625, "field_of_view": 140},
    "fundus": {"image_size": 512},
}


def task_transform(task: str, name: str = "preprocessing", **ids):
    """The bundle's transform ``name`` (``preprocessing``, ``label_loader``, ``postprocessing``)
    for ``task``, built from ``bundles/<task>/configs/evaluate.json`` as a run would build it,
    with the config ids in ``ids`` (e.g. ``image_size=32, resample="spacing"``) over
    :data:`TASK_DEFAULTS`."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / task / "configs" / "evaluate.json"))
    parser.update({**TASK_DEFAULTS[task], **ids})
    return parser.get_parsed_content(name)


def copy_bundle(name: str, dest: Path) -> Path:
    """Copy ``bundles/<name>`` (configs and docs only: no models, outputs or demo data) to
    ``dest/bundles/<name>``."""
    target = dest / "bundles" / name
    shutil.copytree(REPO / "bundles" / name, target, ignore=shutil.ignore_patterns("models", "logs", "eval", "demo_data", "inference"))
    return target


def run_bundle(cwd: Path, config: str, *args: str, bundle: str = "prostate", timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run --config_file bundles/<bundle>/configs/<config>.json ARGS``
    from ``cwd``; returns the completed process (stdout and stderr merged)."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"bundles/{bundle}/configs/{config}.json", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess) -> str:
    """The output of a successful run; fails the test with the output's tail otherwise."""
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(proc.args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc.stdout


def assert_clean_failure(proc, *names):
    """The run failed, without a traceback, naming each of ``names``."""
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    for name in names:
        assert str(name) in proc.stdout, (name, proc.stdout[-3000:])


def inverted_label_dice(preprocessing, item: dict) -> float:
    """Dice, on the original grid, between a case's label file and its preprocessed label put
    back with ``Invertd`` (as inference puts predictions back): how well the preprocessing's
    geometry inverts. Fails if the restored mask is not on the original grid."""
    import nibabel as nib
    import numpy as np
    from monai.transforms import AsDiscrete, Invertd

    data = preprocessing(dict(item))
    data["pred"] = data["label"].clone()
    restored = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False)(data)["pred"]
    restored = AsDiscrete(threshold=0.5)(restored)[0].numpy() > 0
    original = np.asarray(nib.load(item["label"]).dataobj) > 0
    assert restored.shape == original.shape
    return float(2 * (restored & original).sum() / (restored.sum() + original.sum()))


_HOLDER = textwrap.dedent("""
    import sys, time
    from msf_monai.locks import CheckpointLock
    CheckpointLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def locking_process(checkpoint: Path) -> subprocess.Popen:
    """A separate Python process that holds the lock of ``checkpoint`` (for two minutes); kill it when done."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(checkpoint)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc
