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


def test_report_makes_one_row_of_the_seeds_of_a_model(tmp_path):
    """``seed*/eval/model_summary.json``: one row per model name, mean ± std over the seeds."""
    import json

    from msf_monai.report import summary_table

    files = []
    for seed, (a, b) in enumerate([(0.8, 0.6), (0.9, 0.7)]):
        folder = tmp_path / f"seed{seed}" / "eval"
        folder.mkdir(parents=True)
        summary = {"channels": ["prostate"], "split": {"source_site": "A"},
                   "sites": {"A": {"n": 1, "prostate": {"mean": a, "std": 0}}, "B": {"n": 2, "prostate": {"mean": b, "std": 0}}}}
        (folder / "model_summary.json").write_text(json.dumps(summary))
        files.append(str(folder / "model_summary.json"))
    table = summary_table(*files)
    rows = [line for line in table.splitlines() if line.startswith("| model |")]
    assert len(rows) == 1 and "85.0" in rows[0] and "65.0" in rows[0] and "±" in rows[0], table


def test_every_table_states_its_dice_protocol(tmp_path):
    """The protocol of the summaries under the table; differing protocols are flagged, and
    summaries from before 0.5.0 (no protocol recorded) are named as such."""
    import json

    from msf_monai.report import summary_table

    base = {"channels": ["prostate"], "split": {"source_site": "A"},
            "sites": {"A": {"n": 1, "prostate": {"mean": 0.8, "std": 0}}, "B": {"n": 1, "prostate": {"mean": 0.6, "std": 0}}}}
    original = {"eval_space": "original", "dice": "volume", "eval_slices": "all", "checkpoint_policy": "best",
                "selected_on": "source validation"}
    (tmp_path / "X_summary.json").write_text(json.dumps(dict(base, protocol=original)))
    (tmp_path / "Y_summary.json").write_text(json.dumps(dict(base, protocol=dict(original, dice="slice", eval_space="resized"))))
    (tmp_path / "Old_summary.json").write_text(json.dumps(base))
    one = summary_table(str(tmp_path / "X_summary.json"))
    assert one.endswith("Protocol: Dice per volume, all slices, each scan's original geometry, best checkpoint on source validation.")
    mixed = summary_table(*(str(tmp_path / f"{n}_summary.json") for n in ("X", "Y", "Old")))
    assert "MIXED" in mixed and "per slice, all slices, the resized grid" in mixed and "recorded before 0.5.0" in mixed
