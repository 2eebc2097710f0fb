"""The scripts' command lines in their own processes: ``--help`` for every script, a bad boolean, the report command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bundle_utils import REPO

pytestmark = pytest.mark.slow


SCRIPTS = ["benchmark_dg.py", "evaluate.py", "style_gallery.py", "package_bundle.py", "prepare_sites.py",
           "benchmark_speed.py", "build_configs.py", "prepare_data.py msd_prostate", "prepare_data.py nci_isbi"]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help_with_exit_0(script, tmp_path):
    name, *command = script.split()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / name), *command, "--help"], cwd=tmp_path, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "FLAGS" in proc.stdout or "POSITIONAL ARGUMENTS" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.slow
def test_a_bad_boolean_stops_the_benchmark_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_dg.py"), "prostate", "--methods", "none",
                           "--reuse", "maybe", "--work_dir", str(tmp_path / "bench")], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode != 0 and "--reuse must be true or false" in proc.stdout
    assert not (tmp_path / "bench").exists()


@pytest.mark.slow
def test_report_cli_says_what_is_wrong_without_a_traceback(tmp_path):
    import json

    def report(*args):
        return subprocess.run([sys.executable, "-m", "msf_monai.report", *map(str, args)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)

    proc = report()
    assert proc.returncode == 1 and "usage: python -m msf_monai.report" in proc.stdout and "Traceback" not in proc.stdout
    proc = report(tmp_path / "missing_summary.json")
    assert proc.returncode == 1 and "evaluation summary not found" in proc.stdout and "Traceback" not in proc.stdout
    summary = {"channels": ["prostate"], "split": {"source_site": "A"},
               "sites": {"A": {"n": 1, "prostate": {"mean": 0.8, "std": 0}}, "B": {"n": 2, "prostate": {"mean": 0.6, "std": 0}}}}
    (tmp_path / "Net_summary.json").write_text(json.dumps(summary))
    proc = report(tmp_path / "Net_summary.json")
    assert proc.returncode == 0, proc.stdout
    assert "| model | A (source) | B | unseen mean |" in proc.stdout and "| Net | 80.0 | 60.0 | 60.0 |" in proc.stdout
