"""Scripts that measure what a recipe costs, in their own processes: per-phase memory and the prepared GPU check (on CPU here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bundle_utils import REPO

pytestmark = pytest.mark.slow


@pytest.mark.slow
def test_memory_per_phase_measures_each_phase_in_its_own_process(tmp_path):
    out = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, "scripts/memory_per_phase.py", "--sizes", "[32]", "--batch", "2", "--steps", "1",
                           "--device", "cpu", "--output", str(out)], cwd=REPO, check=True, capture_output=True, text=True)
    assert done.stdout.rstrip().splitlines()[-1].startswith("| 32 | inference")  # the table ends the output
    mib = json.loads(out.read_text())["mib"]
    assert set(mib) == {"32 phase1", "32 phase3", "32 inference"}
    assert all(100 < v < 8000 for v in mib.values())  # a torch process, not more than this machine has


@pytest.mark.slow
def test_gpu_check_script_runs_its_steps_and_writes_a_summary(tmp_path):
    """The prepared GPU check refuses a machine without CUDA, and (GPU_CHECK_ALLOW_CPU=1, tiny
    size) runs all its steps on CPU and writes the summary."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    refused = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "no CUDA device" in refused.stderr
    env.update(GPU_CHECK_ALLOW_CPU="1", SIZE="32", EPOCHS="1", GPU_CHECK_LIMIT_SCALE="4", GPU_CHECK_TESTS="tests/unit/test_accelerator.py::test_settings_resolve_per_device",
               GPU_CHECK_SPEED_ARGS="--repeats 1 --warmup 0 --flow_epochs 1 --phase2_slices 4 --methods []")
    done = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary["steps"]) == ["tests", "benchmark_speed", "phase1", "phase2", "phase3", "evaluate"]
    assert all(s["exit_status"] == 0 for s in summary["steps"].values())
    assert summary["evaluation"]["sites"] and "phase2" in summary["benchmark_speed"]["results"]["32x32"]
    assert "| phase3 |" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.slow
def test_pipeline_cost_command_prints_the_table_only(tmp_path):
    run = tmp_path / "seed0"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "phase1.log").write_text("2026-12-01 10:00:00,000 - start\n2026-12-01 10:01:00,000 - end\n")
    (run / "eval" / "per_case").mkdir(parents=True)
    summary = {"channels": ["prostate"], "split": {"source_site": "SiteA"}, "cases": [],
               "sites": {"SiteA": {"n": 1, "prostate": {"mean": 0.9}}, "SiteB": {"n": 1, "prostate": {"mean": 0.7}}}}
    (run / "eval" / "per_case" / "Baseline_summary.json").write_text(json.dumps(summary))
    done = subprocess.run([sys.executable, "scripts/pipeline_cost.py", str(tmp_path), "--recipes", "{'Baseline': ['phase1']}"],
                          cwd=REPO, check=True, capture_output=True, text=True)
    assert done.stdout.rstrip().splitlines() == [
        "| recipe | seeds | SiteB Dice | wall time (median) | × Baseline | parts (median s) |", "|---|---|---|---|---|---|",
        "| Baseline | 1 | 70.0 ± 0.0 | 1.0 min | 1.00 | phase1 60 |"]
