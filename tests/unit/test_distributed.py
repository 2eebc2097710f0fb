"""Data-parallel helpers (msf_monai.distributed): GradientSync and prepare_network in two gloo processes on CPU."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn


# Gradients, parameters and buffers with known per-rank values: the gradient must be the *mean* over
# the ranks (a sum would leave the replicas identical too), the buffers rank 0's, and a difference
# between the replicas must be detected.
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Mixed(nn.Module):
    """float32 and float64 parameters (two all-reduce groups), one parameter without a gradient,
    batch-norm buffers (float and long)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(3, 4))
        self.b = nn.Parameter(torch.randn(5, dtype=torch.float64))
        self.unused = nn.Parameter(torch.randn(2))
        self.bn = nn.BatchNorm1d(3)


def _sync_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from msf_monai import distributed

    distributed.init_distributed("gloo")
    out = {}
    torch.manual_seed(100 + rank)  # every rank starts with other weights ...
    net = _Mixed()
    out["own_a"] = net.a.detach().clone()
    distributed.prepare_network(net)  # ... and gets rank 0's
    out["prepared_a"] = net.a.detach().clone()
    out["prepared_b"] = net.b.detach().clone()

    sync = distributed.GradientSync(net, check_in_sync=True)
    out["diff_in_sync"] = sync.max_difference()
    # rank r's gradient is (r + 1) * base: the mean over 2 ranks is 1.5 * base, the sum 3 * base
    net.a.grad = (rank + 1.0) * torch.arange(12, dtype=torch.float32).view(3, 4)
    net.b.grad = torch.full((5,), rank + 1.0, dtype=torch.float64)
    net.bn.weight.grad = torch.full((3,), float(rank + 1))
    net.bn.bias.grad = torch.full((3,), -float(rank + 1))
    sync.all_reduce_gradients()
    out.update(grad_a=net.a.grad.clone(), grad_b=net.b.grad.clone(), grad_bn_w=net.bn.weight.grad.clone(),
               grad_bn_b=net.bn.bias.grad.clone(), grad_unused=net.unused.grad)

    # buffers: every rank had its own batches; rank 0's running statistics are kept
    with torch.no_grad():
        net.bn.running_mean.fill_(10.0 * (rank + 1))
        net.bn.running_var.fill_(rank + 2.0)
        net.bn.num_batches_tracked.fill_(7 + rank)
    out["diff_buffers"] = sync.max_difference()
    sync.broadcast_buffers()
    out.update(running_mean=net.bn.running_mean.clone(), running_var=net.bn.running_var.clone(),
               tracked=net.bn.num_batches_tracked.clone(), diff_after=sync.max_difference())

    # a replica that drifted is found and reported at the end of training
    with torch.no_grad():
        net.a[0, 0] += 0.5 * rank
    out["diff_drift"] = sync.max_difference()
    try:
        sync.finish(None)
        out["finish_error"] = ""
    except RuntimeError as err:
        out["finish_error"] = str(err)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.cleanup()


def test_gradient_sync_averages_known_per_rank_gradients(tmp_path):
    # fork, not spawn: the children inherit the imported modules (a spawned child spends seconds
    # importing MONAI); they run single-threaded, so no OpenMP pool is used across the fork
    mp.start_processes(_sync_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(r0["own_a"], r1["own_a"])
    for r in (r0, r1):
        # prepare_network: rank 0's initial weights everywhere
        torch.testing.assert_close(r["prepared_a"], r0["own_a"], rtol=0, atol=0)
        assert r["diff_in_sync"] == 0.0
        # the mean gradient, in both dtype groups: (1 + 2) / 2 = 1.5
        torch.testing.assert_close(r["grad_a"], 1.5 * torch.arange(12, dtype=torch.float32).view(3, 4))
        torch.testing.assert_close(r["grad_b"], torch.full((5,), 1.5, dtype=torch.float64))
        torch.testing.assert_close(r["grad_bn_w"], torch.full((3,), 1.5))
        torch.testing.assert_close(r["grad_bn_b"], torch.full((3,), -1.5))
        assert r["grad_unused"] is None
        # buffers: rank 0's (running mean 10, var 2, 7 batches), and nothing differs any more
        assert r["diff_buffers"] > 0
        torch.testing.assert_close(r["running_mean"], torch.full((3,), 10.0))
        torch.testing.assert_close(r["running_var"], torch.full((3,), 2.0))
        assert int(r["tracked"]) == 7
        assert r["diff_after"] == 0.0
        # a drifted replica: the difference is measured and training fails loudly
        assert r["diff_drift"] == pytest.approx(0.5)
        assert "replicas differ" in r["finish_error"]
    torch.testing.assert_close(r0["prepared_b"], r1["prepared_b"], rtol=0, atol=0)
