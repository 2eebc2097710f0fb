"""The fire scripts: one boolean parser for every flag, and ``--help`` that never runs anything."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bundle_utils import REPO
from msf_monai.cli import as_bool, fire_main


@pytest.mark.parametrize("value", [True, 1, "true", "True", "TRUE", "1", "yes", "Yes", "on", " y "])
def test_true_values(value):
    assert as_bool(value, "--reuse") is True


@pytest.mark.parametrize("value", [False, 0, "false", "False", "0", "no", "NO", "off", "n"])
def test_false_values(value):
    assert as_bool(value, "--reuse") is False


@pytest.mark.parametrize("value", ["maybe", "", 2, None, 0.5, "ture"])
def test_anything_else_is_an_error_naming_the_flag(value):
    with pytest.raises(ValueError, match="--gallery must be true or false"):
        as_bool(value, "--gallery")


def test_help_prints_and_exits_without_running(capsys):
    ran = []

    def main(bundle: str = "prostate", reuse: bool = False, **overrides):
        """Does work."""
        ran.append((bundle, reuse, overrides))

    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as exit_info:
            fire_main(main, ["prostate", flag])
        assert exit_info.value.code == 0
    printed = capsys.readouterr()
    assert not ran and "Does work" in printed.out + printed.err
    fire_main(main, ["fundus", "--reuse", "false", "--epochs", "3"])
    assert ran == [("fundus", "false", {"epochs": 3})]  # fire's value; the scripts pass it to as_bool


SCRIPTS = ["benchmark_dg.py", "evaluate.py", "style_gallery.py", "package_bundle.py", "prepare_sites.py",
           "benchmark_speed.py", "build_configs.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help_with_exit_0(script, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--help"], cwd=tmp_path, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "FLAGS" in proc.stdout or "POSITIONAL ARGUMENTS" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_bad_boolean_stops_the_benchmark_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_dg.py"), "prostate", "--methods", "none",
                           "--reuse", "maybe", "--work_dir", str(tmp_path / "bench")], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode != 0 and "--reuse must be true or false" in proc.stdout
    assert not (tmp_path / "bench").exists()
