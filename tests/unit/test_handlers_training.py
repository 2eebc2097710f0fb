"""The training handlers (msf_monai.handlers.training): stylized-image grids, data-wait timing and the perturbation monitor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from msf_monai.engines import DualDecoderIteration, MixStyleFlowIteration
from msf_monai.handlers import PerturbationMonitor, StylizedImageSaver
from msf_monai.networks import DualDecoderNet
from training_utils import fitted_bank, styled_net, tiny_loader, tiny_trainer


def test_stylized_image_saver_grid(tmp_path):
    saver = StylizedImageSaver(tmp_path, every_n_epochs=1, max_images=3)
    image = torch.rand(5, 1, 16, 16)
    stylized = 1 - image
    grid = saver.grid([{"image": i, "stylized": s} for i, s in zip(image, stylized)])
    assert grid.shape == (32, 48, 3) and grid.dtype == np.uint8
    assert not np.array_equal(grid[:16], grid[16:])
    same = saver.grid({"image": image, "stylized": stylized})
    np.testing.assert_array_equal(grid, same)


@pytest.mark.slow
def test_data_wait_timer_measures_a_slow_loader():
    import time as _time

    from msf_monai.handlers import DataWaitTimer

    class _SlowLoader:
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            for batch in self.loader:
                _time.sleep(0.2)
                yield batch

        def __len__(self):
            return len(self.loader)

    torch.manual_seed(0)
    net = DualDecoderNet()
    trainer = tiny_trainer(net, DualDecoderIteration(), _SlowLoader(tiny_loader(n_batches=2)))
    timer = DataWaitTimer()
    timer.attach(trainer)
    trainer.run()
    (record,) = timer.history
    assert record["data_wait_s"] >= 0.4  # two batches, 0.2 s each
    assert 0 < record["data_wait_fraction"] < 1
    assert record["data_wait_s"] < record["epoch_s"]


@pytest.mark.slow
def test_perturbation_is_measured_and_logged(tmp_path):
    torch.manual_seed(0)
    net = styled_net()
    bank, _ = fitted_bank()
    monitor = PerturbationMonitor(tmp_path / "perturbation.json")
    tiny_trainer(net, MixStyleFlowIteration(stylize_mode="residual"), tiny_loader(n_batches=2), [monitor]).run()
    report = json.loads((tmp_path / "perturbation.json").read_text())
    mean = report["mean"]
    assert mean["blur"] == pytest.approx(0.0, abs=1e-5)  # residual: the un-stylized image is the input
    assert mean["image_change"] > 0.05
    assert mean["active_share"] == 1.0 and len(report["epochs"]) == 1
