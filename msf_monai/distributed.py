"""Multi-GPU (or multi-process CPU) data-parallel training for the bundles' training phases.

Used by ``configs/multi_gpu_train.json``, merged on top of ``phase1.json`` or ``phase3.json``
and started with ``torchrun`` (one process per GPU; NCCL on CUDA, gloo on CPU)::

    torchrun --nproc_per_node=2 -m monai.bundle run --config_file \\
        "['bundles/prostate/configs/phase1.json','bundles/prostate/configs/multi_gpu_train.json']"

Why not ``torch.nn.parallel.DistributedDataParallel``: DDP synchronises gradients through hooks
that its own ``forward`` arms, but the training steps (:mod:`msf_monai.engines`) call the
network's ``encode`` / ``segment`` / ``reconstruct`` directly and Phase III runs two backward
passes per step (clean, then stylized). Under a DDP wrapper those gradients would silently stay
per-process. :class:`GradientSync` does what DDP does, explicitly and for any step: after the
step's backward passes (``IterationEvents.BACKWARD_COMPLETED``, before the optimizer step) it
averages every gradient over the processes (one flattened all-reduce per dtype), and it
broadcasts the BatchNorm running statistics of rank 0 (as DDP's ``broadcast_buffers``). The
initial weights are broadcast from rank 0 by :func:`prepare_network`. Every process therefore
takes the same optimizer step on the mean gradient of the global batch
(``nproc x batch_size`` images), and the replicas stay identical; :class:`GradientSync` checks
that at the end of training and fails loudly if they are not.

Validation runs on every rank, each on its share of the validation cases; MONAI's metrics
all-gather their per-case values, so every rank gets the metric of the whole split. Only rank 0
logs and writes checkpoints (:func:`rank_zero_handlers` removes those handlers, by type, on the
other ranks).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from torch import nn

from . import handlers as ours
from .errors import MsfError

__all__ = [
    "init_distributed",
    "cleanup",
    "rank",
    "world_size",
    "local_device",
    "prepare_network",
    "rank_zero_handlers",
    "rank_zero_only_types",
    "validation_sampler",
    "GradientSync",
]

logger = logging.getLogger("msf_monai.distributed")


def rank() -> int:
    """This process's global rank (0 without a process group or ``torchrun``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of processes (1 without a process group or ``torchrun``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def init_distributed(backend: str | None = None, timeout_minutes: float = 60.0) -> None:
    """Join the process group that ``torchrun`` set up (idempotent).

    ``backend``: ``None`` picks NCCL when CUDA is available, else gloo. The timeout is generous
    because the ranks wait for each other (e.g. while rank 0 writes a checkpoint).
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise MsfError(
            "multi_gpu_train.json needs the environment of torchrun (RANK, WORLD_SIZE, MASTER_ADDR ...):\n"
            "  torchrun --nproc_per_node=<N> -m monai.bundle run --config_file \"['configs/phase1.json','configs/multi_gpu_train.json']\""
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=float(timeout_minutes)))
    logger.info("process group: rank %d of %d, backend %s, device %s", dist.get_rank(), dist.get_world_size(), backend, local_device())


def cleanup() -> None:
    """Leave the process group (end of the workflow)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def prepare_network(network: nn.Module) -> nn.Module:
    """Join the process group if needed and give every rank rank 0's parameters and buffers."""
    init_distributed()
    with torch.no_grad():
        for tensor in list(network.parameters()) + list(network.buffers()):
            dist.broadcast(tensor.data, src=0)
    return network


def validation_sampler(dataset):
    """Each rank's share of the validation cases, without padding (no case counted twice in the
    all-gathered metric); padded by repeating cases only when there are fewer cases than ranks,
    since a rank without any case cannot run an evaluation."""
    from monai.data import DistributedSampler

    n = world_size()
    if len(dataset) < n:
        logger.warning("%d validation case(s) for %d processes: some cases are validated twice", len(dataset), n)
    return DistributedSampler(dataset, even_divisible=len(dataset) < n, shuffle=False)


def rank_zero_only_types() -> tuple[type, ...]:
    """Handler types that only rank 0 runs: checkpoint savers, loggers, image and metric writers.

    Not the ``ValidationHandler``: every rank validates its share of the validation cases
    (``DistributedSampler`` without padding) and MONAI's metrics all-gather their buffers, so
    each rank sees the metric of the whole validation split; a validation run on rank 0 alone
    would wait forever in that all-gather."""
    from monai import handlers as mh

    names = ("CheckpointSaver", "StatsHandler", "TensorBoardHandler", "MetricsSaver",
             "ClassificationSaver", "MetricLogger", "MLFlowHandler", "ClearMLHandler", "ProbMapProducer")
    types = [getattr(mh, n) for n in names if hasattr(mh, n)]
    types += [ours.StylizedImageSaver, ours.PerCaseDiceWriter, ours.DataWaitTimer, ours.CaseProgressLogger]
    return tuple(types)


def rank_zero_handlers(handlers: Iterable, types: Sequence[type] | None = None) -> list:
    """``handlers`` on rank 0; on the other ranks, without the rank-0-only ones.

    A handler is rank-0-only when it is an instance of one of ``types`` (default
    :func:`rank_zero_only_types`: checkpoint savers, stats/TensorBoard loggers, image and
    metric writers) or has an attribute ``rank_zero_only = True``. Anything
    else (checkpoint loaders, learning-rate schedulers, :class:`GradientSync` ...) runs on every
    rank. Selecting by type, not by position, keeps working when handlers are added to the lists.
    """
    handlers = list(handlers)
    if rank() == 0:
        return handlers
    types = tuple(rank_zero_only_types() if types is None else types)
    return [h for h in handlers if not (isinstance(h, types) or getattr(h, "rank_zero_only", False))]


def _flat_groups(tensors: list[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups


class GradientSync:
    """Trainer handler: data-parallel gradient averaging and replica checks (see module doc).

    Args:
        network: the trained network (the same object the trainer steps).
        check_in_sync: at the end of training, all-reduce the max and min of every parameter and
            buffer and raise if the ranks differ (they never should).
        save_dir: if set, every rank saves its final ``state_dict`` to ``<save_dir>/rank<r>.pt``
            (for tests and debugging; default off).
    """

    def __init__(self, network: nn.Module, check_in_sync: bool = True, save_dir: str | os.PathLike | None = None):
        self.network = network
        self.check_in_sync = bool(check_in_sync)
        self.save_dir = None if save_dir in (None, "") else Path(save_dir)

    def attach(self, engine: Engine) -> None:
        init_distributed()
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.all_reduce_gradients)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.broadcast_buffers)
        engine.add_event_handler(Events.COMPLETED, self.finish)

    def all_reduce_gradients(self, engine: Engine | None = None) -> None:
        """Replace every gradient by its mean over the ranks (parameters without a gradient are
        skipped: every rank runs the same graph, so the same ones are missing everywhere)."""
        n = dist.get_world_size()
        if n == 1:
            return
        grads = [p.grad for p in self.network.parameters() if p.requires_grad and p.grad is not None]
        for group in _flat_groups(grads).values():
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= n
            offset = 0
            for g in group:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def broadcast_buffers(self, engine: Engine | None = None) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics)."""
        buffers = [b for b in self.network.buffers() if b.is_floating_point() or b.dtype == torch.long]
        for group in _flat_groups(buffers).values():
            flat = torch.cat([b.reshape(-1) for b in group])
            dist.broadcast(flat, src=0)
            offset = 0
            for b in group:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()

    def max_difference(self) -> float:
        """Largest difference of any parameter or buffer entry between two ranks."""
        tensors = [t.detach().float().reshape(-1) for t in list(self.network.parameters()) + list(self.network.buffers())]
        flat = torch.cat(tensors)
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        return float((hi - lo).abs().max()) if flat.numel() else 0.0

    def finish(self, engine: Engine) -> None:
        if self.save_dir is not None:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in self.network.state_dict().items()}, self.save_dir / f"rank{rank()}.pt")
        if self.check_in_sync:
            diff = self.max_difference()
            if diff != 0.0:
                raise RuntimeError(f"rank {rank()}: the model replicas differ after training (max |difference| {diff:g})")
            if rank() == 0:
                logger.info("%d replicas in sync at the end of training (identical weights)", world_size())
