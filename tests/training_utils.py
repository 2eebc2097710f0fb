"""Helpers for tests of training steps: a tiny labelled loader and a one-epoch MONAI trainer."""

from __future__ import annotations

import torch
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss


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
