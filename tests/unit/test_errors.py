"""The error policy (msf_monai.errors): user errors are ordinary, catchable exceptions in the
library and a message alone with exit status 1 at the process boundary."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bundle_utils import REPO
from msf_monai.bundle import ConfigValueError, MissingPhaseOutputError, PhaseError, select_sites
from msf_monai.data import DataListError, DataValidationError
from msf_monai.data.prepare import PreparationError
from msf_monai.errors import MsfError, user_error_in
from msf_monai.resume import InterruptedRun, PhaseFinishedError, ResumeError


def test_user_errors_are_catchable_value_errors():
    for kind in (ConfigValueError, MissingPhaseOutputError, PhaseError, DataValidationError, DataListError,
                 ResumeError, PreparationError):
        assert issubclass(kind, MsfError) and issubclass(kind, ValueError) and not issubclass(kind, SystemExit), kind
    # the two deliberate exits stay exits: "already finished" (status 0) and Ctrl-C (status 130)
    assert issubclass(PhaseFinishedError, SystemExit) and issubclass(InterruptedRun, SystemExit)
    with pytest.raises(ValueError, match=r"site\(s\) \['C'\] not in the dataset"):
        select_sites([{"site": "A"}, {"site": "B"}], "C")


def test_the_user_error_is_found_behind_monais_wrapper():
    inner = ConfigValueError("--style_method 'x': unknown")
    try:
        try:
            raise inner
        except ConfigValueError as err:
            raise RuntimeError("Failed to evaluate ConfigExpression") from err
    except RuntimeError as outer:
        assert user_error_in(outer) is inner
    assert user_error_in(RuntimeError("other")) is None and user_error_in(None) is None


def _raise_in_a_process(code: str, **env):
    script = f"import msf_monai\nfrom msf_monai.bundle import ConfigValueError\n{code}\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env})


@pytest.mark.slow
def test_an_uncaught_user_error_is_its_message_and_exit_status_1():
    wrapped = "try:\n    raise ConfigValueError('--image_size 30: must be a multiple of 16')\n" \
              "except ValueError as err:\n    raise RuntimeError('Failed to evaluate') from err"
    proc = _raise_in_a_process(wrapped)
    assert proc.returncode == 1 and proc.stderr.strip() == "--image_size 30: must be a multiple of 16", proc.stderr
    # MSF_TRACEBACK=1 shows the whole chain; any other exception keeps its traceback
    shown = _raise_in_a_process(wrapped, MSF_TRACEBACK="1")
    assert shown.returncode == 1 and "Traceback" in shown.stderr and "RuntimeError: Failed to evaluate" in shown.stderr
    other = _raise_in_a_process("raise KeyError('bug')")
    assert other.returncode == 1 and "Traceback" in other.stderr and "KeyError: 'bug'" in other.stderr
