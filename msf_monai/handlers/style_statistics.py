"""Phase II handlers: record the per-image, per-channel feature statistics of the source
training slices in one pass, then fit the style flows on them.

* :class:`StyleStatisticsIteration` - the pass's iteration: the network's style layers record
  their statistics (no gradient, no update).
* :class:`StyleStatisticsRecorder` - gathers those statistics over the pass and saves them.
* :class:`StyleFlowFitter` - fits the style flows when the pass ends; saves the flow
  checkpoint, the NLL log and a real-vs-sampled comparison plot (:func:`plot_style_samples`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from ..cli import as_bool
from ..engines import add_image_noise, frozen_batchnorm_statistics
from ..errors import PhaseError
from ..files import atomic_save, atomic_write_npz, file_digest, remove_stale_temporaries
from ..flow_fit import FlowFitError
from ..resume import exit_on_interrupt
from ..saved_state import RESUME_FORMAT, RESUME_VERSION, load_resume_state, plain_settings, setting_differences

__all__ = ["StyleStatisticsIteration", "StyleStatisticsRecorder", "StyleFlowFitter", "plot_style_samples"]

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
        where = "the flow fits (their state is saved every few flow epochs)" if self._fitting else "the style statistics pass"
        exit_on_interrupt(engine, error, f"interrupted during {where}; run the same command to resume"
                          + (f" (state: {self.resume_path})" if self.resume_path is not None else ""))

    def _resume_state(self, digest: str) -> dict | None:
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
        if self.resume_path is None:
            return
        # output_sha1: the flow file this finished fit vouches for (msf_monai.resume.require_finished_run)
        atomic_save({"format": RESUME_FORMAT, "version": RESUME_VERSION, "finished": bool(finished), "epoch": 0,
                     "settings": dict(self.settings), "statistics": digest, "flows": flows,
                     "output_sha1": file_digest(self.flow_path) if finished else None}, self.resume_path)

    def __call__(self, engine: Engine) -> None:
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


