"""Evaluation never counts training patients as source results (issue 16, item 1): the source
site's cases are the validation side of the split the checkpoint was trained with."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from bundle_utils import REPO, check, copy_bundle, run_bundle
from msf_monai.bundle import ConfigValueError, evaluation_split, select_sites
from msf_monai.data import split_by_patient
from msf_monai.tasks.prostate.synthetic import generate_demo_prostate
from msf_monai.training_record import read_training_record, training_record_file, write_training_record


def _datalist(n_source=10, n_other=3):
    items = [{"image": f"A/Case{i:02d}.nii.gz", "label": "l", "site": "SiteA", "case": f"Case{i:02d}"} for i in range(n_source)]
    items += [{"image": f"B/Case{i:02d}.nii.gz", "label": "l", "site": "SiteB", "case": f"Case{i:02d}"}
              for i in range(n_source, n_source + n_other)]
    return items


def _cases(split, site):
    return sorted(d["case"] for d in split["cases"] if d["site"] == site)


def test_split_follows_the_training_record(tmp_path):
    data = _datalist()
    ckpt = tmp_path / "model.pt"
    torch.save({}, ckpt)
    write_training_record(ckpt, {"source_site": "SiteA", "seed": 3, "val_fraction": 0.4, "dataset_dir": "/d"})
    _, val = split_by_patient(select_sites(data, "SiteA"), val_fraction=0.4, seed=3)
    _, default_val = split_by_patient(select_sites(data, "SiteA"), val_fraction=0.2, seed=0)
    expected = sorted(d["case"] for d in val)
    assert expected != sorted(d["case"] for d in default_val)  # the test can tell the two splits apart

    split = evaluation_split(data, ckpt)  # nothing given: everything from the record
    assert _cases(split, "SiteA") == expected and len(_cases(split, "SiteB")) == 3
    info = {k: split["info"][k] for k in ("source_site", "seed", "val_fraction", "source_cases", "source_total")}
    assert info == {"source_site": "SiteA", "seed": 3, "val_fraction": 0.4, "source_cases": len(expected), "source_total": 10}
    # the same values given explicitly are fine; the final checkpoint shares the record
    assert _cases(evaluation_split(data, ckpt, source_site="SiteA", seed=3, val_fraction=0.4), "SiteA") == expected
    assert _cases(evaluation_split(data, tmp_path / "model_final.pt"), "SiteA") == expected
    # another split would count training patients: refused, naming the setting and the record
    for kwargs in ({"seed": 0}, {"val_fraction": 0.2}, {"source_site": "SiteB"}):
        with pytest.raises(ConfigValueError) as err:
            evaluation_split(data, ckpt, **kwargs)
        key = next(iter(kwargs))
        assert f"--{key}" in str(err.value) and str(training_record_file(ckpt)) in str(err.value)


def test_split_without_a_record(tmp_path):
    data = _datalist()
    bare = tmp_path / "weights.pt"
    assert read_training_record(bare) is None
    split = evaluation_split(data, bare, source_site="SiteA")
    _, val = split_by_patient(select_sites(data, "SiteA"), val_fraction=0.2, seed=0)
    assert _cases(split, "SiteA") == sorted(d["case"] for d in val)
    everything = evaluation_split(data, bare)
    assert len(everything["cases"]) == len(data) and everything["info"]["source_site"] is None


def test_record_of_runs_before_it_existed_comes_from_the_saved_state(tmp_path):
    from msf_monai.resume import RESUME_FORMAT

    ckpt = tmp_path / "phase1_model.pt"
    torch.save({"format": RESUME_FORMAT, "settings": {"source_site": "SiteA", "seed": 5, "val_fraction": 0.3}},
               tmp_path / "phase1_model_resume.pt")
    record = read_training_record(ckpt)
    assert record["settings"]["seed"] == 5 and record["file"].endswith("phase1_model_resume.pt")


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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


def test_checkpoint_paths_and_hints(tmp_path, monkeypatch):
    from msf_monai.bundle import MissingPhaseOutputError, find_checkpoint

    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    torch.save({}, bundle / "models" / "phase1_model.pt")
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # relative to the bundle when it is not relative to the current directory
    assert find_checkpoint("models/phase1_model.pt", bundle) == str((bundle / "models" / "phase1_model.pt").resolve())
    torch.save({}, elsewhere / "mine.pt")
    assert find_checkpoint("mine.pt", bundle) == str((elsewhere / "mine.pt").resolve())
    # a missing file names the phase that writes it
    with pytest.raises(MissingPhaseOutputError, match="phase1.json"):
        find_checkpoint("models/phase1_model_final.pt", bundle)
    with pytest.raises(MissingPhaseOutputError, match="phase3.json"):
        find_checkpoint("models/model_dsu.pt", bundle)
