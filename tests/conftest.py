"""Shared fixtures. ``device``: the tests that take it run on CPU and, where CUDA is present
(``scripts/gpu_check.sh``), once more on the GPU."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)
