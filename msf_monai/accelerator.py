"""What the bundle configs do on a GPU: mixed precision, cuDNN autotuning, data-loader workers.

The configs call these with the run's ``device`` so that one config serves both worlds: on CUDA
the usual speed settings of MONAI training are on by default, on CPU nothing changes (the CPU
defaults are the ones the test suite and the benchmarks measured).

* ``amp`` ``"auto"`` (default): mixed precision on CUDA (bfloat16 where the GPU supports it,
  float16 otherwise, with MONAI's gradient scaler), off on CPU. Style statistics and the flows
  stay in float32 (:func:`msf_monai.styles.channel_stats`, :meth:`StyleFlowBank.sample`).
* ``num_workers`` ``"auto"`` (default): 4 data-loader workers on CUDA (at most the CPU count),
  0 on CPU; pinned memory on CUDA.
* cuDNN picks the fastest convolution algorithms (``cudnn.benchmark``) unless
  ``--deterministic true``.
"""

from __future__ import annotations

import logging
import os

import torch

from .cli import as_bool

__all__ = ["amp_enabled", "amp_kwargs", "configure_backends", "pin_memory", "worker_count", "AUTO"]

logger = logging.getLogger(__name__)
AUTO = "auto"


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _is_auto(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() == AUTO)


def amp_enabled(amp, device) -> bool:
    """``amp`` (``"auto"``, true or false) resolved for ``device``: ``"auto"`` is true on CUDA;
    true on a CPU device is turned off with a notice (MONAI's AMP is CUDA's)."""
    if _is_auto(amp):
        return _is_cuda(device)
    enabled = as_bool(amp, "--amp")
    if enabled and not _is_cuda(device):
        logger.info("--amp true needs a CUDA device; running in float32 on %s", device)
        return False
    return enabled


def amp_kwargs(device) -> dict:
    """``torch.autocast`` arguments for ``device``: bfloat16 on GPUs that support it (no loss
    scaling needed, no overflow), float16 otherwise; ``{}`` on CPU."""
    if not _is_cuda(device):
        return {}
    return {"dtype": torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16}


def worker_count(num_workers, device) -> int:
    """Data-loader workers: ``"auto"`` is ``min(4, CPUs)`` on CUDA and 0 on CPU (on CPU the
    training itself needs the cores; the deterministic transforms are cached); a number is
    used as it is."""
    if _is_auto(num_workers):
        return min(4, os.cpu_count() or 1) if _is_cuda(device) else 0
    return int(num_workers)


def pin_memory(device) -> bool:
    """Page-locked batches on CUDA (faster host-to-GPU copies)."""
    return _is_cuda(device)


def configure_backends(device, deterministic=False) -> None:
    """On CUDA, let cuDNN autotune convolution algorithms unless ``deterministic``. Call after
    ``monai.utils.set_determinism``, which turns autotuning off for reproducibility."""
    if not _is_cuda(device):
        return
    deterministic = as_bool(deterministic, "--deterministic")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
