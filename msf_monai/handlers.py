"""Ignite handlers used by the bundles.

* :class:`StyleStatisticsRecorder` - Phase II: gathers the per-image, per-channel feature
  statistics that :class:`StyleStatisticsIteration` computes, in one pass, and saves them.
* :class:`PerturbationMonitor` - Phase III: how strong the style perturbation is, per epoch.
* :class:`StyleFlowFitter` - Phase II: fits the style flows on those statistics when the pass
  ends, saves the flow checkpoint, the NLL log and a real-vs-sampled comparison plot.
* :class:`StylizedImageSaver` - Phase III: PNG grid (and TensorBoard image) of clean vs
  stylized training images every few epochs.
* :class:`PerCaseDiceWriter` - evaluation: Dice per case (3-D volume or 2-D image) and
  per-site means, written as CSV and JSON.
* :class:`DataWaitTimer` - training: how much of each epoch is spent waiting for data.
* :class:`CaseProgressLogger` - inference/evaluation: one progress line per batch of cases.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.metrics import compute_dice
from monai.utils.enums import CommonKeys as Keys

__all__ = [
    "StyleStatisticsIteration",
    "PerturbationMonitor",
    "StyleStatisticsRecorder",
    "StyleFlowFitter",
    "StylizedImageSaver",
    "PerCaseDiceWriter",
    "case_dice",
    "DataWaitTimer",
    "CaseProgressLogger",
]

logger = logging.getLogger("msf_monai.handlers")


class StyleStatisticsIteration:
    """``iteration_update`` for a MONAI ``SupervisedEvaluator`` that records style statistics.

    Returns, in ``engine.state.output["style_stats"]``, ``{layer: (mean [B, C], variance [B, C])}``
    (spatial mean and population variance per image and channel) of every image-decoder layer
    (``source="image_decoder"``) or encoder stage (``source="encoder"``) of the frozen network.

    Args:
        regime: ``"train"`` (default, as the reference code): the statistics Phase III mixes
            styles into -- batch norm in training mode (batch statistics; running statistics left
            unchanged), the input noised like a training batch (``noise_std``); feed augmented,
            shuffled training batches. ``"eval"``: batch norm with running statistics, clean
            input (this package before 0.3).
        source: ``"image_decoder"`` (MixStyleFlow) or ``"encoder"`` (encoder-level MixStyleFlow).
        noise_std: the denoising input noise of the training step (``"train"`` regime only).
    """

    REGIMES = ("train", "eval")
    SOURCES = ("image_decoder", "encoder")

    def __init__(self, regime: str = "train", source: str = "image_decoder", noise_std: float = 0.05):
        if regime not in self.REGIMES:
            raise ValueError(f"stats_regime must be one of {self.REGIMES}, got {regime!r}")
        if source not in self.SOURCES:
            raise ValueError(f"style_source must be one of {self.SOURCES}, got {source!r}")
        self.regime, self.source, self.noise_std = regime, source, float(noise_std)

    def features(self, net: torch.nn.Module, inputs: torch.Tensor) -> dict[int, torch.Tensor]:
        """The feature maps of the chosen source, in the chosen regime (no gradient)."""
        from msf_monai.engines import add_image_noise, frozen_batchnorm_statistics

        with torch.no_grad():
            if self.regime == "eval":
                net.eval()
                return self._features(net, inputs)
            net.train()
            with frozen_batchnorm_statistics(net):
                return self._features(net, add_image_noise(inputs, self.noise_std))

    def _features(self, net: torch.nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
        if self.source == "encoder":
            return net.encoder_features(x)
        return net.reconstruct(net.encode(x), return_features=True)[1]

    def __call__(self, engine, batchdata: dict) -> dict:
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs = batch[0]
        feats = self.features(engine.network, inputs)
        stats = {k: (f.float().mean(dim=(2, 3)), f.float().var(dim=(2, 3), unbiased=False)) for k, f in feats.items()}
        engine.state.output = {Keys.IMAGE: inputs, "style_stats": stats}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output



class StyleStatisticsRecorder:
    """Collects ``style_stats`` of the chosen layers over one pass and saves them as ``.npz``
    (arrays ``mean_<layer>`` and ``var_<layer>`` of shape [N, C]).

    Args:
        layers: image-decoder layers to keep (paper: 2, 3, 4).
        output_path: where to write the ``.npz`` when the pass completes (``None``: don't).
    """

    def __init__(self, layers: Sequence[int] = (2, 3, 4), output_path: str | os.PathLike | None = None):
        self.layers = [int(k) for k in layers]
        self.output_path = output_path
        self._parts: dict[int, list] = defaultdict(list)
        self.stats: dict[int, dict[str, np.ndarray]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._finish)

    def _reset(self, engine: Engine) -> None:
        self._parts.clear()
        self.stats = {}

    def _collect(self, engine: Engine) -> None:
        stats = engine.state.output["style_stats"]
        missing = [k for k in self.layers if k not in stats]
        if missing:
            raise KeyError(f"the network has no image-decoder layer(s) {missing}; available: {sorted(stats)}")
        for k in self.layers:
            mean, var = stats[k]
            self._parts[k].append((mean.cpu(), var.cpu()))

    def _finish(self, engine: Engine) -> None:
        for k in self.layers:
            means, variances = zip(*self._parts[k])
            self.stats[k] = {"mean": torch.cat(means).numpy(), "var": torch.cat(variances).numpy()}
        n = len(next(iter(self.stats.values()))["mean"]) if self.stats else 0
        logger.info("recorded style statistics of %d images at image-decoder layers %s", n, self.layers)
        if self.output_path is not None:
            from .files import atomic_write_npz

            atomic_write_npz(self.output_path, **{f"{s}_{k}": v[s] for k, v in self.stats.items() for s in ("mean", "var")})
            logger.info("saved style statistics to %s", self.output_path)


class StyleFlowFitter:
    """Fits a :class:`msf_monai.flows.StyleFlowBank` on a recorder's statistics when the
    statistics pass completes, and saves:

    * ``flow_path``: the flow checkpoint (one file; plain state dicts plus metadata);
    * ``log_path``: the per-epoch NLL history of every flow (JSON);
    * ``plot_path``: a PNG comparing real statistics with samples at T = 1 and at each layer's
      configured temperature (first two principal components of the real statistics).

    Args:
        recorder: the :class:`StyleStatisticsRecorder` attached to the same engine (before this).
        bank: the (unfitted) flow bank; its layers must match the recorder's.
        epochs, lr, batch_size, grad_clip, val_fraction, seed: flow fitting settings
            (paper: 100 epochs, AdamW lr 1e-4, batch 20, gradient-norm clip 5).
        metadata: extra entries stored in the checkpoint (e.g. the Phase I checkpoint used).
        resume_path: the fit's resume file (``None``: not resumable). Written atomically every
            ``checkpoint_every`` flow epochs and when the fit ends; a rerun after a crash
            continues the fit from its last state, with the same result as an uninterrupted
            fit (a state saved by a version that fitted the flows one after another is
            continued that way).
        resume: use ``resume_path`` when it exists (``False``: fit from scratch).
        settings: plain values stored with the resume state; a state saved with other
            settings or other statistics is not resumed (the fit starts anew, with a warning).

    A diverging fit or non-finite statistics stop the phase with a message naming the layer
    (:class:`msf_monai.bundle.PhaseError`, exit status 1, no traceback).
    """

    def __init__(
        self,
        recorder: StyleStatisticsRecorder,
        bank,
        flow_path: str | os.PathLike,
        log_path: str | os.PathLike | None = None,
        plot_path: str | os.PathLike | None = None,
        epochs: int = 100,
        lr: float = 1e-4,
        batch_size: int = 20,
        grad_clip: float = 5.0,
        val_fraction: float = 0.1,
        seed: int = 0,
        metadata: dict | None = None,
        resume_path: str | os.PathLike | None = None,
        resume: bool = True,
        checkpoint_every: int = 10,
        settings: dict | None = None,
    ):
        from msf_monai.cli import as_bool
        from msf_monai.resume import plain_settings

        self.recorder, self.bank = recorder, bank
        self.resume_path = None if resume_path is None else Path(resume_path)
        self.resume = as_bool(resume, "resume")
        self.checkpoint_every = max(0, int(checkpoint_every))
        self.settings = plain_settings(settings)
        self.flow_path, self.log_path, self.plot_path = flow_path, log_path, plot_path
        self.fit_kwargs = dict(
            epochs=int(epochs), lr=float(lr), batch_size=int(batch_size), grad_clip=float(grad_clip),
            val_fraction=float(val_fraction), seed=int(seed),
        )
        self.metadata = dict(metadata or {})
        self.history: dict = {}
        self._fitting = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def exception_raised(self, engine: Engine, error: BaseException) -> None:
        """Ctrl-C during the statistics pass or a flow fit: one line and exit 130."""
        from msf_monai.resume import exit_on_interrupt

        where = "the flow fits (their state is saved every few flow epochs)" if self._fitting else "the style statistics pass"
        exit_on_interrupt(engine, error, f"interrupted during {where}; run the same command to resume"
                          + (f" (state: {self.resume_path})" if self.resume_path is not None else ""))

    def _resume_state(self, digest: str) -> dict | None:
        from msf_monai.files import remove_stale_temporaries
        from msf_monai.resume import load_resume_state, setting_differences

        if self.resume_path is None:
            return None
        remove_stale_temporaries(self.resume_path)
        if not self.resume_path.is_file():
            return None
        if not self.resume:
            logger.info("--resume false: the previous flow-fitting state %s is replaced; fitting from scratch", self.resume_path)
            return None
        saved = load_resume_state(self.resume_path)
        diff = setting_differences(saved.get("settings", {}), self.settings)
        if saved.get("statistics") != digest:
            diff.append("the style statistics differ")
        if diff:
            logger.warning("the flow-fitting state %s was saved with other inputs (%s): fitting from scratch",
                           self.resume_path, "; ".join(diff))
            return None
        flows = saved.get("flows", {})
        if "joint" in flows:
            joint = flows["joint"]
            logger.info("Resuming the flow fit from %s: %s", self.resume_path,
                        "it had finished" if joint.get("finished") else f"all flows after epoch {int(joint['epoch'])}")
            return flows
        done = sorted(k for k, v in flows.items() if v.get("finished"))
        running = {k: int(v["epoch"]) for k, v in flows.items() if not v.get("finished")}
        logger.info("Resuming the flow fit from %s (one flow after another, as it was saved): finished flows %s%s",
                    self.resume_path, done or "none", "".join(f", {k} from epoch {e}" for k, e in running.items()))
        return flows

    def _save_state(self, flows: dict, digest: str, finished: bool = False) -> None:
        from msf_monai.files import atomic_save, file_digest
        from msf_monai.resume import RESUME_FORMAT, RESUME_VERSION

        if self.resume_path is None:
            return
        # output_sha1: the flow file this finished fit vouches for (msf_monai.resume.require_finished_run)
        atomic_save({"format": RESUME_FORMAT, "version": RESUME_VERSION, "finished": bool(finished), "epoch": 0,
                     "settings": dict(self.settings), "statistics": digest, "flows": flows,
                     "output_sha1": file_digest(self.flow_path) if finished else None}, self.resume_path)

    def __call__(self, engine: Engine) -> None:
        from msf_monai.bundle import PhaseError
        from msf_monai.flow_fit import FlowFitError

        self._fitting = True
        stats = self.recorder.stats
        digest = _statistics_digest(stats)
        state = self._resume_state(digest)
        logger.info("fitting %d style flows (%d epochs)", 2 * len(stats), self.fit_kwargs["epochs"])
        flows: dict = dict(state or {})
        # the state says "unfinished" from here until the flows are saved: a fit killed before its
        # first checkpoint never leaves the previous fit's "finished" next to the old flow file
        self._save_state(flows, digest)

        def checkpoint(states: dict) -> None:
            flows.clear()
            flows.update(states)
            self._save_state(states, digest)

        try:
            self.history = self.bank.fit(stats, resume_state=state, on_checkpoint=checkpoint,
                                         checkpoint_every=self.checkpoint_every, **self.fit_kwargs)
        except FlowFitError as err:
            raise PhaseError(f"Phase II stopped: {err}. Nothing was saved to {self.flow_path}.") from err
        except ValueError as err:
            raise PhaseError(f"Phase II stopped, the style statistics cannot be fitted: {err}. "
                             "The Phase I model may have diverged (check its training loss) or the data hold "
                             "non-finite values.") from err
        n_images = len(next(iter(stats.values()))["mean"])
        self.bank.save(self.flow_path, num_images=int(n_images), **self.metadata)
        self._save_state(flows, digest, finished=True)
        logger.info("saved style flows to %s", self.flow_path)
        if self.log_path is not None:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.log_path).write_text(json.dumps(self.history, indent=1))
        if self.plot_path is not None:
            plot_style_samples(self.bank, stats, self.plot_path)
            logger.info("saved real-vs-sampled style plot to %s", self.plot_path)
            for layer, c in sorted(self.bank.guard_counts.items()):
                logger.info("style layer %d: the sampling guard replaced %d of %d sampled statistics (non-finite or outside the guard range)",
                            layer, c["replaced"], c["drawn"])


def _statistics_digest(stats: dict) -> str:
    """SHA-1 of the recorded statistics (layers, shapes and values)."""
    import hashlib

    h = hashlib.sha1()
    for k in sorted(stats):
        for name in sorted(stats[k]):
            arr = np.ascontiguousarray(stats[k][name])
            h.update(f"{k}/{name}/{arr.dtype}/{arr.shape}".encode())
            h.update(arr.tobytes())
    return h.hexdigest()


def plot_style_samples(bank, stats: dict, path: str | os.PathLike, n_samples: int = 500, seed: int = 0) -> None:
    """Scatter real statistics and flow samples (T = 1 and the configured T) in the plane of
    the real statistics' first two principal components, one row per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(stats)
    fig, axes = plt.subplots(len(layers), 2, figsize=(9, 3.6 * len(layers)), squeeze=False)
    gen = torch.Generator().manual_seed(seed)
    for row, k in enumerate(layers):
        t_conf = float(bank.temperatures[k])
        samples = {1.0: bank.sample(k, n_samples, temperature=1.0, generator=gen)}
        samples[t_conf] = bank.sample(k, n_samples, temperature=t_conf, generator=gen)
        real_std = np.sqrt(np.maximum(stats[k]["var"], 1e-8))
        for col, (name, real, index) in enumerate((("mean", stats[k]["mean"], 0), ("std", real_std, 1))):
            ax = axes[row][col]
            centre = real.mean(0)
            _, _, vt = np.linalg.svd(real - centre, full_matrices=False)
            proj = vt[:2].T
            for t, colour in ((t_conf, "tab:orange"), (1.0, "tab:blue")):
                s = samples[t][index].cpu().numpy()
                s = s[np.all(np.abs(s - centre) < 1e6, axis=1)]
                ax.scatter(*((s - centre) @ proj).T, s=4, alpha=0.4, c=colour, label=f"flow T={t:g}")
            ax.scatter(*((real - centre) @ proj).T, s=6, c="black", label="real")
            lim = 4 * max(np.abs((real - centre) @ proj).max(), 1e-6)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_title(f"image-decoder layer {k}: channel {name}s (PCA of real)")
            ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


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


#: Dice per case over the whole volume, or averaged over its slices (:func:`case_dice`)
DICE_MODES = ("volume", "slice")
#: every slice of a volume, or only those whose label has foreground
SLICE_MODES = ("all", "foreground")


def case_dice(pred: torch.Tensor, label: torch.Tensor, dice: str = "volume", eval_slices: str = "all") -> torch.Tensor:
    """Dice of one case per channel (``[C]``) from binary channel-first ``pred``/``label``.

    ``dice="volume"``: one Dice over all voxels (3-D, per patient: the papers' prostate
    protocol). ``"slice"``: the mean of the Dice of each slice (last axis). ``eval_slices=
    "foreground"`` first keeps the slices whose label has foreground in any channel (all slices
    if none has). An empty label against an empty prediction scores 1, against a non-empty one
    0 (``ignore_empty=False``). 2-D cases (``[C, H, W]``) are one slice: every mode is the same.
    """
    pred, label = pred.float(), label.float()
    if pred.ndim == 3:
        pred, label = pred[..., None], label[..., None]
    if eval_slices == "foreground":
        keep = label.flatten(0, -2).amax(0) > 0
        if keep.any():
            pred, label = pred[..., keep], label[..., keep]
    if dice == "slice":
        per_slice = compute_dice(pred.movedim(-1, 0), label.movedim(-1, 0), include_background=True, ignore_empty=False)
        return per_slice.mean(0)
    return compute_dice(pred[None], label[None], include_background=True, ignore_empty=False)[0]


class PerCaseDiceWriter:
    """Dice per case and channel, with per-site means, written as CSV and JSON.

    Attach to a MONAI evaluator whose post-processing produces binary ``pred`` and ``label``
    (one channel per structure) and whose batches carry ``site`` and ``case`` entries. A case
    is a whole volume (3-D Dice, prostate) or an image (fundus).

    Writes ``<output_dir>/<prefix>_per_case.csv`` (one row per case) and
    ``<output_dir>/<prefix>_summary.json`` (per-site mean, std and count per channel, the
    per-site average over sites, every case, and the ``split``).

    Args:
        channel_names: one name per prediction channel, e.g. ``["prostate"]`` or ``["disc", "cup"]``.
        site_key, case_key: entries of the data list that name the site and the case.
        split: how the cases were chosen (``msf_monai.bundle.evaluation_split``'s ``info``: the
            source site, its validation cases out of all, the split settings), kept in the summary.
        dice, eval_slices: the Dice protocol (:func:`case_dice`): ``"volume"`` or ``"slice"``,
            over ``"all"`` slices or the ``"foreground"`` ones (prostate in the label).
        protocol: other facts of the protocol (e.g. ``eval_space``, the checkpoint policy),
            written with ``dice`` and ``eval_slices`` into the summary's ``"protocol"``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        channel_names: Sequence[str] = ("foreground",),
        prefix: str = "dice",
        site_key: str = "site",
        case_key: str = "case",
        split: Mapping | None = None,
        dice: str = "volume",
        eval_slices: str = "all",
        protocol: Mapping | None = None,
    ):
        if dice not in DICE_MODES:
            raise ValueError(f"dice {dice!r}: must be one of {', '.join(DICE_MODES)}")
        if eval_slices not in SLICE_MODES:
            raise ValueError(f"eval_slices {eval_slices!r}: must be one of {', '.join(SLICE_MODES)}")
        self.dice, self.eval_slices = dice, eval_slices
        self.protocol = {**dict(protocol or {}), "dice": dice, "eval_slices": eval_slices}
        self.output_dir = Path(output_dir)
        self.split = dict(split) if split else None
        self.channel_names = list(channel_names)
        self.prefix, self.site_key, self.case_key = prefix, site_key, case_key
        self.rows: list[dict] = []
        self.summary: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        outputs, batch = engine.state.output, engine.state.batch
        if not isinstance(outputs, list):
            raise TypeError("PerCaseDiceWriter needs a decollated evaluator output (decollate=True)")
        for out, item in zip(outputs, batch):
            pred, label = out[Keys.PRED], out[Keys.LABEL]
            if pred.shape[0] != len(self.channel_names):
                raise ValueError(f"prediction has {pred.shape[0]} channels but channel_names is {self.channel_names}")
            case = f"{item.get(self.site_key, '')}/{item.get(self.case_key, '')}"
            if tuple(pred.shape) != tuple(label.shape):
                raise ValueError(f"{case}: prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape; "
                                 "the label file's grid does not match its image's")
            dice = case_dice(pred, label, self.dice, self.eval_slices)
            row = {"site": str(item.get(self.site_key, "")), "case": str(item.get(self.case_key, ""))}
            row.update({name: float(d) for name, d in zip(self.channel_names, dice.tolist())})
            self.rows.append(row)

    def _write(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / f"{self.prefix}_per_case.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["site", "case", *self.channel_names])
            writer.writeheader()
            writer.writerows(self.rows)
        by_site: dict[str, list[dict]] = defaultdict(list)
        for row in self.rows:
            by_site[row["site"]].append(row)
        sites = {}
        for site, rows in sorted(by_site.items()):
            sites[site] = {"n": len(rows)}
            for name in self.channel_names:
                values = np.array([r[name] for r in rows], dtype=float)
                sites[site][name] = {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values))}
        self.summary = {
            "channels": self.channel_names,
            "protocol": self.protocol,
            "sites": sites,
            "cases": self.rows,
        }
        if self.split is not None:
            self.summary["split"] = self.split
        with open(self.output_dir / f"{self.prefix}_summary.json", "w") as f:
            json.dump(self.summary, f, indent=1)
        source = (self.split or {}).get("source_site")
        for site, s in sites.items():
            text = ", ".join(f"{name} {s[name]['mean']:.4f}" for name in self.channel_names)
            what = f"source validation, n={s['n']} of {self.split.get('source_total')}" if site == source else f"n={s['n']}"
            logger.info("Dice %s (%s): %s", site, what, text)
        logger.info("wrote %s", self.output_dir / f"{self.prefix}_per_case.csv")


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


class CaseProgressLogger:
    """One log line per evaluator iteration: ``[done/total] case names (seconds so far)``.

    For inference and evaluation, whose ``StatsHandler`` prints only the final metrics: the
    user sees which case is being processed and how far the run is. Reads the case names from
    the batch's ``case_key`` entry (or the image file names).
    """

    def __init__(self, case_key: str = "case", name: str = "case"):
        self.case_key, self.name = case_key, name
        self._start = 0.0
        self._done = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._start, self._done = time.perf_counter(), 0

    def _names(self, batch) -> list[str]:
        items = batch if isinstance(batch, list) else [batch]
        names = []
        for item in items:
            value = item.get(self.case_key) if isinstance(item, dict) else None
            if value is None and isinstance(item, dict):
                meta = getattr(item.get(Keys.IMAGE), "meta", None) or {}
                value = meta.get("filename_or_obj", "?")
            values = value if isinstance(value, (list, tuple)) else [value]
            names.extend(Path(str(v)).name for v in values)
        return names

    def __call__(self, engine: Engine) -> None:
        names = self._names(engine.state.batch)
        self._done += len(names)
        total = len(engine.state.dataloader.dataset) if hasattr(engine.state.dataloader, "dataset") else "?"
        logger.info("%s %d/%s: %s (%.1f s)", self.name, self._done, total, ", ".join(names), time.perf_counter() - self._start)
