"""Style-shift score: how unlike the training site an input looks, from the fitted style flows.

Phase II fits, per style layer k of the image decoder (default 2, 3, 4), a MuFlow on the
per-image channel means and a STDFlow on the channel spreads of the Phase I network's feature
maps on the source training images. Those flows are density models of the training site's
feature "style", so their log-likelihood (at T = 1) says how typical a new image's style is.

Score of one 2-D image (a slice, or a fundus photograph)::

    score = mean over style layers k of  -(log p_mu_k(mu) + log p_std_k(sigma)) / (2 C_k)

i.e. the negative log-likelihood in nats per style statistic, so that layers with different
channel counts weigh the same. **Higher = less typical of the training site.** The score of a
case is the *median* over its slices (a prostate volume: every slice, as inference has no label
to pick the prostate slices; a fundus image: its one image). The median, not the mean: the
flows model the prostate slices they were fitted on, and the few slices at either end of a
volume can score orders of magnitude higher even on the source site, which would swamp a mean.

The scale is heavy-tailed: on the demo, source-site slices score about -3 to 10, unseen sites
10^2 to 10^9 (numbers in the bundles' docs/README.md). Compare a score with the threshold,
or scores with each other; its absolute value has no meaning of its own. The CSV therefore
also gives two readable forms (:func:`readable_scale`): the ``percentile`` among the source
validation cases and the ``shift_level``, 0 for a typical source case, 0.3 at the threshold and
about one more per order of magnitude beyond it.

The threshold is calibrated on the source site's *validation* patients (never seen by the
flows nor by Phase I training): by default the 95th percentile of their case scores
(:func:`calibrate_style_shift`, run at the end of Phase II, written to
``models/style_shift.json``). A case scoring above it is flagged: its acquisition looks unlike
the training site, so its segmentation deserves a closer look. The score says nothing direct
about the segmentation's quality; it measures the input, not the output.

The score must use the **Phase I** network (``models/phase1_model.pt``), on whose features the
flows were fitted, not the Phase III model (``model.pt``, trained from scratch: its decoder
features live in another space). The calibration file records checksums of both files, and the
scorer refuses a Phase I checkpoint or a flow file other than the ones calibrated together.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from .cli import as_bool
from .files import atomic_write_json, file_digest
from .flows import StyleFlowBank
from .networks import DualDecoderNet

__all__ = [
    "StyleShiftScorer",
    "StyleShiftWriter",
    "calibrate_style_shift",
    "file_sha256",
    "flagged_shares",
    "image_slices",
    "readable_scale",
    "CALIBRATION_FORMAT",
]

logger = logging.getLogger("msf_monai.style_shift")
CALIBRATION_FORMAT = "msf_monai.style_shift/1"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (identifies the checkpoints a calibration belongs to)."""
    return file_digest(path, "sha256")


def image_slices(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``[N, C, H, W]`` 2-D images of a preprocessed item: a volume ``[C, H, W, D]`` gives its
    ``D`` slices (the last axis, as the training slices), an image ``[C, H, W]`` itself."""
    x = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image)
    x = x.as_tensor() if hasattr(x, "as_tensor") else x  # MetaTensor -> Tensor
    if x.ndim == 4:
        return x.permute(3, 0, 1, 2).contiguous()
    if x.ndim == 3:
        return x[None]
    raise ValueError(f"expected an image [C, H, W] or a volume [C, H, W, D], got shape {tuple(x.shape)}")


class StyleShiftScorer:
    """Scores images with a Phase I network and its fitted :class:`StyleFlowBank`.

    Args:
        network: the Phase I :class:`DualDecoderNet` (weights loaded); used in eval mode.
        bank: the fitted flow bank of Phase II.
        image_size: the in-plane size the flows were fitted at; images of another size are
            resized (bilinear) to it first, so a changed ``image_size`` at inference still
            gives comparable scores. ``None``: use images as they come.
        batch_size: images per forward pass.
    """

    def __init__(self, network: DualDecoderNet, bank: StyleFlowBank, image_size: int | None = None, batch_size: int = 20):
        self.network, self.bank = network, bank
        self.layers = list(bank.layers)
        missing = [k for k in self.layers if k not in network.image_decoder_channels]
        if missing:
            raise ValueError(f"the network has no image-decoder layer(s) {missing}")
        self.image_size = None if image_size is None else int(image_size)
        self.batch_size = max(1, int(batch_size))

    @classmethod
    def from_files(
        cls,
        phase1_checkpoint: str | os.PathLike,
        flow_checkpoint: str | os.PathLike,
        in_channels: int,
        out_channels: int,
        device: str | torch.device = "cpu",
        image_size: int | None = None,
        batch_size: int = 20,
    ) -> "StyleShiftScorer":
        device = torch.device(device)
        net = DualDecoderNet(in_channels, out_channels)
        state = torch.load(phase1_checkpoint, map_location=device, weights_only=True)
        net.load_state_dict(state, strict=True)
        bank = StyleFlowBank.load(flow_checkpoint, map_location=device)
        return cls(net.to(device).eval(), bank.to(device), image_size=image_size, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def slice_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Score ``[N]`` (nats per style statistic, higher = less typical) of images ``[N, C, H, W]``."""
        out = []
        was_training = self.network.training
        self.network.eval()
        try:
            with torch.no_grad():
                for start in range(0, images.shape[0], self.batch_size):
                    x = images[start : start + self.batch_size].to(self.device, dtype=torch.float32)
                    if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
                        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
                    _, feats = self.network.reconstruct(self.network.encode(x), return_features=True)
                    total = torch.zeros(x.shape[0], device=x.device)
                    for k in self.layers:
                        f = feats[k].float()
                        mean, var = f.mean(dim=(2, 3)), f.var(dim=(2, 3), unbiased=False)
                        nll = -self.bank.log_prob(k, mean, var).to(x.device)
                        total += nll / (2 * self.bank.layer_channels[k])
                    out.append((total / len(self.layers)).cpu())
        finally:
            self.network.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def case_score(self, image: torch.Tensor | np.ndarray) -> tuple[float, int]:
        """``(score, number of 2-D images scored)`` of one preprocessed item (see :func:`image_slices`):
        the median of its images' scores."""
        scores = self.slice_scores(image_slices(image))
        return float(scores.median()), int(scores.numel())


def calibrate_style_shift(
    network: DualDecoderNet,
    flow_checkpoint: str | os.PathLike,
    phase1_checkpoint: str | os.PathLike,
    val_list: Sequence[dict],
    preprocessing,
    output_path: str | os.PathLike,
    image_size: int | None = None,
    quantile: float = 0.95,
    batch_size: int = 20,
    source_site: str | None = None,
) -> dict:
    """Score the source validation cases and save the threshold (the ``quantile`` of their case
    scores) with the scores to ``output_path`` (JSON). Returns the saved dictionary
    (empty, with a warning and no file written, when ``val_list`` is empty).

    ``network`` must hold the Phase I weights of ``phase1_checkpoint`` (Phase II's network);
    ``preprocessing`` is the training preprocessing (applied to each item of ``val_list``).
    """
    if not 0.0 < float(quantile) <= 1.0:
        raise ValueError(f"style_shift_quantile must be in (0, 1], got {quantile}")
    if not val_list:
        logger.warning("no style-shift calibration: the source validation split is empty (raise val_fraction); "
                       "inference will write masks without style-shift scores")
        return {}
    bank = StyleFlowBank.load(flow_checkpoint, map_location=next(network.parameters()).device)
    scorer = StyleShiftScorer(network, bank, image_size=image_size, batch_size=batch_size)
    cases = []
    for i, item in enumerate(val_list, start=1):
        data = preprocessing(dict(item))
        score, n = scorer.case_score(data["image"])
        name = str(item.get("case", Path(str(item.get("image", i))).name))
        cases.append({"case": name, "site": str(item.get("site", "")), "score": score, "n_images": n})
        logger.info("style-shift calibration %d/%d: %s score %.4f (%d images)", i, len(val_list), name, score, n)
    scores = np.array([c["score"] for c in cases])
    threshold = float(np.quantile(scores, float(quantile)))
    result = {
        "format": CALIBRATION_FORMAT,
        "score": "median over a case's 2-D images of the style NLL in nats per statistic (higher = less typical)",
        "threshold": threshold,
        "quantile": float(quantile),
        "source_site": source_site,
        "n_cases": len(cases),
        "val_mean": float(scores.mean()),
        "val_std": float(scores.std()),
        "image_size": None if image_size is None else int(image_size),
        "layers": [int(k) for k in bank.layers],
        "phase1_sha256": file_sha256(phase1_checkpoint),
        "flows_sha256": file_sha256(flow_checkpoint),
        "cases": cases,
    }
    atomic_write_json(output_path, result)
    logger.info(
        "style-shift threshold %.4f (%g quantile of %d source validation cases, mean %.4f) saved to %s",
        threshold, quantile, len(cases), result["val_mean"], output_path,
    )
    return result


def readable_scale(score: float, calibration: Mapping, threshold: float | None = None) -> tuple[float, float]:
    """Two readable forms of a case score, from the source validation cases of ``calibration``
    (``threshold``: the flag threshold as the caller compares it, default the calibration's):

    * ``percentile``: the share (%) of those cases scoring at most ``score`` (100 = beyond all);
    * ``shift_level``: ``log10(1 + max(0, score - median) / (threshold - median))``, i.e. 0 at or
      below their median, 0.3 at the flag threshold, and then about one unit per order of
      magnitude beyond it (the raw score spans 10^2 to 10^9 on unseen sites).
    """
    val = np.array([float(c["score"]) for c in calibration.get("cases", [])], dtype=float)
    if val.size == 0:
        return float("nan"), float("nan")
    median = float(np.median(val))
    threshold = float(calibration["threshold"] if threshold is None else threshold)
    spread = threshold - median
    if not spread > 0:  # a degenerate calibration (all cases alike): the spread of their scores
        spread = float(val.std()) or 1.0
    percentile = 100.0 * float((val <= score).mean())
    return percentile, float(np.log10(1.0 + max(0.0, score - median) / spread))


def flagged_shares(csv_file: str | os.PathLike) -> str:
    """One line for a table: per site, the cases of a ``style_shift.csv`` flagged as unlike the
    training site (``""`` when there is no such file)."""
    path = Path(csv_file)
    if not path.is_file():
        return ""
    by_site: dict[str, list[int]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            by_site[row.get("site", "")].append(int(row["flag"]))
    parts = [f"{site or 'all'} {sum(v)}/{len(v)} ({100 * sum(v) / len(v):.0f} %)" for site, v in sorted(by_site.items()) if v]
    return "Style-shift flags (cases scoring above the threshold calibrated on the source validation cases): " + ", ".join(parts)


class StyleShiftWriter:
    """Evaluator handler: a style-shift score per case, written next to the masks.

    For every case the evaluator processes (read from ``engine.state.batch``: the preprocessed
    ``image``, and ``case`` / ``site`` when present), scores it with the Phase I network and the
    flows, compares with the calibrated threshold and, when the run completes, writes
    ``output_file`` (CSV: ``case, site, image, score, threshold, flag, n_images``; ``flag`` 1
    means "less typical than the calibration quantile of the source site") and logs per-site
    means. With ``enabled=False`` it does nothing. When a file it needs is missing or the three
    files do not belong together, it logs a warning saying which file and how to make it, and
    the masks are still written.

    Args:
        phase1_checkpoint, flow_checkpoint, calibration_file: ``models/phase1_model.pt``,
            ``models/style_flows.pt``, ``models/style_shift.json``.
        output_file: the CSV to write (e.g. ``inference/style_shift.csv``).
        in_channels, out_channels: of the network.
        how_to_create: the command that makes the missing files (shown in the warning).
    """

    def __init__(
        self,
        phase1_checkpoint: str | os.PathLike,
        flow_checkpoint: str | os.PathLike,
        calibration_file: str | os.PathLike,
        output_file: str | os.PathLike,
        in_channels: int = 1,
        out_channels: int = 1,
        enabled: bool = True,
        device: str | torch.device | None = None,
        batch_size: int = 20,
        how_to_create: str = "",
    ):
        self.phase1_checkpoint, self.flow_checkpoint = Path(phase1_checkpoint), Path(flow_checkpoint)
        self.calibration_file, self.output_file = Path(calibration_file), Path(output_file)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.enabled = as_bool(enabled, "style_shift")  # the command line gives "false" as a string
        self.device = device
        self.batch_size = int(batch_size)
        self.how_to_create = how_to_create
        self.scorer: StyleShiftScorer | None = None
        self.calibration: dict = {}
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._score)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _disable(self, reason: str) -> None:
        hint = f"\n  create them with: {self.how_to_create}" if self.how_to_create else ""
        logger.warning("style-shift scores are not written: %s%s\n  (or pass --style_shift false)", reason, hint)
        self.scorer = None

    def _start(self, engine: Engine) -> None:
        self.rows = []
        self.scorer = None
        missing = [str(p) for p in (self.phase1_checkpoint, self.flow_checkpoint, self.calibration_file) if not p.is_file()]
        if missing:
            self._disable("missing " + ", ".join(missing))
            return
        calibration = json.loads(self.calibration_file.read_text())
        if calibration.get("format") != CALIBRATION_FORMAT:
            self._disable(f"{self.calibration_file} is not a style-shift calibration ({CALIBRATION_FORMAT})")
            return
        for key, path in (("phase1_sha256", self.phase1_checkpoint), ("flows_sha256", self.flow_checkpoint)):
            if calibration.get(key) != file_sha256(path):
                self._disable(f"{path} is not the file {self.calibration_file} was calibrated with "
                              "(Phase I or II was run again without the other)")
                return
        device = self.device if self.device is not None else (getattr(engine.state, "device", None) or "cpu")
        self.scorer = StyleShiftScorer.from_files(
            self.phase1_checkpoint, self.flow_checkpoint, self.in_channels, self.out_channels,
            device=device, image_size=calibration.get("image_size"), batch_size=self.batch_size,
        )
        self.calibration = calibration
        logger.info("style-shift scores against threshold %.4f (calibrated on %d source validation cases)",
                    calibration["threshold"], calibration["n_cases"])

    def _score(self, engine: Engine) -> None:
        if self.scorer is None:
            return
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else _decollate_images(batch)
        threshold = float(self.calibration["threshold"])
        for item in items:
            score, n = self.scorer.case_score(item["image"])
            case = str(item.get("case", "")) or _source_name(item)
            # the flag and the level use the values as written, so the CSV agrees with itself: a
            # source case that scores its own calibration threshold (up to float noise) is not
            # above it, and its level is not above log10(2) either
            shown_score, shown_threshold = float(f"{score:.6g}"), float(f"{threshold:.6g}")
            percentile, level = readable_scale(shown_score, self.calibration, shown_threshold)
            row = {"case": case, "site": str(item.get("site", "")), "image": _source_name(item, full=True),
                   "score": shown_score, "threshold": shown_threshold, "flag": int(shown_score > shown_threshold),
                   "percentile": round(percentile, 1), "shift_level": round(level, 2), "n_images": n}
            self.rows.append(row)
            logger.info("style shift %s: level %.2f (%.0f%% of source validation cases score lower or equal)%s", case, level,
                        percentile, "  ABOVE threshold (unlike the training site)" if row["flag"] else "")

    def _write(self, engine: Engine) -> None:
        if self.scorer is None:
            return
        self.output_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.output_file, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["case", "site", "image", "score", "threshold", "flag", "percentile",
                                                   "shift_level", "n_images"])
            writer.writeheader()
            writer.writerows(self.rows)
        by_site = defaultdict(list)
        for r in self.rows:
            by_site[r["site"]].append(r)
        for site, rows in sorted(by_site.items()):
            flagged = sum(r["flag"] for r in rows)
            logger.info("style shift%s: median level %.2f (raw score %.4g), %d/%d case(s) flagged (%.0f%%)", f" {site}" if site else "",
                        float(np.median([r["shift_level"] for r in rows])), float(np.median([r["score"] for r in rows])),
                        flagged, len(rows), 100.0 * flagged / len(rows))
        logger.info("style-shift scores written to %s", self.output_file)


def _source_name(item: dict, full: bool = False) -> str:
    meta = getattr(item.get("image"), "meta", None) or {}
    name = meta.get("filename_or_obj", "")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else ""
    name = str(name)
    return name if full else Path(name).name


def _decollate_images(batch: dict) -> list[dict]:
    from monai.data import decollate_batch

    return decollate_batch(batch)
