"""The evaluation handlers (msf_monai.handlers.evaluation): per-case Dice, its protocols, and the evaluate configs' metric."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from monai.engines import SupervisedEvaluator

from msf_monai.handlers import PerCaseDiceWriter, case_dice


def test_per_case_dice_writer(tmp_path):
    # two sites; known overlaps
    pred = torch.zeros(1, 4, 4, 2)
    label = torch.zeros(1, 4, 4, 2)
    label[0, :2] = 1  # 16 voxels
    pred[0, :1] = 1  # 8 voxels, all inside the label -> Dice 2*8/(8+16)
    items = [
        ({"pred": pred, "label": label}, {"site": "A", "case": "c1"}, 2 * 8 / 24),
        ({"pred": label.clone(), "label": label}, {"site": "A", "case": "c2"}, 1.0),
        ({"pred": torch.zeros_like(label), "label": label}, {"site": "B", "case": "c3"}, 0.0),
    ]
    writer = PerCaseDiceWriter(tmp_path, channel_names=["prostate"], prefix="m")

    class _State:
        pass

    class _Engine:
        state = _State()

    engine = _Engine()
    for out, item, _ in items:
        engine.state.output, engine.state.batch = [out], [item]
        writer._collect(engine)
    writer._write(engine)
    rows = list(csv.DictReader(open(tmp_path / "m_per_case.csv")))
    assert [r["case"] for r in rows] == ["c1", "c2", "c3"]
    for row, (_, _, expected) in zip(rows, items):
        assert float(row["prostate"]) == pytest.approx(expected, abs=1e-6)
    summary = json.loads((tmp_path / "m_summary.json").read_text())
    assert summary["sites"]["A"]["n"] == 2
    assert summary["sites"]["A"]["prostate"]["mean"] == pytest.approx((2 * 8 / 24 + 1) / 2)
    assert summary["sites"]["B"]["prostate"]["mean"] == pytest.approx(0.0)


def test_case_dice_protocols():
    """A 4-slice case: slice 0 empty in both, slice 1 perfect, slice 2 half right, slice 3 a
    false positive on an empty label."""
    pred = torch.zeros(1, 4, 4, 4)
    label = torch.zeros(1, 4, 4, 4)
    label[0, :2, :2, 1] = pred[0, :2, :2, 1] = 1                    # 4 of 4: Dice 1
    label[0, :2, :2, 2] = 1
    pred[0, :2, :1, 2] = 1                                           # 2 of 4 found: Dice 2*2/(2+4)
    pred[0, 3, 3, 3] = 1                                             # label empty: Dice 0
    volume = 2 * (4 + 2) / ((4 + 2 + 1) + (4 + 4))
    assert case_dice(pred, label).item() == pytest.approx(volume)
    assert case_dice(pred, label, "slice").item() == pytest.approx((1 + 1 + 4 / 6 + 0) / 4)
    assert case_dice(pred, label, "slice", "foreground").item() == pytest.approx((1 + 4 / 6) / 2)
    assert case_dice(pred, label, "volume", "foreground").item() == pytest.approx(2 * 6 / (6 + 8))
    # 2-D cases (fundus) are one slice: every protocol agrees
    image_pred, image_label = pred[..., 2], label[..., 2]
    values = {case_dice(image_pred, image_label, d, s).item() for d in ("volume", "slice") for s in ("all", "foreground")}
    assert len(values) == 1 and values.pop() == pytest.approx(4 / 6)


def _evaluate_with_the_bundle_config(task, cases, tmp_path, **overrides):
    """Run the metric, post-processing, inferer and Dice writer of ``bundles/<task>/configs/evaluate.json``
    in a MONAI evaluator whose network is the identity: each case's ``image`` holds the logits
    (+10 = foreground, -10 = background). Returns the key metric and the written summary."""
    from monai.bundle import ConfigParser
    from monai.data import DataLoader

    from bundle_utils import REPO

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / task / "configs" / "evaluate.json"))
    handlers = parser.get("handlers")
    writer_index = next(i for i, h in enumerate(handlers) if str(h.get("_target_", "")).endswith("PerCaseDiceWriter"))
    # no checkpoint here, so no training split or checkpoint to record (they come from the checkpoint's
    # training run); plain tensors on the model's grid, so Dice on that grid (nothing to invert)
    parser.update({"bundle_root": str(tmp_path), "output_dir": str(tmp_path), "eval_name": "m", "eval_space": "resized",
                   f"handlers#{writer_index}#split": None, f"handlers#{writer_index}#protocol": None,
                   **({"resample": "resize", "pixel_spacing": 0.625, "field_of_view": 140} if task == "prostate" else {}),
                   **overrides})
    data = [{"image": 20.0 * pred - 10.0, "label": label, "site": site, "case": case} for case, site, pred, label in cases]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(data, batch_size=1), network=torch.nn.Identity(),
        inferer=parser.get_parsed_content("inferer"), postprocessing=parser.get_parsed_content("postprocessing"),
        key_val_metric=parser.get_parsed_content("key_metric"), val_handlers=[parser.get_parsed_content(f"handlers#{writer_index}")],
    )
    evaluator.run()
    return evaluator.state.metrics["mean_dice"], json.loads((tmp_path / "m_summary.json").read_text())


def test_prostate_dice_through_the_evaluate_config(tmp_path):
    """False positives, a missed structure, an empty label with and without a prediction, by hand:
    one Dice definition for the per-case values (``PerCaseDiceWriter``) and the config's key metric
    (``MeanDice`` with ignore_empty false): an empty label scores 1 when nothing is predicted and 0
    for any prediction, so the logged metric is the mean of the written per-case values."""
    shape = (1, 4, 4, 2)  # a small volume [C, H, W, D]: 32 voxels
    label = torch.zeros(shape)
    label[0, :2] = 1  # 16 voxels
    half = torch.zeros(shape)
    half[0, :1] = 1  # 8 voxels, all inside the label
    fp = label.clone()
    fp[0, 3, :2] = 1  # the label plus 4 false positives
    stray = torch.zeros(shape)
    stray[0, 3, 3] = 1  # one false-positive voxel, no label
    empty = torch.zeros(shape)
    cases = [
        ("c1", "A", half, label),  # 2*8 / (8+16)
        ("c2", "A", fp, label),  # 2*16 / (20+16)
        ("c3", "B", empty, empty),  # nothing to find, nothing found
        ("c4", "B", stray, empty),  # false positive on an empty label
        ("c5", "B", empty, label),  # missed entirely
    ]
    expected = {"c1": 16 / 24, "c2": 32 / 36, "c3": 1.0, "c4": 0.0, "c5": 0.0}
    metric, summary = _evaluate_with_the_bundle_config("prostate", cases, tmp_path, image_size=4, batch_size=2)
    assert {c["case"]: c["prostate"] for c in summary["cases"]} == pytest.approx(expected, abs=1e-6)
    assert summary["sites"]["A"]["prostate"]["mean"] == pytest.approx((16 / 24 + 32 / 36) / 2)
    assert summary["sites"]["B"]["prostate"]["mean"] == pytest.approx(1 / 3)
    assert summary["sites"]["B"]["n"] == 3
    assert metric == pytest.approx(np.mean(list(expected.values())), abs=1e-6)
    # the paper-style table reads the per-case values: site B (unseen) 33.3 %
    from msf_monai.report import dg_table

    table = dg_table({"m": [summary]}, source_site="A")
    assert table.mean["m"]["unseen mean"] == pytest.approx([1 / 3])
    assert "| m | 77.8 | 33.3 | 33.3 |" in table.markdown()


def test_fundus_two_channel_dice_through_the_evaluate_config(tmp_path):
    """Disc and cup scored per channel; the config's post-processing keeps the cup inside the disc
    before scoring (a cup predicted outside the predicted disc is no cup)."""

    def masks(disc_box, cup_box, extra_cup=None):
        m = torch.zeros(2, 8, 8)
        (a, b), (c, d) = disc_box
        m[0, a:b, c:d] = 1
        (a, b), (c, d) = cup_box
        m[1, a:b, c:d] = 1
        if extra_cup is not None:
            m[1][extra_cup] = 1
        return m

    label = masks(((2, 6), (2, 6)), ((3, 5), (3, 5)))  # disc 16 pixels, cup 4 inside it
    p1 = masks(((2, 5), (2, 6)), ((3, 5), (3, 5)))  # disc 12 of 16, cup exact
    p2 = masks(((2, 6), (1, 6)), ((3, 4), (3, 5)))  # disc + 4 false positives, cup 2 of 4
    p3 = masks(((2, 6), (2, 6)), ((3, 5), (3, 5)), extra_cup=(slice(0, 1), slice(0, 2)))  # cup + 2 pixels outside the disc
    cases = [("f1", "Domain1", p1, label), ("f2", "Domain2", p2, label), ("f3", "Domain2", p3, label)]
    expected = {"f1": [24 / 28, 1.0], "f2": [32 / 36, 4 / 6], "f3": [1.0, 1.0]}  # f3's cup: 2*4/(6+4) without the rule
    metric, summary = _evaluate_with_the_bundle_config("fundus", cases, tmp_path, image_size=8)
    assert summary["channels"] == ["disc", "cup"]
    for c in summary["cases"]:
        assert [c["disc"], c["cup"]] == pytest.approx(expected[c["case"]], abs=1e-6), c["case"]
    assert summary["sites"]["Domain2"]["cup"]["mean"] == pytest.approx((4 / 6 + 1.0) / 2)
    assert metric == pytest.approx(np.mean([v for vs in expected.values() for v in vs]), abs=1e-6)
