"""Training-step logic and handlers, checked against direct computations."""

from __future__ import annotations

import contextlib
import csv
import json

import numpy as np
import pytest
import torch
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.losses import DiceCELoss

from training_utils import tiny_loader, tiny_trainer
from msf_monai.engines import DualDecoderIteration, MixStyleFlowIteration, add_image_noise, rescale_to_reference
from msf_monai.handlers import (
    PerCaseDiceWriter,
    StyleStatisticsRecorder,
    StylizedImageSaver,
    StyleStatisticsIteration,
)
from msf_monai.networks import DualDecoderNet
from msf_monai.styles import MixStyleFlow


def test_noise_and_rescale():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 16, 16) * 0.8 + 0.1
    noisy = add_image_noise(x, 0.05)
    assert noisy.min() >= x.min() and noisy.max() <= x.max()
    assert 0.02 < (noisy - x).std() < 0.06
    assert torch.equal(add_image_noise(x, 0.0), x)
    y = torch.randn(3, 1, 16, 16) * 5 + 2
    r = rescale_to_reference(y, x)
    torch.testing.assert_close(r.amin(dim=(1, 2, 3)), x.amin(dim=(1, 2, 3)))
    torch.testing.assert_close(r.amax(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3)))


def test_phase1_iteration_fires_events_and_combines_losses():
    torch.manual_seed(0)
    net = DualDecoderNet()
    trainer = tiny_trainer(net, DualDecoderIteration(rec_weight=0.5, noise_std=0.05), tiny_loader())
    fired = []
    trainer.add_event_handler(IterationEvents.MODEL_COMPLETED, lambda e: fired.append(e.state.iteration))
    before = [p.detach().clone() for p in net.parameters()]
    trainer.run()
    assert fired == [1, 2]  # decollation/post-processing hooks run
    out = trainer.state.output  # decollated: one dict per image
    assert isinstance(out, list) and len(out) == 4
    loss = float(out[0]["loss"])
    assert loss == pytest.approx(float(out[0]["seg_loss"]) + 0.5 * float(out[0]["rec_loss"]), rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def _constant_style_sampler(channels, mean=3.0, std=2.0):
    return lambda n: (torch.full((n, channels), mean), torch.full((n, channels), std))


def test_mixstyleflow_iteration_stylizes_and_sums_four_terms():
    torch.manual_seed(0)
    styles = {k: MixStyleFlow(_constant_style_sampler(c), p=1.0, lam=0.0) for k, c in {2: 32, 3: 16, 4: 16}.items()}
    net = DualDecoderNet(image_decoder_styles=styles)
    trainer = tiny_trainer(net, MixStyleFlowIteration(stylized_weight=1.0), tiny_loader(n_batches=1))
    trainer.run()
    out = trainer.state.output[0]
    terms = [float(out[k]) for k in ("seg_loss", "rec_loss", "seg_loss_stylized", "rec_loss_stylized")]
    assert float(out["loss"]) == pytest.approx(sum(terms), rel=1e-5)
    stylized, image = out["stylized"], out["image"]
    assert stylized.shape == image.shape
    assert not torch.allclose(stylized, image, atol=1e-2)
    # rescaled to the input's intensity range
    assert float(stylized.min()) == pytest.approx(float(image.min()), abs=1e-5)
    assert float(stylized.max()) == pytest.approx(float(image.max()), abs=1e-5)
    # the clean reconstruction path never sees the style layers
    net.eval()
    z = net.encode(image[None])
    torch.testing.assert_close(net.reconstruct(z), net(image[None])[1])


def test_mixstyleflow_iteration_requires_style_layers():
    trainer = tiny_trainer(DualDecoderNet(), MixStyleFlowIteration(), tiny_loader(n_batches=1))
    with pytest.raises(RuntimeError, match="image_decoder_styles"):
        trainer.run()


def test_style_statistics_match_a_direct_computation(tmp_path):
    torch.manual_seed(0)
    net = DualDecoderNet().eval()
    loader = tiny_loader(n_batches=2, batch=3)
    recorder = StyleStatisticsRecorder(layers=(2, 3, 4), output_path=tmp_path / "stats.npz")
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=loader, network=net,
        iteration_update=StyleStatisticsIteration(regime="eval"), val_handlers=[recorder], decollate=False,
    )
    evaluator.run()
    # reference: forward hooks on the image decoder's up blocks
    feats = {}
    hooks = [net.image_decoder[k - 1].register_forward_hook(lambda m, i, o, k=k: feats.setdefault(k, []).append(o)) for k in (2, 3, 4)]
    with torch.no_grad():
        for batch in loader:
            net(batch["image"])
    for h in hooks:
        h.remove()
    saved = np.load(tmp_path / "stats.npz")
    for k in (2, 3, 4):
        f = torch.cat(feats[k])
        np.testing.assert_allclose(saved[f"mean_{k}"], f.mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(saved[f"var_{k}"], f.var(dim=(2, 3), unbiased=False).numpy(), rtol=1e-4, atol=1e-7)
        assert saved[f"mean_{k}"].shape == (6, net.image_decoder_channels[k])


def test_per_case_dice_writer(tmp_path):
    # two sites; known overlaps
    pred = torch.zeros(1, 4, 4, 2)
    label = torch.zeros(1, 4, 4, 2)
    label[0, :2] = 1  # 16 voxels
    pred[0, :1] = 1  # 8 voxels, all inside the label -> Dice 2*8/(8+16)
    items = [
        ({"pred": pred, "label": label}, {"site": "A", "case": "c1"}, 2 * 8 / 24),
        ({"pred": label.clone(), "label": label}, {"site": "A", "case": "c2"}, 1.0),
        ({"pred": torch.zeros_like(label), "label": label}, {"site": "B", "case": "c3"}, 0.0),
    ]
    writer = PerCaseDiceWriter(tmp_path, channel_names=["prostate"], prefix="m")

    class _State:
        pass

    class _Engine:
        state = _State()

    engine = _Engine()
    for out, item, _ in items:
        engine.state.output, engine.state.batch = [out], [item]
        writer._collect(engine)
    writer._write(engine)
    rows = list(csv.DictReader(open(tmp_path / "m_per_case.csv")))
    assert [r["case"] for r in rows] == ["c1", "c2", "c3"]
    for row, (_, _, expected) in zip(rows, items):
        assert float(row["prostate"]) == pytest.approx(expected, abs=1e-6)
    summary = json.loads((tmp_path / "m_summary.json").read_text())
    assert summary["sites"]["A"]["n"] == 2
    assert summary["sites"]["A"]["prostate"]["mean"] == pytest.approx((2 * 8 / 24 + 1) / 2)
    assert summary["sites"]["B"]["prostate"]["mean"] == pytest.approx(0.0)


def test_stylized_image_saver_grid(tmp_path):
    saver = StylizedImageSaver(tmp_path, every_n_epochs=1, max_images=3)
    image = torch.rand(5, 1, 16, 16)
    stylized = 1 - image
    grid = saver.grid([{"image": i, "stylized": s} for i, s in zip(image, stylized)])
    assert grid.shape == (32, 48, 3) and grid.dtype == np.uint8
    assert not np.array_equal(grid[:16], grid[16:])
    same = saver.grid({"image": image, "stylized": stylized})
    np.testing.assert_array_equal(grid, same)


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


@pytest.mark.parametrize("stylized_bn", ["train", "frozen"])
def test_phase3_two_backward_passes_give_the_gradient_of_the_summed_loss(stylized_bn):
    """MixStyleFlowIteration back-propagates the clean terms before the stylized pass (to halve
    peak memory); the accumulated gradient must equal that of one backward of the total loss.
    With ``stylized_bn="frozen"`` the stylized terms see the batch-norm weights as constants."""
    from types import SimpleNamespace

    from msf_monai.engines import add_image_noise, frozen_batchnorm_statistics, rescale_to_reference

    def make():
        torch.manual_seed(0)
        styles = {k: MixStyleFlow(_constant_style_sampler(c), p=1.0, lam=0.3) for k, c in {2: 32, 3: 16, 4: 16}.items()}
        return DualDecoderNet(image_decoder_styles=styles).train()

    batch = next(iter(tiny_loader(n_batches=1)))
    x, y = batch["image"], batch["label"]
    loss_fn = DiceCELoss(sigmoid=True)
    mse = torch.nn.MSELoss()

    net_a = make()
    engine = SimpleNamespace(network=net_a, loss_function=loss_fn, state=SimpleNamespace(output={}), fire_event=lambda e: None)
    torch.manual_seed(1)
    iteration = MixStyleFlowIteration(rec_weight=0.5, stylized_bn=stylized_bn)
    terms = iteration.forward_backward(engine, x, y, lambda loss: loss.backward())

    net_b = make()
    torch.manual_seed(1)
    z = net_b.encode(add_image_noise(x, 0.05))
    seg, rec = net_b.segment(z), net_b.reconstruct(z)
    with torch.no_grad():
        stylized = rescale_to_reference(net_b.reconstruct(z.detach(), stylize=True), x)
    params = dict(net_b.named_parameters())
    if stylized_bn == "frozen":  # the stylized pass with the batch-norm parameters as constants
        bn = {f"{n}.{p}" for n, m in net_b.named_modules() if isinstance(m, torch.nn.BatchNorm2d) for p in ("weight", "bias")}
        params = {n: t.detach() if n in bn else t for n, t in params.items()}
    with frozen_batchnorm_statistics(net_b) if stylized_bn == "frozen" else contextlib.nullcontext():
        seg_s, rec_s = torch.func.functional_call(net_b, params, (stylized,))
    total = loss_fn(seg, y) + 0.5 * mse(rec, x) + loss_fn(seg_s, y) + 0.5 * mse(rec_s, x)
    total.backward()

    assert float(terms["loss"]) == pytest.approx(float(total), rel=1e-5)
    for (name, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)