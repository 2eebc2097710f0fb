"""Functions of scripts/*.py called in process: pipeline cost, style gallery, the evaluation table, packaging."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import torch

from bundle_utils import REPO, copy_bundle, load_script
from msf_monai.flows import StyleFlowBank
from msf_monai.networks import DualDecoderNet, image_decoder_channels

sys.path.insert(0, str(REPO / "scripts"))
import pipeline_cost  # noqa: E402


# ---------------------------------------------------------------------------------------------
# scripts/pipeline_cost.py
# ---------------------------------------------------------------------------------------------
def _log(path, seconds):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"parsing config_file ...\n2026-12-01 10:00:00,250 - INFO - start\nno stamp\n"
                    f"2026-12-01 10:{seconds // 60:02d}:{seconds % 60:02d},750 - INFO - end\n")


def test_pipeline_cost_sums_the_recipe_logs_and_reads_the_dice(tmp_path, capsys):
    for seed, (dice_base, dice_msf) in enumerate([(0.70, 0.74), (0.72, 0.70)]):
        run = tmp_path / f"seed{seed}"
        _log(run / "logs" / "phase1.log", 100)
        _log(run / "logs" / "style_flows.log", 10)
        _log(run / "logs" / "phase3_x.log", 200 + 20 * seed)
        for label, dice in (("Baseline", dice_base), ("MSF", dice_msf)):
            summary = {"channels": ["prostate"], "split": {"source_site": "SiteA"}, "cases": [],
                       "sites": {"SiteA": {"n": 2, "prostate": {"mean": 0.9}}, "SiteB": {"n": 3, "prostate": {"mean": dice}}}}
            (run / "eval" / "per_case").mkdir(parents=True, exist_ok=True)
            (run / "eval" / "per_case" / f"{label}_summary.json").write_text(json.dumps(summary))
    rows = pipeline_cost.main(str(tmp_path), {"Baseline": ["phase1"], "MSF": ["phase1", "style_flows", "phase3_x"], "Other": ["phase1"]})
    assert pipeline_cost.log_seconds(tmp_path / "seed0" / "logs" / "phase1.log") == pytest.approx(100.5)
    base, msf = rows
    assert base["seconds"] == pytest.approx(100.5) and base["dice_mean"] == pytest.approx(71.0) and base["dice_std"] == pytest.approx(1.0)
    assert msf["seconds"] == pytest.approx((100.5 + 10.5 + 200.5 + 100.5 + 10.5 + 220.5) / 2)  # median of the two seeds' sums
    out = capsys.readouterr().out
    assert "Other: no finished seed" in out and "| MSF | 2 | 72.0 ± 2.0 | 5.4 min | 3.20 |" in out
    assert "| recipe | seeds | SiteB Dice |" in out  # "unseen": every site but the source


def test_pipeline_cost_averages_several_unseen_sites_and_names_a_missing_one(tmp_path, capsys):
    run = tmp_path / "seed0"
    _log(run / "logs" / "phase1.log", 60)
    sites = {"SiteA": 0.9, "SiteB": 0.6, "SiteC": 0.7, "SiteD": 0.8}
    summary = {"channels": ["prostate"], "split": {"source_site": "SiteA"}, "cases": [],
               "sites": {k: {"n": 1, "prostate": {"mean": v}} for k, v in sites.items()}}
    (run / "eval" / "per_case").mkdir(parents=True)
    (run / "eval" / "per_case" / "Baseline_summary.json").write_text(json.dumps(summary))
    (row,) = pipeline_cost.main(str(tmp_path), {"Baseline": ["phase1"]})
    assert row["dice_mean"] == pytest.approx(70.0)  # the mean of B, C and D: the source is left out
    assert "| SiteB, SiteC, SiteD Dice |" in capsys.readouterr().out
    (row,) = pipeline_cost.main(str(tmp_path), {"Baseline": ["phase1"]}, site="SiteB,SiteD")
    assert row["dice_mean"] == pytest.approx(70.0)
    (row,) = pipeline_cost.main(str(tmp_path), {"Baseline": ["phase1"]}, site=("SiteC",))
    assert row["dice_mean"] == pytest.approx(70.0)
    (row,) = pipeline_cost.main(str(tmp_path), {"Baseline": ["phase1"]}, site="SiteA")
    assert row["dice_mean"] == pytest.approx(90.0)
    with pytest.raises(SystemExit, match=r"Baseline_summary.json: no site \['SiteE'\]"):
        pipeline_cost.main(str(tmp_path), {"Baseline": ["phase1"]}, site="SiteB,SiteE")
    del summary["split"]
    (run / "eval" / "per_case" / "Baseline_summary.json").write_text(json.dumps(summary))
    with pytest.raises(SystemExit, match="does not name its source site"):
        pipeline_cost.main(str(tmp_path), {"Baseline": ["phase1"]})


# ---------------------------------------------------------------------------------------------
# scripts/style_gallery.py and scripts/evaluate.py
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gallery_columns_stylize():
    from style_gallery import gallery_columns

    torch.manual_seed(0)
    net = DualDecoderNet()
    channels = image_decoder_channels()
    bank = StyleFlowBank({k: channels[k] for k in (2, 3, 4)})
    rng = np.random.default_rng(0)
    bank.fit({k: {"mean": rng.normal(size=(30, c)), "var": rng.uniform(0.5, 2, size=(30, c))} for k, c in bank.layer_channels.items()},
             epochs=1, lr=1e-3)
    images = torch.rand(3, 1, 32, 32)
    labels = (torch.rand(3, 1, 32, 32) > 0.7).float()
    cols = gallery_columns(net, bank, images, labels, temperatures=(1.0, 3.5))
    expected = {"clean", "reconstruction", "mixstyle", "dsu", "trid", "efdm", "randconv", "maxstyle (adversarial)",
                "MixStyleFlow T=1", "MixStyleFlow T=3.5", "MSF residual T=1", "MSF residual T=3.5"}
    assert set(cols) == expected
    for name, batch in cols.items():
        assert batch.shape == images.shape and torch.isfinite(batch).all(), name
    for name in expected - {"clean", "reconstruction", "randconv"}:
        assert not torch.allclose(cols[name], cols["reconstruction"], atol=1e-3), f"{name} did not stylize"
    assert not torch.allclose(cols["randconv"], images)
    assert len(net.image_decoder_styles) == 0  # the gallery leaves the network as it found it


@pytest.mark.slow
def test_the_table_gives_each_sites_style_shift_flags(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    from evaluate import write_table

    per_case = tmp_path / "per_case"
    per_case.mkdir()
    summary = {"channels": ["prostate"], "cases": [],
               "sites": {"SiteA": {"n": 2, "prostate": {"mean": 0.8}}, "SiteB": {"n": 3, "prostate": {"mean": 0.6}}}}
    (per_case / "m_summary.json").write_text(__import__("json").dumps(summary))
    assert "Style-shift flags" not in write_table({"m": [per_case / "m_summary.json"]}, tmp_path, "SiteA", "t")
    with open(per_case / "style_shift.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "site", "flag"])
        writer.writeheader()
        writer.writerows([{"case": "a1", "site": "SiteA", "flag": 0}, {"case": "a2", "site": "SiteA", "flag": 0},
                          {"case": "b1", "site": "SiteB", "flag": 1}, {"case": "b2", "site": "SiteB", "flag": 1},
                          {"case": "b3", "site": "SiteB", "flag": 0}])
    text = write_table({"m": [per_case / "m_summary.json"]}, tmp_path, "SiteA", "t")
    assert "SiteA 0/2 (0 %), SiteB 2/3 (67 %)" in text and text in (tmp_path / "dg_table.md").read_text()


# ---------------------------------------------------------------------------------------------
# scripts/package_bundle.py
# ---------------------------------------------------------------------------------------------
def _package_module():
    return load_script("package_bundle")


def test_packaging_an_untrained_bundle_fails_clearly(tmp_path):
    bundle = copy_bundle("prostate", tmp_path)
    with pytest.raises(SystemExit) as err:
        _package_module().package(bundle_root=str(bundle), output_dir=str(tmp_path))
    assert "model.pt" in str(err.value) and "phase1.json" in str(err.value)
