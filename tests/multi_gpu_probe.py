"""A handler for the multi-process tests (``tests/bundle/test_multi_gpu.py``), merged into a bundle run
with an extra config file: on every rank it records which items the engine was given and, for the
trainer, the network's parameters when training starts (after ``prepare_network``'s broadcast).

Files written to ``save_dir``: ``<tag>_rank<r>.json`` (``[[case, slice], ...]`` of every item the
engine processed; ``slice`` is ``null`` for whole volumes) and, for ``tag="train"``,
``train_initial_rank<r>.pt`` (``{name: parameter}``, parameters only, no buffers)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from ignite.engine import Engine, Events


class RankProbe:
    def __init__(self, network: torch.nn.Module, save_dir: str | os.PathLike, tag: str = "train"):
        self.network, self.save_dir, self.tag = network, Path(save_dir), str(tag)
        self.items: list[list] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record)
        engine.add_event_handler(Events.COMPLETED, self._write)

    @staticmethod
    def _rank() -> int:
        from msf_monai.distributed import rank

        return rank()

    def _started(self, engine: Engine) -> None:
        self.items = []
        if self.tag == "train":
            self.save_dir.mkdir(parents=True, exist_ok=True)
            params = {k: v.detach().cpu().clone() for k, v in self.network.named_parameters()}
            torch.save(params, self.save_dir / f"train_initial_rank{self._rank()}.pt")

    def _record(self, engine: Engine) -> None:
        batch = engine.state.batch
        rows = batch if isinstance(batch, list) else [
            {k: v[i] for k, v in batch.items() if k in ("case", "slice")} for i in range(len(batch["case"]))
        ]
        for row in rows:
            s = row.get("slice")
            self.items.append([str(row["case"]), None if s is None else int(s)])

    def _write(self, engine: Engine) -> None:
        self.save_dir.mkdir(parents=True, exist_ok=True)
        (self.save_dir / f"{self.tag}_rank{self._rank()}.json").write_text(json.dumps(self.items))
