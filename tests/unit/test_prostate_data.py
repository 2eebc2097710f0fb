"""Tests of the synthetic prostate demo generator and the prostate data lists."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bundle_utils import SHARED_DATA
from msf_monai.tasks.prostate import (
    build_datalist,
    DEMO_SITES,
    DEMO_SOURCE_SITE,
    detect_layout,
    ensure_demo_prostate,
    generate_demo_prostate,
    list_decathlon,
    list_image_label_folder,
    list_multisite,
    SITE_STYLES,
)
from msf_monai.data import DataListError, group_by_site, split_by_patient
from msf_monai.tasks.prostate import synthetic as sp

NCI = SHARED_DATA / "prostate_nci_isbi"
SMALL = (40, 40, 12)


def _load(path):
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "demo"
    summary = generate_demo_prostate(root, seed=3, cases_per_site=4, shape=SMALL)
    return root, summary


# ------------------------------------------------------------------------------------------
# generator
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_layout_and_files(small_demo):
    root, summary = small_demo
    assert list(DEMO_SITES)[0] == DEMO_SOURCE_SITE and len(DEMO_SITES) >= 4
    assert summary["sites"] == list(DEMO_SITES)
    assert summary["source_site"] == DEMO_SOURCE_SITE
    assert summary["cases_per_site"] == {s: 4 for s in DEMO_SITES}
    assert len(summary["items"]) == 4 * len(DEMO_SITES)
    info = json.loads((root / "demo_info.json").read_text())
    assert info["version"] == sp.GENERATOR_VERSION
    assert info["params"]["seed"] == 3 and info["params"]["shape"] == list(SMALL)
    cases = [it["case"] for it in summary["items"]]
    assert len(set(cases)) == len(cases)  # one synthetic patient per case id
    for site in DEMO_SITES:
        files = sorted(p.name for p in (root / site).iterdir())
        assert len(files) == 8
        assert all(f.startswith("Case") and f.endswith(".nii.gz") for f in files)
    for it in summary["items"]:
        img = nib.load(it["image"])
        lab = nib.load(it["label"])
        assert img.shape == SMALL and lab.shape == SMALL
        assert np.allclose(img.affine, lab.affine)
        zooms = img.header.get_zooms()
        assert np.allclose(zooms, [f / n for f, n in zip(sp.DEFAULT_FOV_MM, SMALL)], atol=1e-4)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert img.get_data_dtype() in (np.int16, np.float32)
        assert lab.get_data_dtype() == np.uint8
        arr, lbl = _load(it["image"]), _load(it["label"])
        assert set(np.unique(lbl).tolist()) <= {0, 1}
        per_slice = lbl.any(axis=(0, 1))
        assert 0 < per_slice.sum() < SMALL[2]  # present in some, not all slices
        idx = np.flatnonzero(per_slice)
        assert np.all(np.diff(idx) == 1)  # one contiguous run of slices
        assert arr.min() >= 0 and arr.max() > 100  # scanner-like units
        # the prostate is neither pure background nor the whole field of view
        assert 0.002 < lbl.mean() < 0.1


@pytest.mark.slow
def test_demo_deterministic(tmp_path, small_demo):
    root, summary = small_demo
    kw = dict(cases_per_site={s: (2 if s == DEMO_SOURCE_SITE else 1) for s in DEMO_SITES},
              shape=SMALL)
    a = generate_demo_prostate(tmp_path / "a", seed=3, **kw)
    b = generate_demo_prostate(tmp_path / "b", seed=3, **kw)
    c = generate_demo_prostate(tmp_path / "c", seed=4, **kw)
    for ia, ib, ic in zip(a["items"], b["items"], c["items"]):
        assert np.array_equal(_load(ia["image"]), _load(ib["image"]))
        assert np.array_equal(_load(ia["label"]), _load(ib["label"]))
        assert not np.array_equal(_load(ia["image"]), _load(ic["image"]))
    # case k of another run with the same seed is the same synthetic patient
    first = summary["items"][0]
    assert np.array_equal(_load(first["label"]), _load(a["items"][0]["label"]))
    assert not np.array_equal(_load(a["items"][0]["label"]), _load(c["items"][0]["label"]))


def test_anatomy_does_not_depend_on_site(tmp_path, small_demo):
    # the same case rendered with the source style and with another site's style: identical
    # labels (anatomy), different images (acquisition)
    one = generate_demo_prostate(tmp_path / "src", seed=5, cases_per_site=3, shape=SMALL,
                                 sites={"X": "SiteA"})
    two = generate_demo_prostate(tmp_path / "tgt", seed=5, cases_per_site=3, shape=SMALL,
                                 sites={"X": SITE_STYLES["SiteD"]})
    for ia, ib in zip(one["items"], two["items"]):
        assert np.array_equal(_load(ia["label"]), _load(ib["label"]))
        assert not np.array_equal(_load(ia["image"]), _load(ib["image"]))
    # and the labelled volume statistics are alike in every site of the demo
    _, summary = small_demo
    volumes = {s: [int(_load(it["label"]).sum()) for it in items]
               for s, items in group_by_site(summary["items"]).items()}
    overall = np.mean([v for vs in volumes.values() for v in vs])
    for site, vs in volumes.items():
        assert abs(np.mean(vs) - overall) < 0.4 * overall, (site, volumes)


def test_sites_differ_in_intensity(small_demo):
    _, summary = small_demo
    quantiles, prostate = {}, {}
    for site, items in group_by_site(summary["items"]).items():
        q, p = [], []
        for it in items:
            img = _load(it["image"]).astype(np.float64)
            lab = _load(it["label"]) > 0
            z = (img - img.mean()) / img.std()
            q.append(np.percentile(z, np.linspace(5, 95, 10)))
            p.append(z[lab].mean())
        quantiles[site], prostate[site] = np.array(q), np.array(p)
    within = np.mean([np.abs(q[i] - q[j]).mean() for q in quantiles.values()
                      for i, j in itertools.combinations(range(len(q)), 2)])
    for a, b in itertools.combinations(quantiles, 2):
        between = np.abs(quantiles[a].mean(0) - quantiles[b].mean(0)).mean()
        assert between > 1.8 * within, (a, b, between, within)
    # the normalised prostate intensity itself moves between sites
    means = {s: float(v.mean()) for s, v in prostate.items()}
    assert max(means.values()) - min(means.values()) > 1.0, means
    # raw scanner units differ too
    raw = {s: np.mean([_load(it["image"]).mean() for it in items])
           for s, items in group_by_site(summary["items"]).items()}
    assert max(raw.values()) > 1.5 * min(raw.values()), raw


@pytest.mark.slow
def test_ensure_is_idempotent_and_regenerates(tmp_path, caplog):
    root = tmp_path / "demo"
    kw = dict(cases_per_site=1, shape=(24, 24, 8))
    assert ensure_demo_prostate(root, seed=1, **kw) == root.absolute()
    info = root / "demo_info.json"
    case = root / DEMO_SOURCE_SITE / "Case00.nii.gz"
    stamp = (info.stat().st_mtime_ns, case.stat().st_mtime_ns)
    before = _load(case)
    ensure_demo_prostate(root, seed=1, **kw)
    assert (info.stat().st_mtime_ns, case.stat().st_mtime_ns) == stamp
    # other parameters -> regenerated
    ensure_demo_prostate(root, seed=2, **kw)
    assert json.loads(info.read_text())["params"]["seed"] == 2
    assert not np.array_equal(before, _load(case))
    ensure_demo_prostate(root, seed=2, cases_per_site=2, shape=(24, 24, 8))
    assert (root / DEMO_SOURCE_SITE / "Case01.nii.gz").is_file()
    # a deleted case file is noticed too
    os.remove(case)
    ensure_demo_prostate(root, seed=2, cases_per_site=2, shape=(24, 24, 8))
    assert case.is_file()
    # no temporary folders left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_ensure_interrupted_and_foreign_folders(tmp_path, monkeypatch):
    root = tmp_path / "demo"

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    real_acquire = sp.acquire
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            boom()
        return real_acquire(*args, **kwargs)

    monkeypatch.setattr(sp, "acquire", flaky)
    with pytest.raises(RuntimeError):
        ensure_demo_prostate(root, seed=0, cases_per_site=2, shape=(24, 24, 8))
    assert not root.exists()  # nothing that could look like a complete data set
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(sp, "acquire", real_acquire)
    # a folder with user data is never overwritten
    user = tmp_path / "mine"
    user.mkdir()
    (user / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        ensure_demo_prostate(user, seed=0, cases_per_site=1, shape=(24, 24, 8))
    assert (user / "keep.txt").read_text() == "precious"


def test_generator_argument_errors(tmp_path):
    with pytest.raises(ValueError):
        generate_demo_prostate(tmp_path / "x", sites=["NoSuchSite"], shape=SMALL)
    with pytest.raises(ValueError):
        generate_demo_prostate(tmp_path / "x", cases_per_site={"Nope": 1}, shape=SMALL)
    with pytest.raises(TypeError):
        ensure_demo_prostate(tmp_path / "y", bogus=1)


def test_demo_round_trip_through_lists(small_demo):
    root, summary = small_demo
    assert detect_layout(root) == "multisite"
    items = build_datalist(root)
    assert [(i["image"], i["label"], i["site"], i["case"]) for i in items] == \
        [(i["image"], i["label"], i["site"], i["case"]) for i in summary["items"]]
    assert list(group_by_site(items)) == list(DEMO_SITES)


# ------------------------------------------------------------------------------------------
# data lists
# ------------------------------------------------------------------------------------------
needs_real = pytest.mark.skipif(not NCI.is_dir(), reason=f"real data not found at {NCI}")


@pytest.fixture
def multisite_root(tmp_path):
    if not NCI.is_dir():
        pytest.skip(f"real data not found at {NCI}")
    root = tmp_path / "multi"
    cases = [("SiteA", "Case00", "_Segmentation"), ("SiteA", "Case01", "_segmentation"),
             ("SiteB", "Case30", "_Segmentation")]
    for site, case, seg in cases:
        (root / site).mkdir(parents=True, exist_ok=True)
        shutil.copy(NCI / f"{case}.nii.gz", root / site / f"{case}.nii.gz")
        shutil.copy(NCI / f"{case}_Segmentation.nii.gz", root / site / f"{case}{seg}.nii.gz")
    (root / "SiteA" / "._Case00.nii.gz").write_bytes(b"junk")  # macOS resource fork
    (root / "notes").mkdir()  # folder without images is ignored
    (root / "README.txt").write_text("hello")
    return root


def _write_mhd_pair(folder: Path, case: str):
    import itk

    folder.mkdir(parents=True, exist_ok=True)
    img = itk.image_from_array(np.arange(4 * 8 * 8, dtype=np.int16).reshape(4, 8, 8))
    img.SetSpacing((0.6, 0.6, 3.0))
    lab = itk.image_from_array((np.arange(4 * 8 * 8).reshape(4, 8, 8) % 7 == 0).astype(np.uint8))
    itk.imwrite(img, str(folder / f"{case}.mhd"))
    itk.imwrite(lab, str(folder / f"{case}_segmentation.mhd"))


@pytest.mark.slow
def test_list_multisite_real_files(multisite_root):
    _write_mhd_pair(multisite_root / "Promise", "Case07")
    assert detect_layout(multisite_root) == "multisite"
    items = build_datalist(multisite_root)
    assert [(i["site"], i["case"]) for i in items] == [
        ("Promise", "Case07"), ("SiteA", "Case00"), ("SiteA", "Case01"), ("SiteB", "Case30")]
    by_case = {i["case"]: i for i in items}
    assert by_case["Case00"]["label"].endswith("Case00_Segmentation.nii.gz")
    assert by_case["Case01"]["label"].endswith("Case01_segmentation.nii.gz")
    assert by_case["Case07"]["image"].endswith("Case07.mhd")
    assert by_case["Case07"]["label"].endswith("Case07_segmentation.mhd")
    for it in items:
        assert Path(it["image"]).is_absolute() and Path(it["image"]).is_file()
        assert Path(it["label"]).is_file()
        assert "channel" not in it  # 3-D images
    assert list_multisite(multisite_root) == items
    # the images load as a pair of the same shape with MONAI
    from monai.transforms import LoadImaged

    loaded = LoadImaged(keys=["image", "label"])(by_case["Case30"])
    assert loaded["image"].shape == loaded["label"].shape
    assert set(np.unique(np.asarray(loaded["label"])).tolist()) <= {0, 1, 2}
    loaded = LoadImaged(keys=["image", "label"])(by_case["Case07"])
    assert loaded["image"].shape == loaded["label"].shape == (8, 8, 4)
    # groups
    groups = group_by_site(items)
    assert list(groups) == ["Promise", "SiteA", "SiteB"] and len(groups["SiteA"]) == 2


@needs_real
def test_cases_directly_in_root():
    items = list_multisite(NCI)
    assert len(items) == 39
    assert {i["site"] for i in items} == {NCI.name}
    assert items[0]["case"] == "Case00" and items[-1]["case"] == "Case38"


def test_missing_pairs_are_reported_together(multisite_root):
    os.remove(multisite_root / "SiteA" / "Case01_segmentation.nii.gz")
    os.remove(multisite_root / "SiteB" / "Case30.nii.gz")
    shutil.copy(multisite_root / "SiteA" / "Case00.nii.gz",
                multisite_root / "SiteB" / "Case31.nii.gz")
    _write_mhd_pair(multisite_root / "Promise", "Case07")
    os.remove(multisite_root / "Promise" / "Case07_segmentation.raw")
    with pytest.raises(DataListError) as err:
        build_datalist(multisite_root)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert len(err.value.problems) == 4, err.value.problems
    for name in ["Case01.nii.gz", "Case30_Segmentation.nii.gz", "Case31.nii.gz",
                 "Case07_segmentation"]:
        assert name in msg, (name, msg)
    assert "image without label" in msg and "label without image" in msg


def _write_nifti(path: Path, arr: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([0.6, 0.6, 3.6, 1.0])), str(path))


def test_list_decathlon(tmp_path):
    root = tmp_path / "Task05_Prostate"
    for n in (0, 2, 10):
        _write_nifti(root / "imagesTr" / f"prostate_{n:02d}.nii.gz",
                     np.zeros((8, 8, 4, 2), np.float32))
        _write_nifti(root / "labelsTr" / f"prostate_{n:02d}.nii.gz", np.zeros((8, 8, 4), np.uint8))
    _write_nifti(root / "imagesTs" / "prostate_03.nii.gz", np.zeros((8, 8, 4, 2), np.float32))
    (root / "imagesTr" / "._prostate_00.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    (root / "labelsTr" / "._prostate_00.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    assert detect_layout(root) == "decathlon"
    items = build_datalist(root)
    assert [i["case"] for i in items] == ["prostate_00", "prostate_02", "prostate_10"]
    assert all(i["site"] == "Decathlon" and i["channel"] == 0 for i in items)
    assert all(Path(i["label"]).parent.name == "labelsTr" for i in items)
    # dataset.json names the T2 channel
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "ADC", "1": "T2"}}))
    assert all(i["channel"] == 1 for i in list_decathlon(root))
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "T2", "1": "ADC"}}))
    assert all(i["channel"] == 0 for i in list_decathlon(root))
    # a missing label is reported with its image
    os.remove(root / "labelsTr" / "prostate_02.nii.gz")
    with pytest.raises(DataListError, match="prostate_02.nii.gz"):
        list_decathlon(root)


def test_list_image_label_folder(tmp_path):
    root = tmp_path / "MyHospital"
    for name in ("b.nii.gz", "a.nii.gz"):
        _write_nifti(root / "images" / name, np.zeros((8, 8, 4), np.int16))
        _write_nifti(root / "labels" / name, np.zeros((8, 8, 4), np.uint8))
    assert detect_layout(root) == "folder"
    items = build_datalist(root)
    assert [(i["case"], i["site"]) for i in items] == [("a", "MyHospital"), ("b", "MyHospital")]
    assert items == list_image_label_folder(root)
    _write_nifti(root / "images" / "c.nii.gz", np.zeros((8, 8, 4), np.int16))
    _write_nifti(root / "labels" / "d.nii.gz", np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(DataListError) as err:
        list_image_label_folder(root)
    assert len(err.value.problems) == 2
    assert "c.nii.gz" in str(err.value) and "d.nii.gz" in str(err.value)


def test_bad_roots(tmp_path):
    with pytest.raises(DataListError, match="does not exist"):
        build_datalist(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataListError, match="empty"):
        build_datalist(tmp_path / "empty")
    (tmp_path / "other" / "sub").mkdir(parents=True)
    (tmp_path / "other" / "sub" / "notes.txt").write_text("x")
    with pytest.raises(DataListError, match="no cases found"):
        build_datalist(tmp_path / "other")
    with pytest.raises(DataListError, match="unknown layout"):
        build_datalist(tmp_path / "other", layout="nnunet")


def _fake_items():
    items = []
    for site, n in (("A", 9), ("B", 4)):
        for k in range(n):
            for part in range(2):  # two items (e.g. two scans) per patient
                items.append({"image": f"/{site}/Case{k:02d}_{part}.nii.gz",
                              "label": f"/{site}/Case{k:02d}_{part}_seg.nii.gz",
                              "site": site, "case": f"Case{k:02d}"})
    return items


def test_split_by_patient():
    items = _fake_items()
    train, val = split_by_patient(items, val_fraction=0.3, seed=0)
    key = lambda it: (it["site"], it["case"])  # noqa: E731
    assert len(train) + len(val) == len(items)
    assert not {key(i) for i in train} & {key(i) for i in val}
    assert len({key(i) for i in val}) == 4  # round(0.3 * 13 patients)
    assert {i["site"] for i in val} == {"A", "B"}  # each site keeps its share
    # deterministic, independent of the input order; another seed gives another split
    again = split_by_patient(list(reversed(items)), val_fraction=0.3, seed=0)[1]
    assert sorted(map(key, again)) == sorted(map(key, val))
    seeds = {tuple(sorted(map(key, split_by_patient(items, 0.3, seed=s)[1]))) for s in range(6)}
    assert len(seeds) > 1
    # at least one patient in val, one in train, when there are two patients
    two = [it for it in items if it["site"] == "A" and it["case"] in ("Case00", "Case01")]
    tr, va = split_by_patient(two, val_fraction=0.01, seed=1)
    assert len({key(i) for i in va}) == 1 and len({key(i) for i in tr}) == 1
    tr, va = split_by_patient(two[:2], val_fraction=0.5)  # one patient
    assert len(tr) == 2 and va == []
    # the same case id in two sites is two patients
    same = [{"image": "x", "label": "y", "site": s, "case": "Case00"} for s in ("A", "B")]
    tr, va = split_by_patient(same, 0.5)
    assert len(tr) == 1 and len(va) == 1
    with pytest.raises(ValueError):
        split_by_patient(items, val_fraction=1.0)


@needs_real
def test_split_real_list():
    items = list_multisite(NCI)
    train, val = split_by_patient(items, 0.2, seed=0)
    assert len(val) == round(0.2 * 39)
    assert not {i["case"] for i in train} & {i["case"] for i in val}
    assert split_by_patient(items, 0.2, seed=0) == (train, val)


def test_preprocessing_keeps_the_listed_channel_of_4d_volumes(tmp_path):
    import nibabel as nib

    from bundle_utils import task_transform

    vol = np.zeros((16, 16, 4, 2), dtype=np.float32)
    vol[..., 0] = np.linspace(0, 1, 16)[:, None, None]  # T2: a ramp
    vol[..., 1] = 7.0  # ADC: constant
    label = np.zeros((16, 16, 4), dtype=np.uint8)
    label[4:10, 4:10, 1:3] = 2
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "lab.nii.gz")
    item = {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}
    preprocessing = task_transform("prostate", image_size=32)
    out = preprocessing(dict(item, channel=0))
    assert out["image"].shape == (1, 32, 32, 4) and out["label"].shape == (1, 32, 32, 4)
    assert float(out["image"].std()) > 0.1  # the ramp, not the constant channel
    assert set(np.unique(out["label"].numpy())) == {0.0, 1.0}  # zones merged
    constant = preprocessing(dict(item, channel=1))
    assert float(constant["image"].std()) == pytest.approx(0.0, abs=1e-6)
