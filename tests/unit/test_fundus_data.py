"""Tests of the synthetic fundus demo generator, the fundus data lists and fundus transforms."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bundle_utils import SHARED_DATA, task_transform
from msf_monai.tasks.fundus import (
    acquire_fundus,
    build_fundus_datalist,
    DEMO_FUNDUS_DOMAINS,
    DEMO_FUNDUS_SOURCE_DOMAIN,
    detect_fundus_layout,
    ensure_demo_fundus,
    fundus_datalist,
    FUNDUS_DOMAIN_STYLES,
    generate_demo_fundus,
    list_drishti,
    list_fundus_domains,
    list_fundus_folder,
    parse_fundus_mapping,
    sample_fundus_anatomy,
)
from msf_monai.data import DataListError, DataValidationError, group_by_site
from msf_monai.tasks.fundus import synthetic as sf
from msf_monai.tasks.fundus import (
    CupInsideDiscd,
    fundus_mask_to_channels,
    FundusMaskToChannelsd,
)

DRISHTI = SHARED_DATA / "fundus_drishti_gs"
SMALL = 64
COUNTS = (8, 4)  # train, test per domain in the small demo


def _read(path):
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("fundus") / "demo"
    summary = generate_demo_fundus(root, seed=3, images_per_domain=COUNTS, size=SMALL)
    return root, summary


# ------------------------------------------------------------------------------------------
# generator
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_layout_and_counts(small_demo):
    root, summary = small_demo
    assert DEMO_FUNDUS_DOMAINS[0] == DEMO_FUNDUS_SOURCE_DOMAIN and len(DEMO_FUNDUS_DOMAINS) >= 4
    assert summary["domains"] == list(DEMO_FUNDUS_DOMAINS)
    assert summary["images_per_domain"] == {d: {"train": 8, "test": 4} for d in DEMO_FUNDUS_DOMAINS}
    assert len(summary["items"]) == 12 * len(DEMO_FUNDUS_DOMAINS)
    info = json.loads((root / "demo_info.json").read_text())
    assert info["version"] == sf.FUNDUS_GENERATOR_VERSION and info["params"]["size"] == SMALL
    for dom in DEMO_FUNDUS_DOMAINS:
        for split, n in (("train", 8), ("test", 4)):
            imgs = sorted((root / dom / split / "ROIs" / "image").glob("*.png"))
            masks = sorted((root / dom / split / "ROIs" / "mask").glob("*.png"))
            assert len(imgs) == n and [p.name for p in imgs] == [p.name for p in masks]
    names = [Path(it["image"]).name for it in summary["items"]]
    assert len(set(names)) == len(names)  # unique over the whole set
    it = summary["items"][0]
    img, mask = Image.open(it["image"]), Image.open(it["label"])
    assert img.mode == "RGB" and img.size == (SMALL, SMALL)
    assert mask.mode == "L" and mask.size == (SMALL, SMALL)


def test_default_counts_and_params():
    counts = sf._resolve_counts(None, list(DEMO_FUNDUS_DOMAINS))
    assert counts[DEMO_FUNDUS_SOURCE_DOMAIN] == {"train": 40, "test": 10}
    assert all(counts[d] == {"train": 10, "test": 10} for d in DEMO_FUNDUS_DOMAINS[1:])
    assert sf._resolve_counts(3, ["A", "B"]) == {"A": {"train": 3, "test": 3}, "B": {"train": 3, "test": 3}}
    assert sf._resolve_counts({"B": (1, 2)}, ["A", "B"])["B"] == {"train": 1, "test": 2}
    with pytest.raises(ValueError):
        sf._resolve_counts({"Nope": 1}, ["A"])
    with pytest.raises(ValueError):
        sf._resolve_domains(["NoSuchDomain"])
    with pytest.raises(ValueError):
        sf._resolve_domains({"X": {"bogus_key": 1.0}})


def test_masks_values_and_cup_inside_disc(small_demo):
    _, summary = small_demo
    cdrs = []
    for it in summary["items"]:
        m = _read(it["label"])
        assert set(np.unique(m)) <= {0, 128, 255}
        disc, cup = m <= 128, m == 0
        assert disc.sum() > 0.03 * m.size and cup.sum() > 0
        assert not (cup & ~disc).any()
        # the cup is surrounded by rim: nothing of the cup touches the background
        pad = np.pad(cup, 1)
        grown = pad[1:-1, 1:-1] | pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:]
        assert not (grown & (m == 255)).any()
        cdrs.append(np.sqrt(cup.sum() / disc.sum()))
        # the disc is near the centre and does not touch the border
        ys, xs = np.nonzero(disc)
        assert 0.3 * SMALL < ys.mean() < 0.7 * SMALL and 0.3 * SMALL < xs.mean() < 0.7 * SMALL
        assert ys.min() > 0 and xs.min() > 0 and ys.max() < SMALL - 1 and xs.max() < SMALL - 1
    assert 0.2 < min(cdrs) and max(cdrs) < 0.8 and max(cdrs) - min(cdrs) > 0.15


@pytest.mark.slow
def test_generator_is_deterministic(tmp_path, small_demo):
    root, summary = small_demo
    a = generate_demo_fundus(tmp_path / "a", seed=3, images_per_domain=COUNTS, size=SMALL)
    for x, y in zip(summary["items"], a["items"]):
        assert Path(x["image"]).read_bytes() == Path(y["image"]).read_bytes()
        assert Path(x["label"]).read_bytes() == Path(y["label"]).read_bytes()
    b = generate_demo_fundus(tmp_path / "b", seed=4, images_per_domain=1, size=SMALL)
    assert not np.array_equal(_read(b["items"][0]["image"]), _read(summary["items"][0]["image"]))
    assert not np.array_equal(_read(b["items"][0]["label"]), _read(summary["items"][0]["label"]))


def test_domains_differ_only_in_acquisition():
    """Same eye, every domain style: identical anatomy/mask, clearly different photographs."""
    anatomy = sample_fundus_anatomy(np.random.default_rng([7, 1, 0]), SMALL)
    again = sample_fundus_anatomy(np.random.default_rng([7, 1, 0]), SMALL)
    assert np.array_equal(anatomy["mask"], again["mask"]) and np.allclose(anatomy["rgb"], again["rgb"])
    shots = {d: acquire_fundus(anatomy, FUNDUS_DOMAIN_STYLES[d], np.random.default_rng(0)).astype(float)
             for d in DEMO_FUNDUS_DOMAINS}
    src = shots[DEMO_FUNDUS_SOURCE_DOMAIN]
    disc = anatomy["disc"]
    for d, img in shots.items():
        assert img.shape == (SMALL, SMALL, 3)
        # the disc stays visible: brighter than the background in every domain
        assert img[disc].mean() > img[~disc].mean() + 15, d
        if d != DEMO_FUNDUS_SOURCE_DOMAIN:
            assert np.abs(img - src).mean() > 15, d


def test_domain_statistics(small_demo):
    """Colour statistics differ strongly between domains, disc/cup area statistics do not."""
    _, summary = small_demo
    colour, area = {}, {}
    for dom, items in group_by_site(summary["items"]).items():
        colour[dom] = np.array([_read(it["image"]).reshape(-1, 3).mean(0) for it in items])
        masks = [_read(it["label"]) for it in items]
        area[dom] = np.array([[(m <= 128).mean(), (m == 0).mean()] for m in masks])
    doms = list(colour)
    assert doms == list(DEMO_FUNDUS_DOMAINS)

    def t_stat(a, b):
        se = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b)) + 1e-9
        return np.abs(a.mean(0) - b.mean(0)) / se

    for i, a in enumerate(doms):
        for b in doms[i + 1:]:
            assert t_stat(colour[a], colour[b]).max() > 6.0, (a, b)  # some channel differs
            assert np.abs(colour[a].mean(0) - colour[b].mean(0)).max() > 20, (a, b)
            assert t_stat(area[a], area[b]).max() < 3.5, (a, b)  # anatomy does not
    all_area = np.concatenate(list(area.values()))
    for dom in doms:
        assert abs(area[dom][:, 0].mean() - all_area[:, 0].mean()) < 0.3 * all_area[:, 0].mean()


def test_ensure_demo_fundus_idempotent(tmp_path, caplog):
    root = tmp_path / "demo"
    kw = dict(images_per_domain=1, size=48)
    assert ensure_demo_fundus(root, seed=1, **kw) == root.absolute()
    info = root / "demo_info.json"
    stamp = info.stat().st_mtime_ns
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    assert len(files) == 2 * 2 * len(DEMO_FUNDUS_DOMAINS)
    ensure_demo_fundus(root, seed=1, **kw)
    assert info.stat().st_mtime_ns == stamp  # untouched
    # a missing file or other parameters trigger regeneration
    first_img = root / files[0]
    first_img.unlink()
    ensure_demo_fundus(root, seed=1, **kw)
    assert first_img.is_file()
    ensure_demo_fundus(root, seed=2, **kw)
    assert json.loads(info.read_text())["params"]["seed"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    # a foreign non-empty folder is never overwritten
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ensure_demo_fundus(foreign, seed=1, **kw)
    assert (foreign / "precious.txt").read_text() == "keep me"
    with pytest.raises(TypeError):
        ensure_demo_fundus(root, seed=1, bogus=1)


# ------------------------------------------------------------------------------------------
# data lists
# ------------------------------------------------------------------------------------------
def test_list_fundus_domains(small_demo):
    root, summary = small_demo
    assert detect_fundus_layout(root) == "domains"
    items = list_fundus_domains(root)
    assert build_fundus_datalist(root) == items
    assert len(items) == len(summary["items"])
    for it in items:
        assert set(it) == {"image", "label", "site", "case", "split", "label_format"}
        assert it["label_format"] == "grey" and it["split"] in ("train", "test")
        assert Path(it["image"]).is_file() and Path(it["label"]).is_file()
        assert Path(it["image"]).stem == Path(it["label"]).stem == it["case"]
        assert f"/{it['site']}/{it['split']}/ROIs/image/" in it["image"].replace(os.sep, "/")
    by_site = group_by_site(items)
    assert list(by_site) == list(DEMO_FUNDUS_DOMAINS)
    for dom, its in by_site.items():
        splits = [it["split"] for it in its]
        assert splits.count("train") == 8 and splits.count("test") == 4
        assert splits == sorted(splits, key=("train", "test").index)  # train first
    # a single domain folder works as root too
    one = list_fundus_domains(root / "Domain2")
    assert len(one) == 12 and {it["site"] for it in one} == {"Domain2"}


def test_problems_reported_together(tmp_path, small_demo):
    src, _ = small_demo
    root = tmp_path / "broken"
    shutil.copytree(src, root)
    m1 = root / "Domain1" / "train" / "ROIs" / "mask" / "fundus_0000.png"
    m2 = root / "Domain3" / "test" / "ROIs" / "mask" / "fundus_0033.png"
    m1.unlink()
    m2.unlink()
    orphan = root / "Domain2" / "train" / "ROIs" / "mask" / "orphan_17.png"
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(orphan)
    garbage = root / "Domain4" / "test" / "ROIs" / "image" / "fundus_0045.png"
    garbage.write_bytes(b"this is not a png")
    (root / "Domain4" / "train" / "ROIs" / "mask").rename(root / "Domain4" / "train" / "ROIs" / "gone")
    with pytest.raises(DataListError) as err:
        list_fundus_domains(root)
    text = str(err.value)
    problems = err.value.problems
    assert len(problems) == 5, problems
    img1 = root / "Domain1" / "train" / "ROIs" / "image" / "fundus_0000.png"
    img2 = root / "Domain3" / "test" / "ROIs" / "image" / "fundus_0033.png"
    for needle in (str(img1), str(img2), str(orphan), str(garbage),
                   str(root / "Domain4" / "train" / "ROIs" / "mask")):
        assert needle in text
    assert sum("image without mask" in p for p in problems) == 2
    assert sum("mask without image" in p for p in problems) == 1
    assert sum("unreadable" in p for p in problems) == 1
    # missing / empty roots
    with pytest.raises(DataListError, match="does not exist"):
        build_fundus_datalist(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataListError, match="empty"):
        build_fundus_datalist(tmp_path / "empty")
    with pytest.raises(DataListError, match="unknown layout"):
        build_fundus_datalist(src, layout="zigzag")


def _drishti_copy(tmp_path, n=4):
    if not (DRISHTI / "images").is_dir():
        pytest.skip(f"real Drishti-GS data not available at {DRISHTI}")
    root = tmp_path / "drishti"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    names = sorted(p.name for p in (DRISHTI / "images").glob("*.png"))[:n]
    for name in names:
        shutil.copy(DRISHTI / "images" / name, root / "images" / name)
        shutil.copy(DRISHTI / "masks" / name, root / "masks" / name)
    return root, names


def test_list_drishti(tmp_path):
    root, names = _drishti_copy(tmp_path)
    assert detect_fundus_layout(root) == "drishti"
    items = build_fundus_datalist(root)
    assert items == list_drishti(root)
    assert [Path(it["image"]).name for it in items] == names
    assert all(it["label_format"] == "palette" and it["site"] == "drishti" and it["split"] == "train"
               for it in items)
    assert list_drishti(root, site="DrishtiGS")[0]["site"] == "DrishtiGS"
    # the labels come out right through the real preprocessing
    pre = task_transform("fundus", image_size=96)
    for it in items[:2]:
        out = pre(dict(it))
        img, lab = out["image"], out["label"]
        assert tuple(img.shape) == (3, 96, 96) and tuple(lab.shape) == (2, 96, 96)
        assert img.dtype == torch.float32 and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
        disc, cup = lab[0] > 0.5, lab[1] > 0.5
        assert cup.sum() > 0 and disc.sum() > cup.sum() and not (cup & ~disc).any()
        # the disc is brighter than the background in the same (possibly transposed) frame
        grey = img.mean(0)
        assert grey[disc].mean() > grey[~disc].mean()
        raw = _read(it["label"])
        assert abs(float(disc.float().mean()) - (raw >= 1).mean()) < 0.02
    # a missing mask is reported with its image
    (root / "masks" / names[1]).unlink()
    with pytest.raises(DataListError, match=names[1]):
        list_drishti(root)


def _write_case(folder_img, folder_mask, name, image, mask):
    Image.fromarray(image).save(folder_img / name)
    Image.fromarray(mask).save(folder_mask / name)


def _geometry(h=40, w=56, cy=18, cx=30, rd=12, rc=5):
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= rd ** 2
    cup = (yy - cy) ** 2 + (xx - cx - 2) ** 2 <= rc ** 2
    return disc, cup & disc


def test_list_fundus_folder_with_mapping(tmp_path):
    root = tmp_path / "myfolder"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    disc, cup = _geometry()
    mask = np.where(cup, 20, np.where(disc, 10, 0)).astype(np.uint8)
    img = np.zeros(disc.shape + (3,), np.uint8)
    img[disc] = (220, 180, 60)
    for k in range(3):
        _write_case(root / "images", root / "masks", f"eye{k}.png", img, mask)
    assert detect_fundus_layout(root) == "folder"
    mapping = {"disc": [10], "cup": [20]}
    items = build_fundus_datalist(root, mapping=mapping)
    assert items == list_fundus_folder(root, mapping)
    assert [it["case"] for it in items] == ["eye0", "eye1", "eye2"]
    assert all(it["label_format"] == "mapping" and it["site"] == "myfolder" for it in items)
    assert parse_fundus_mapping(items[0]["mapping"]) == {"disc": [10], "cup": [20]}
    lab = task_transform("fundus", image_size=32)(dict(items[0]))["label"]
    assert lab[0].sum() > lab[1].sum() > 0
    # without a mapping the grey benchmark convention is assumed
    assert list_fundus_folder(root)[0]["label_format"] == "grey"
    with pytest.raises(DataListError, match="unknown keys"):
        list_fundus_folder(root, {"disk": [1]})
    # image without mask and mask without image, each named
    (root / "masks" / "eye1.png").unlink()
    Image.fromarray(mask).save(root / "masks" / "lonely.png")
    with pytest.raises(DataListError) as err:
        list_fundus_folder(root, mapping)
    assert len(err.value.problems) == 2
    assert str(root / "images" / "eye1.png") in str(err.value)
    assert str(root / "masks" / "lonely.png") in str(err.value)
    # missing folders are named
    (tmp_path / "nomasks" / "images").mkdir(parents=True)
    with pytest.raises(DataListError, match="masks folder missing"):
        list_fundus_folder(tmp_path / "nomasks", mapping)


@pytest.mark.slow
def test_fundus_datalist_demo(tmp_path):
    demo = tmp_path / "demo_fundus"
    kw_root = tmp_path / "other"
    # the demo is generated only when dataset_dir is the demo folder; the bundles' entry point
    # reports a missing folder as a clean exit (message, status 1), naming the folder
    with pytest.raises(DataValidationError, match="does not exist") as err:
        fundus_datalist(kw_root, demo_dir=demo)
    assert str(kw_root) in str(err.value) and err.value.problems
    assert not demo.exists()
    sf_counts = sf.DEFAULT_SOURCE_COUNTS, sf.DEFAULT_TARGET_COUNTS
    items = fundus_datalist(demo, demo_dir=demo, demo_seed=0)
    n_expected = sum(sf_counts[0].values()) + (len(DEMO_FUNDUS_DOMAINS) - 1) * sum(sf_counts[1].values())
    assert len(items) == n_expected
    info = json.loads((demo / "demo_info.json").read_text())
    assert info["params"]["size"] == 128 and info["params"]["seed"] == 0
    assert Image.open(items[0]["image"]).size == (128, 128)


# ------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------
def test_mask_formats_give_the_same_label():
    disc, cup = _geometry()
    grey = np.where(cup, 0, np.where(disc, 128, 255)).astype(np.uint8)
    palette = np.where(cup, 2, np.where(disc, 1, 0)).astype(np.uint8)
    mapped = np.where(cup, 200, np.where(disc, 100, 0)).astype(np.uint8)
    expected = np.stack([disc, cup]).astype(np.float32)
    conv = FundusMaskToChannelsd(keys="label")
    cases = [
        ({"label": torch.as_tensor(grey)[None], "label_format": "grey"}),
        ({"label": grey}),  # default format: grey, [H, W]
        ({"label": torch.as_tensor(np.stack([grey] * 3)), "label_format": "grey"}),  # RGB mask
        ({"label": palette[None], "label_format": "palette"}),
        ({"label": mapped[None], "label_format": "mapping", "mapping": {"disc": [100], "cup": [200]}}),
        ({"label": mapped, "label_format": "mapping", "mapping": '{"disc": [100, 200], "cup": [200]}'}),
    ]
    for d in cases:
        out = conv(d)["label"]
        assert tuple(out.shape) == (2,) + disc.shape
        assert np.array_equal(np.asarray(out), expected), d.get("label_format")
    # JPEG-like grey values: nearest of 0 / 128 / 255
    rng = np.random.default_rng(0)
    noisy = np.clip(grey.astype(int) + rng.integers(-30, 31, grey.shape), 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(fundus_mask_to_channels(noisy, "grey")), expected)
    with pytest.raises(ValueError):
        fundus_mask_to_channels(grey, "rainbow")
    with pytest.raises(ValueError):
        fundus_mask_to_channels(mapped, "mapping", None)


def test_preprocessing_files_all_formats(tmp_path):
    """Same geometry written in the three formats, non-square image: identical labels, the
    label aligned with the image, shapes [3,S,S] / [2,S,S], image in [0, 1]."""
    disc, cup = _geometry()
    h, w = disc.shape
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 90
    img[disc] = (230, 170, 60)
    img[cup] = (255, 230, 150)
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    Image.fromarray(img).save(tmp_path / "i" / "a.png")
    Image.fromarray(img).convert("RGBA").save(tmp_path / "i" / "rgba.png")
    Image.fromarray(img).convert("L").save(tmp_path / "i" / "grey.png")
    grey = np.where(cup, 0, np.where(disc, 128, 255)).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "m" / "g.png")
    pal = Image.fromarray(np.where(cup, 2, np.where(disc, 1, 0)).astype(np.uint8), mode="L").convert("P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    pal.save(tmp_path / "m" / "p.png")
    assert Image.open(tmp_path / "m" / "p.png").mode == "P"
    Image.fromarray(np.where(cup, 7, np.where(disc, 3, 0)).astype(np.uint8)).save(tmp_path / "m" / "x.png")
    S = 32
    pre = task_transform("fundus", image_size=S)
    image = str(tmp_path / "i" / "a.png")
    items = [
        {"image": image, "label": str(tmp_path / "m" / "g.png"), "label_format": "grey"},
        {"image": image, "label": str(tmp_path / "m" / "p.png"), "label_format": "palette"},
        {"image": image, "label": str(tmp_path / "m" / "x.png"), "label_format": "mapping",
         "mapping": json.dumps({"disc": [3], "cup": [7]})},
    ]
    outs = [pre(dict(it)) for it in items]
    for out in outs:
        im, lab = out["image"], out["label"]
        assert tuple(im.shape) == (3, S, S) and tuple(lab.shape) == (2, S, S)
        assert im.dtype == torch.float32 and lab.dtype == torch.float32
        assert float(im.min()) >= 0.0 and float(im.max()) <= 1.0
        assert set(torch.unique(lab).tolist()) <= {0.0, 1.0}
        assert not ((lab[1] > 0) & (lab[0] == 0)).any()
        assert np.array_equal(np.asarray(lab), np.asarray(outs[0]["label"]))
    lab, im = outs[0]["label"], outs[0]["image"]
    d, c = lab[0] > 0.5, lab[1] > 0.5
    assert c.sum() > 0 and d.sum() > c.sum()
    # aligned: red channel bright inside the disc (230..255), 90 outside
    red = im[0]
    assert float(red[d & ~c].mean()) > 0.8 and float(red[~d].mean()) < 0.45
    # RGBA and grey images become 3-channel
    for name in ("rgba.png", "grey.png"):
        out = task_transform("fundus", image_size=S)({"image": str(tmp_path / "i" / name)})
        assert tuple(out["image"].shape) == (3, S, S)
    # display order when asked for: [C, H, W]; same geometry transposed otherwise
    pre_hw = task_transform("fundus", image_size=S, reverse_indexing=False)
    lab_hw = pre_hw(dict(items[0]))["label"]
    small = np.asarray(Image.fromarray(disc.astype(np.uint8) * 255).resize((S, S), Image.NEAREST)) > 0
    assert (np.asarray(lab_hw[0] > 0.5) == small).mean() > 0.97
    assert (np.asarray(lab[0] > 0.5) == small.T).mean() > 0.97


def test_cup_inside_disc():
    pred = torch.zeros(2, 8, 8)
    pred[0, 2:6, 2:6] = 1
    pred[1, 1:4, 1:4] = 1  # partly outside the disc
    out = CupInsideDiscd(keys="pred")({"pred": pred})["pred"]
    assert torch.equal(out[0], pred[0])
    expected_cup = torch.zeros(8, 8)
    expected_cup[2:4, 2:4] = 1
    assert torch.equal(out[1], expected_cup)
    assert pred[1].sum() == 9  # input untouched
    batch = torch.stack([pred, pred])
    out_b = CupInsideDiscd(keys="pred", channel_dim=1)({"pred": batch})["pred"]
    assert torch.equal(out_b[1, 1], expected_cup)
    out_np = CupInsideDiscd(keys="pred")({"pred": pred.numpy().astype(np.uint8)})["pred"]
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.uint8
    assert np.array_equal(out_np[1], expected_cup.numpy())
    with pytest.raises(ValueError):
        CupInsideDiscd(keys="pred")({"pred": torch.zeros(3, 4, 4)})


def test_one_odd_mask_is_named_not_the_coding_of_the_others(tmp_path):
    """The palette coding is decided by most masks, so an odd first mask is the one reported."""
    from PIL import Image

    from msf_monai.data import DataValidationError
    from msf_monai.tasks.fundus import check_fundus_images

    root, names = _drishti_copy(tmp_path, n=4)
    odd = root / "masks" / names[0]  # the first mask, grey 0/128/255 instead of the palette
    palette = np.asarray(Image.open(odd))
    Image.fromarray(np.where(palette == 0, 255, np.where(palette == 1, 128, 0)).astype(np.uint8), mode="L").save(odd)
    assert detect_fundus_layout(root) == "drishti"
    items = build_fundus_datalist(root)
    with pytest.raises(DataValidationError) as err:
        check_fundus_images(items)
    problems = err.value.problems
    assert len(problems) == 1 and problems[0].startswith(str(odd)), problems
