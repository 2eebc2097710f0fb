"""scripts/benchmark_speed.py runs end to end with tiny settings and reports every figure
(the speed targets themselves are checked by reading its output, not by a timed test)."""

import importlib.util
import json

import pytest
from bundle_utils import REPO


@pytest.mark.slow
def test_benchmark_speed_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_speed", REPO / "scripts" / "benchmark_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "speed.json"
    module.main(sizes=(32,), batch_size=4, warmup=1, repeats=2, phase2_slices=8, flow_epochs=1, methods=("mixstyle", "randconv"), output=str(out))
    report = json.loads(out.read_text())
    res = report["results"]["32x32"]
    for key in ("phase1", "phase3_mixstyleflow", "flow_sample_mix", "step_mixstyle", "step_randconv", "inference", "phase2"):
        assert key in res
    assert len(res["phase1"]["times_s"]) == 2
    assert len(res["flow_sample_mix"]["times_s"]) == 2
    # the time inside the style layers is part of the Phase III step
    assert 0 < res["flow_sample_mix"]["median_s"] < res["phase3_mixstyleflow"]["median_s"]
    assert res["inference"]["slices_per_s"] > 0
    assert res["phase2"]["extract_s_per_1000_slices"] > 0
    printed = capsys.readouterr().out
    assert "| 32x32 | phase3_mixstyleflow |" in printed and "of a Phase III step" in printed
