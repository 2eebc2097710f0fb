"""Helpers for tests of training steps and style layers: a tiny labelled loader, a one-epoch MONAI
trainer, a network whose style layers impose a constant style, and a small fitted flow bank."""

from __future__ import annotations

import numpy as np
import torch
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss

from msf_monai.flows import StyleFlowBank
from msf_monai.networks import DualDecoderNet
from msf_monai.styles import MixStyleFlow


def tiny_loader(n_batches: int = 2, size: int = 32, batch: int = 4, seed: int = 0) -> torch.utils.data.DataLoader:
    """``n_batches`` batches of random images with a bright rectangle labelled as foreground."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n_batches * batch):
        label = torch.zeros(1, size, size)
        label[:, 8:20, 10:24] = 1
        data.append({"image": torch.rand(1, size, size, generator=g) * 0.5 + 0.3 * label, "label": label})
    return torch.utils.data.DataLoader(data, batch_size=batch)


def tiny_trainer(net, iteration, loader, handlers=None) -> SupervisedTrainer:
    """One epoch of ``loader`` with DiceCE, AdamW and the given ``iteration_update``."""
    return SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=net,
        optimizer=torch.optim.AdamW(net.parameters(), 1e-3), loss_function=DiceCELoss(sigmoid=True),
        iteration_update=iteration, train_handlers=handlers,
    )


def styled_net(mean=3.0, std=2.0):
    """A dual-decoder network whose image-decoder style layers (2, 3, 4) always impose the style (mean, std)."""

    def sampler(c):
        return lambda n: (torch.full((n, c), mean), torch.full((n, c), std))

    return DualDecoderNet(image_decoder_styles={k: MixStyleFlow(sampler(c), p=1.0, lam=0.0) for k, c in {2: 32, 3: 16, 4: 16}.items()})


def bn_buffers(net):
    """Copies of the network's batch-norm running statistics and batch counters."""
    return {k: v.clone() for k, v in net.state_dict().items() if "running_" in k or "num_batches_tracked" in k}


def fitted_bank(seed=0):
    """A flow bank for one 4-channel style layer (2) at temperature 3.5, fitted briefly; returns it and its statistics."""
    torch.manual_seed(seed)
    stats = {2: {"mean": np.random.RandomState(seed).randn(200, 4) * 0.1 + 0.5,
                 "var": np.random.RandomState(seed + 1).rand(200, 4) * 0.01 + 0.01}}
    bank = StyleFlowBank({2: 4}, temperatures={2: 3.5}, num_blocks=2)
    bank.fit(stats, epochs=3, lr=1e-3, log_every=0)
    return bank, stats
