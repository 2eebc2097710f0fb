"""Evaluation and inference handlers.

* :func:`case_dice` / :class:`PerCaseDiceWriter` - Dice per case (3-D volume or 2-D image,
  per volume or per slice) and per-site means, written as CSV and JSON.
* :class:`CaseProgressLogger` - one progress line per batch of inferred cases.
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
from monai.metrics import compute_dice
from monai.utils.enums import CommonKeys as Keys

__all__ = ["DICE_MODES", "SLICE_MODES", "case_dice", "PerCaseDiceWriter", "CaseProgressLogger"]

logger = logging.getLogger("msf_monai.handlers")

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
