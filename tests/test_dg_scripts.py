"""scripts/evaluate.py, scripts/benchmark_dg.py and scripts/style_gallery.py on tiny real runs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bundle_utils import REPO, copy_bundle
from msf_monai.flows import StyleFlowBank
from msf_monai.networks import DualDecoderNet, SegmentationOnlyNet, image_decoder_channels

sys.path.insert(0, str(REPO / "scripts"))


def _script(*args, cwd, timeout=900) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_evaluate_script_table_matches_per_case_csvs(tmp_path):
    bundle = copy_bundle("prostate", tmp_path)
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"net{seed}.pt"
        torch.save(SegmentationOnlyNet().state_dict(), path)
        ckpts.append(path)
    out = tmp_path / "table"
    text = _script(REPO / "scripts" / "evaluate.py", bundle, *ckpts, "--names", "First,Second", "--output_dir", out,
                   "--image_size", "32", cwd=tmp_path)
    assert "| model | SiteA (source) | SiteB | SiteC | SiteD | unseen mean |" in text
    rows = _read_csv(out / "dg_table.csv")
    assert [r["model"] for r in rows] == ["First", "Second"]
    for row, name in zip(rows, ("First", "Second")):
        cases = _read_csv(out / "per_case" / f"{name}_per_case.csv")
        by_site = {}
        for c in cases:
            by_site.setdefault(c["site"], []).append(float(c["prostate"]))
        assert set(by_site) == {"SiteA", "SiteB", "SiteC", "SiteD"}
        for site, values in by_site.items():
            assert float(row[f"{site} prostate"]) == pytest.approx(100 * np.mean(values), abs=1e-3)
        unseen = np.mean([np.mean(by_site[s]) for s in ("SiteB", "SiteC", "SiteD")])
        assert float(row["unseen mean prostate"]) == pytest.approx(100 * unseen, abs=1e-3)
    assert (out / "dg_table.png").stat().st_size > 1000 and (out / "dg_table.md").is_file()


@pytest.mark.slow
def test_benchmark_script_trains_evaluates_and_tabulates(tmp_path):
    bundle = copy_bundle("prostate", tmp_path)
    work = tmp_path / "bench"
    args = [REPO / "scripts" / "benchmark_dg.py", bundle, "--methods", "none,randconv(style_p=1.0, label=RandConv always)",
            "--seeds", "0", "--fraction", "0.5", "--work_dir", work, "--image_size", "32", "--epochs", "1",
            "--batch_size", "8", "--gallery", "false"]
    text = _script(*args, cwd=tmp_path)
    assert "Phase I" in text and "RandConv always" in text and "benchmark finished" in text
    models = work / "seed0" / "models"
    assert (models / "phase1_model.pt").is_file()
    assert (models / "model_randconv_style_p-1.0.pt").is_file()  # an arm with settings keeps its own files
    rows = _read_csv(work / "dg_table.csv")
    assert [r["model"] for r in rows] == ["Baseline", "RandConv always"]
    ablation = (work / "ablation.md").read_text()
    assert "| RandConv always | 1 |" in ablation and "sign test p" in ablation
    assert "Protocol: Dice per volume, all slices, each scan's original geometry, best checkpoint" in ablation
    assert "Protocol: Dice per volume" in (work / "dg_table.md").read_text()
    assert not (work / "style_gallery.png").exists()  # --gallery false means no gallery
    log = (work / "seed0" / "logs" / "phase1.log").read_text()
    assert "train_fraction 0.50" in log  # the low-data regime reached the training run
    assert "style_p" in (work / "seed0" / "logs" / "phase3_randconv_style_p-1.0.log").read_text()

    # --reuse: finished runs are skipped; a run whose saved state is unfinished (a *_final.pt is
    # also written on Ctrl-C) is trained again
    state_file = models / "model_randconv_style_p-1.0_resume.pt"
    state = torch.load(state_file, weights_only=True)
    state["finished"], state["epoch"] = False, 0
    torch.save(state, state_file)
    text = _script(*args, "--reuse", "true", cwd=tmp_path)
    assert "Phase I: finished before" in text
    assert "RandConv always: finished before" not in text and "RandConv always (benchmark at" in text
    assert torch.load(state_file, weights_only=True)["finished"]


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
