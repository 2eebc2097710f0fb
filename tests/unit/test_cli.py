"""The fire scripts' shared command line (msf_monai.cli): one boolean parser for every flag, and ``--help`` that never runs anything."""

from __future__ import annotations

import pytest

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
