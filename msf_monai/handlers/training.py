"""Training handlers: what a user watches during Phase I and Phase III.

* :class:`PerturbationMonitor` - Phase III: how strong the style perturbation is, per epoch.
* :class:`StylizedImageSaver` - Phase III: PNG grid (and TensorBoard image) of clean vs
  stylized training images every few epochs.
* :class:`DataWaitTimer` - how much of each epoch is spent waiting for data.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils.enums import CommonKeys as Keys

__all__ = ["PerturbationMonitor", "StylizedImageSaver", "DataWaitTimer"]

logger = logging.getLogger("msf_monai.handlers")


class PerturbationMonitor:
    """Phase III: averages ``engine.state.perturbation`` (written by the training step:
    the stylized batch's relative distance from its un-stylized counterpart, the decoder's
    blur, and each style layer's statistics shift in units of the real statistics' spread) over
    each epoch, logs one line per epoch, and writes the per-epoch means and the whole run's mean
    to ``output_file`` (JSON) when training completes. Each quantity is averaged over the steps
    that measured it (a style layer that was inactive in a step, p < 1, measures nothing);
    ``active_share`` is the share of steps that measured anything.
    """

    def __init__(self, output_file: str | os.PathLike | None = None):
        self.output_file = output_file
        self._epoch: dict[str, list[float]] = defaultdict(list)
        self._steps = self._active = 0
        self.epochs: list[dict[str, float]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_done)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        self._steps += 1
        values = getattr(engine.state, "perturbation", None)
        engine.state.perturbation = None  # one measurement per step
        for key, value in (values or {}).items():
            self._epoch[key].append(float(value))
        self._active += bool(values)

    def _epoch_done(self, engine: Engine) -> None:
        if not self._epoch:
            self._steps = self._active = 0
            return
        means = {k: float(np.mean(v)) for k, v in sorted(self._epoch.items())}
        means["active_share"] = self._active / max(1, self._steps)
        means["epoch"] = int(engine.state.epoch)
        self.epochs.append(means)
        logger.info("epoch %d perturbation: %s", engine.state.epoch,
                    ", ".join(f"{k} {v:.3f}" for k, v in means.items() if k != "epoch"))
        self._epoch.clear()
        self._steps = self._active = 0

    def summary(self) -> dict[str, float]:
        """Mean over the epochs of each measured quantity."""
        keys = sorted({k for e in self.epochs for k in e if k != "epoch"})
        return {k: float(np.mean([e[k] for e in self.epochs if k in e])) for k in keys}

    def _write(self, engine: Engine) -> None:
        if self.output_file is None or not self.epochs:
            return
        Path(self.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(self.output_file).write_text(json.dumps({"mean": self.summary(), "epochs": self.epochs}, indent=1) + "\n")


class StylizedImageSaver:
    """Saves a PNG grid of clean (top row) and stylized (bottom row) training images every
    ``every_n_epochs`` epochs, from the last batch of the epoch, and adds it to TensorBoard
    when ``log_dir`` is given.

    Reads ``engine.state.output["image"]`` and ``["stylized"]`` (see
    :class:`msf_monai.engines.MixStyleFlowIteration`); shows the first channel (or RGB).
    """

    def __init__(self, output_dir: str | os.PathLike, every_n_epochs: int = 5, max_images: int = 8, log_dir: str | None = None):
        self.output_dir = Path(output_dir)
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.max_images = int(max_images)
        self.log_dir = log_dir
        self._writer = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every_n_epochs), self)
        engine.add_event_handler(Events.COMPLETED, self._close)

    def grid(self, output: dict | list[dict]) -> np.ndarray:
        """``[H', W', 3]`` uint8 grid of the clean and stylized images of a batch output
        (a dict of batched tensors, or MONAI's decollated list of per-image dicts)."""
        if isinstance(output, dict):
            clean, styled = output[Keys.IMAGE][: self.max_images], output["stylized"][: self.max_images]
        else:
            items = output[: self.max_images]
            clean = torch.stack([torch.as_tensor(d[Keys.IMAGE]) for d in items])
            styled = torch.stack([torch.as_tensor(d["stylized"]) for d in items])
        clean, styled = clean.detach().float().cpu(), styled.detach().float().cpu()
        rows = []
        for batch in (clean, styled):
            batch = batch[:, :3] if batch.shape[1] >= 3 else batch[:, :1].expand(-1, 3, -1, -1)
            lo = batch.amin(dim=(1, 2, 3), keepdim=True)
            hi = batch.amax(dim=(1, 2, 3), keepdim=True)
            batch = (batch - lo) / (hi - lo).clamp_min(1e-6)
            rows.append(torch.cat(list(batch), dim=2))  # [3, H, B*W]
        img = torch.cat(rows, dim=1).permute(1, 2, 0)
        return (img.numpy() * 255).round().astype(np.uint8)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        first = output[0] if isinstance(output, list) and output else output
        if not isinstance(first, dict) or "stylized" not in first:
            return
        from PIL import Image

        grid = self.grid(output)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"stylized_epoch{engine.state.epoch:04d}.png"
        Image.fromarray(grid).save(path)
        if self.log_dir is not None:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=self.log_dir)
            self._writer.add_image("clean_vs_stylized", grid, engine.state.epoch, dataformats="HWC")
            self._writer.flush()

    def _close(self, engine: Engine) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class DataWaitTimer:
    """Measures the time the engine waits for the data loader (ignite's ``GET_BATCH_STARTED``
    to ``GET_BATCH_COMPLETED``) against the epoch's iterations (from the epoch's start to its
    last iteration, so end-of-epoch validation does not count), and logs it every epoch, so a
    data pipeline that stalls training shows up (target: under 10 %).

    ``history`` holds one ``{"epoch", "data_wait_s", "epoch_s", "data_wait_fraction"}`` per epoch.
    """

    def __init__(self):
        self.history: list[dict] = []
        self._wait = 0.0
        self._started = self._epoch_started = self._last_iteration = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_start)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._batch_start)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._batch_done)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_done)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_done)

    def _epoch_start(self, engine: Engine) -> None:
        self._wait = 0.0
        self._epoch_started = time.perf_counter()

    def _batch_start(self, engine: Engine) -> None:
        self._started = time.perf_counter()

    def _batch_done(self, engine: Engine) -> None:
        self._wait += time.perf_counter() - self._started

    def _iteration_done(self, engine: Engine) -> None:
        self._last_iteration = time.perf_counter()

    def _epoch_done(self, engine: Engine) -> None:
        total = max(self._last_iteration - self._epoch_started, 0.0)
        record = {
            "epoch": engine.state.epoch,
            "data_wait_s": self._wait,
            "epoch_s": total,
            "data_wait_fraction": self._wait / total if total > 0 else 0.0,
        }
        self.history.append(record)
        logger.info("epoch %d: %.2f s, of which %.2f s (%.1f %%) waiting for data", record["epoch"], total, self._wait, 100 * record["data_wait_fraction"])
