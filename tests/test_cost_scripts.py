"""Scripts that measure what a recipe costs: pipeline wall time from run logs, per-phase memory,
and the prepared GPU check (run here on CPU so the script keeps working)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bundle_utils import REPO

sys.path.insert(0, str(REPO / "scripts"))
import pipeline_cost  # noqa: E402


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
            summary = {"channels": ["prostate"], "sites": {"SiteB": {"n": 3, "prostate": {"mean": dice}}}, "cases": []}
            (run / "eval" / "per_case").mkdir(parents=True, exist_ok=True)
            (run / "eval" / "per_case" / f"{label}_summary.json").write_text(json.dumps(summary))
    rows = pipeline_cost.main(str(tmp_path), {"Baseline": ["phase1"], "MSF": ["phase1", "style_flows", "phase3_x"], "Other": ["phase1"]})
    assert pipeline_cost.log_seconds(tmp_path / "seed0" / "logs" / "phase1.log") == pytest.approx(100.5)
    base, msf = rows
    assert base["seconds"] == pytest.approx(100.5) and base["dice_mean"] == pytest.approx(71.0) and base["dice_std"] == pytest.approx(1.0)
    assert msf["seconds"] == pytest.approx((100.5 + 10.5 + 200.5 + 100.5 + 10.5 + 220.5) / 2)  # median of the two seeds' sums
    out = capsys.readouterr().out
    assert "Other: no finished seed" in out and "| MSF | 2 | 72.0 ± 2.0 | 5.4 min | 3.20 |" in out


@pytest.mark.slow
def test_memory_per_phase_measures_each_phase_in_its_own_process(tmp_path):
    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, "scripts/memory_per_phase.py", "--sizes", "[32]", "--batch", "2", "--steps", "1",
                    "--device", "cpu", "--output", str(out)], cwd=REPO, check=True, capture_output=True, text=True)
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
    env.update(GPU_CHECK_ALLOW_CPU="1", SIZE="32", EPOCHS="1", GPU_CHECK_LIMIT_SCALE="4", GPU_CHECK_TESTS="tests/test_accelerator.py::test_settings_resolve_per_device",
               GPU_CHECK_SPEED_ARGS="--repeats 1 --warmup 0 --flow_epochs 1 --phase2_slices 4 --methods []")
    done = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary["steps"]) == ["tests", "benchmark_speed", "phase1", "phase2", "phase3", "evaluate"]
    assert all(s["exit_status"] == 0 for s in summary["steps"].values())
    assert summary["evaluation"]["sites"] and "phase2" in summary["benchmark_speed"]["results"]["32x32"]
    assert "| phase3 |" in (tmp_path / "out" / "summary.md").read_text()
