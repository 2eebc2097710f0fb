"""scripts/evaluate.py and scripts/benchmark_dg.py on tiny real runs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from bundle_utils import REPO, check, copy_bundle, run_bundle
from msf_monai.bundle import select_sites
from msf_monai.data import split_by_patient
from msf_monai.networks import SegmentationOnlyNet
from msf_monai.tasks.prostate.synthetic import generate_demo_prostate

pytestmark = pytest.mark.slow


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

    # --checkpoint_policy last: the last epoch's weights of the finished runs, in their own
    # folders, so the best-checkpoint tables stay as they are
    best_ablation = (work / "ablation.md").read_text()
    text = _script(*args, "--train", "false", "--checkpoint_policy", "last", cwd=tmp_path)
    assert (work / "ablation.md").read_text() == best_ablation
    last = (work / "last" / "ablation.md").read_text()
    assert "| RandConv always | 1 |" in last and "the last epoch's checkpoint" in last
    evaluated = {json.loads(p.read_text())["protocol"]["checkpoint"]: json.loads(p.read_text())["protocol"]
                 for p in (work / "seed0" / "eval_last" / "per_case").glob("*_summary.json")}
    assert set(evaluated) == {"phase1_model_final.pt", "model_randconv_style_p-1.0_final.pt"}
    assert {(p["checkpoint_policy"], p["selected_on"]) for p in evaluated.values()} == {("last", "none (the last epoch)")}
    best = json.loads((work / "seed0" / "eval" / "per_case" / "Baseline_summary.json").read_text())["protocol"]
    assert best["checkpoint"] == "phase1_model.pt" and best["selected_on"] == "source validation"
    proc = subprocess.run([sys.executable, *map(str, args), "--checkpoint_policy", "newest"], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode != 0 and "--checkpoint_policy must be one of best, last, not 'newest'" in proc.stdout


@pytest.mark.slow
def test_evaluate_script_leaves_training_patients_out(tmp_path):
    """Real-data defaults (no default source site), a training run with a non-default split,
    then ``scripts/evaluate.py`` without --source_site, --seed or --val_fraction."""
    data = tmp_path / "data"
    generate_demo_prostate(data, cases_per_site={"SiteA": 8, "SiteB": 2}, shape=(40, 40, 6), sites=["SiteA", "SiteB"])
    bundle = copy_bundle("prostate", tmp_path)
    common = ("--dataset_dir", str(data), "--image_size", "32")
    check(run_bundle(tmp_path, "phase1", *common, "--source_site", "SiteA", "--seed", "2", "--val_fraction", "0.4",
                     "--epochs", "1", "--batch_size", "8", "--val_interval", "1"))
    ckpt = bundle / "models" / "phase1_model.pt"
    record = json.loads((bundle / "models" / "phase1_model_training.json").read_text())
    assert record["settings"]["seed"] == 2 and record["settings"]["source_site"] == "SiteA"

    out = tmp_path / "table"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(REPO / "scripts" / "evaluate.py"), str(bundle), str(ckpt), "--names", "Baseline",
           "--output_dir", str(out), *common]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    from msf_monai.tasks.prostate import prostate_datalist

    _, val = split_by_patient(select_sites(prostate_datalist(str(data)), "SiteA"), val_fraction=0.4, seed=2)
    rows = _read_csv(out / "per_case" / "Baseline_per_case.csv")
    assert sorted(r["case"] for r in rows if r["site"] == "SiteA") == sorted(d["case"] for d in val)
    assert sorted(r["case"] for r in rows if r["site"] == "SiteB") == ["Case08", "Case09"]
    summary = json.loads((out / "per_case" / "Baseline_summary.json").read_text())
    assert summary["split"]["source_cases"] == len(val) == summary["sites"]["SiteA"]["n"]
    assert summary["split"]["source_total"] == 8
    assert "| model | SiteA (source) | SiteB | unseen mean |" in proc.stdout  # the table knows the source

    # evaluate.json with another split than training: stopped before any work, no traceback
    proc = run_bundle(tmp_path, "evaluate", *common, "--checkpoint", str(ckpt), "--seed", "0")
    assert proc.returncode == 1 and "--seed 0 (trained with 2)" in proc.stdout and "Traceback" not in proc.stdout
