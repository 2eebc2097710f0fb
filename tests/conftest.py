"""Shared fixtures. ``device``: the tests that take it run on CPU and, where CUDA is present
(``scripts/gpu_check.sh``), once more on the GPU.

The tests live in ``unit/`` (in process) and ``bundle/`` (bundle workflows and scripts in their own
processes); both import the helper modules of this folder (``bundle_utils``, ``data_utils``,
``training_utils``, ``multi_gpu_probe``), so it goes on ``sys.path`` whatever pytest's import mode."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)
