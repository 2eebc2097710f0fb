"""Small data sets written by tests: NIfTI cases in the ``images/`` + ``labels/`` layout, 4-D images,
and the public data sets' archive layouts made from synthetic volumes."""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from msf_monai.data.prepare import MULTISITE_PROSTATE_SITES
from msf_monai.tasks.prostate import generate_demo_prostate


# ---------------------------------------------------------------------------------------------
# tiny volumes (4 volumes of 32 x 32 x 6 voxels: a Phase I epoch takes about a second)
# ---------------------------------------------------------------------------------------------
def volume(rng, shape=(32, 32, 6), foreground=True):
    image = rng.normal(100, 20, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    if foreground:
        label[10:22, 12:24, 1:5] = 1
        image[label > 0] += 80
    return image, label


def write_case(root: Path, name: str, image, label, affine=None, label_affine=None):
    affine = np.eye(4) if affine is None else affine
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    if image is not None:
        nib.save(nib.Nifti1Image(image, affine), root / "images" / f"{name}.nii.gz")
    if label is not None:
        nib.save(nib.Nifti1Image(label, affine if label_affine is None else label_affine), root / "labels" / f"{name}.nii.gz")


def tiny_dataset(root: Path, n: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        write_case(root, f"case{i}", *volume(rng))
    return root


# ---------------------------------------------------------------------------------------------
# single NIfTI files and a 4-D image
# ---------------------------------------------------------------------------------------------
def nifti(path: Path, shape=(32, 32, 4), seed: int = 0, label: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if label:
        data = np.zeros(shape, np.uint8)
        data[8:20, 10:24, 1:3] = 1
    else:
        data = rng.normal(100, 20, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.6, 0.6, 3.0, 1.0])), str(path))
    return path


def data_with_a_4d_image(data):
    """Two 3-D cases and ``multi.nii.gz``, a 2-channel 4-D image (plain images/ + labels/ layout)."""
    for i in range(2):
        nifti(data / "images" / f"case{i}.nii.gz", seed=i)
        nifti(data / "labels" / f"case{i}.nii.gz", label=True)
    four_d = nifti(data / "images" / "multi.nii.gz", shape=(32, 32, 4, 2))
    nifti(data / "labels" / "multi.nii.gz", label=True)
    return four_d


# ---------------------------------------------------------------------------------------------
# the public data sets' layouts (scripts/prepare_data.py)
# ---------------------------------------------------------------------------------------------
def synthetic_volumes(root: Path) -> list[tuple[Path, Path]]:
    """12 small synthetic cases (image and zone label files) to arrange into each layout."""
    generate_demo_prostate(root, seed=4, cases_per_site=3, shape=(40, 40, 8))
    pairs = []
    for site in sorted(p for p in root.iterdir() if p.is_dir()):
        for image in sorted(site.glob("Case??.nii.gz")):
            pairs.append((image, site / image.name.replace(".nii.gz", "_segmentation.nii.gz")))
    return pairs


def zoned(label_path):
    """The label with a second zone (value 2) in its upper half, as the public sets store it."""
    img = nib.load(str(label_path))
    data = np.asarray(img.dataobj).astype(np.uint8)
    data[: data.shape[0] // 2][data[: data.shape[0] // 2] > 0] = 2
    return nib.Nifti1Image(data, img.affine)


def msd_archive(tmp_path, volumes, n=8, with_labels=True):
    task = tmp_path / "src" / "Task05_Prostate"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    for i, (image, label) in enumerate(volumes[:n]):
        img = nib.load(str(image))
        t2 = np.asarray(img.dataobj).astype(np.float32)
        four_d = np.stack([t2, t2[::-1]], axis=-1)  # T2 and a stand-in ADC channel
        nib.save(nib.Nifti1Image(four_d, img.affine), task / "imagesTr" / f"prostate_{i:02d}.nii.gz")
        if with_labels:
            nib.save(zoned(label), task / "labelsTr" / f"prostate_{i:02d}.nii.gz")
    (task / "dataset.json").write_text(json.dumps({"name": "Prostate", "modality": {"0": "T2", "1": "ADC"}}))
    (task / "imagesTr" / "._prostate_00.nii.gz").write_bytes(b"macOS resource fork")
    archive = tmp_path / "Task05_Prostate.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(task, arcname="Task05_Prostate")
    return archive


def multisite_zip(tmp_path, volumes, sites=MULTISITE_PROSTATE_SITES):
    base = tmp_path / "six" / "Processed_data_nii"
    for k, site in enumerate(sites):
        (base / site).mkdir(parents=True)
        for j, (image, label) in enumerate(volumes[2 * k % len(volumes): 2 * k % len(volumes) + 2]):
            shutil.copy(image, base / site / f"Case{j:02d}.nii.gz")
            spelled = "Segmentation" if site == "I2CVB" else "segmentation"  # both spellings exist
            nib.save(zoned(label), base / site / f"Case{j:02d}_{spelled}.nii.gz")
    archive = tmp_path / "multisite.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in base.rglob("*"):
            zf.write(path, path.relative_to(base.parent))
    return archive


def labels_merged(folder):
    for label in folder.rglob("*egmentation.nii.gz"):
        assert set(np.unique(np.asarray(nib.load(str(label)).dataobj))) <= {0, 1}, label
