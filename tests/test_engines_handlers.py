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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def _evaluate_with_the_bundle_config(task, cases, tmp_path, **overrides):
    """Run the metric, post-processing, inferer and Dice writer of ``bundles/<task>/configs/evaluate.json``
    in a MONAI evaluator whose network is the identity: each case's ``image`` holds the logits
    (+10 = foreground, -10 = background). Returns the key metric and the written summary."""
    from monai.bundle import ConfigParser
    from monai.data import DataLoader

    from bundle_utils import REPO

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / task / "configs" / "evaluate.json"))
    handlers = parser.get("handlers")
    writer_index = next(i for i, h in enumerate(handlers) if str(h.get("_target_", "")).endswith("PerCaseDiceWriter"))
    # no checkpoint here, so no training split or checkpoint to record (they come from the checkpoint's
    # training run); plain tensors on the model's grid, so Dice on that grid (nothing to invert)
    parser.update({"bundle_root": str(tmp_path), "output_dir": str(tmp_path), "eval_name": "m", "eval_space": "resized",
                   f"handlers#{writer_index}#split": None, f"handlers#{writer_index}#protocol": None,
                   **({"resample": "resize", "pixel_spacing": 0.625, "field_of_view": 140} if task == "prostate" else {}),
                   **overrides})
    data = [{"image": 20.0 * pred - 10.0, "label": label, "site": site, "case": case} for case, site, pred, label in cases]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(data, batch_size=1), network=torch.nn.Identity(),
        inferer=parser.get_parsed_content("inferer"), postprocessing=parser.get_parsed_content("postprocessing"),
        key_val_metric=parser.get_parsed_content("key_metric"), val_handlers=[parser.get_parsed_content(f"handlers#{writer_index}")],
    )
    evaluator.run()
    return evaluator.state.metrics["mean_dice"], json.loads((tmp_path / "m_summary.json").read_text())


def test_prostate_dice_through_the_evaluate_config(tmp_path):
    """False positives, a missed structure, an empty label with and without a prediction, by hand:
    one Dice definition for the per-case values (``PerCaseDiceWriter``) and the config's key metric
    (``MeanDice`` with ignore_empty false): an empty label scores 1 when nothing is predicted and 0
    for any prediction, so the logged metric is the mean of the written per-case values."""
    shape = (1, 4, 4, 2)  # a small volume [C, H, W, D]: 32 voxels
    label = torch.zeros(shape)
    label[0, :2] = 1  # 16 voxels
    half = torch.zeros(shape)
    half[0, :1] = 1  # 8 voxels, all inside the label
    fp = label.clone()
    fp[0, 3, :2] = 1  # the label plus 4 false positives
    stray = torch.zeros(shape)
    stray[0, 3, 3] = 1  # one false-positive voxel, no label
    empty = torch.zeros(shape)
    cases = [
        ("c1", "A", half, label),  # 2*8 / (8+16)
        ("c2", "A", fp, label),  # 2*16 / (20+16)
        ("c3", "B", empty, empty),  # nothing to find, nothing found
        ("c4", "B", stray, empty),  # false positive on an empty label
        ("c5", "B", empty, label),  # missed entirely
    ]
    expected = {"c1": 16 / 24, "c2": 32 / 36, "c3": 1.0, "c4": 0.0, "c5": 0.0}
    metric, summary = _evaluate_with_the_bundle_config("prostate", cases, tmp_path, image_size=4, batch_size=2)
    assert {c["case"]: c["prostate"] for c in summary["cases"]} == pytest.approx(expected, abs=1e-6)
    assert summary["sites"]["A"]["prostate"]["mean"] == pytest.approx((16 / 24 + 32 / 36) / 2)
    assert summary["sites"]["B"]["prostate"]["mean"] == pytest.approx(1 / 3)
    assert summary["sites"]["B"]["n"] == 3
    assert metric == pytest.approx(np.mean(list(expected.values())), abs=1e-6)
    # the paper-style table reads the per-case values: site B (unseen) 33.3 %
    from msf_monai.report import dg_table

    table = dg_table({"m": [summary]}, source_site="A")
    assert table.mean["m"]["unseen mean"] == pytest.approx([1 / 3])
    assert "| m | 77.8 | 33.3 | 33.3 |" in table.markdown()


def test_fundus_two_channel_dice_through_the_evaluate_config(tmp_path):
    """Disc and cup scored per channel; the config's post-processing keeps the cup inside the disc
    before scoring (a cup predicted outside the predicted disc is no cup)."""

    def masks(disc_box, cup_box, extra_cup=None):
        m = torch.zeros(2, 8, 8)
        (a, b), (c, d) = disc_box
        m[0, a:b, c:d] = 1
        (a, b), (c, d) = cup_box
        m[1, a:b, c:d] = 1
        if extra_cup is not None:
            m[1][extra_cup] = 1
        return m

    label = masks(((2, 6), (2, 6)), ((3, 5), (3, 5)))  # disc 16 pixels, cup 4 inside it
    p1 = masks(((2, 5), (2, 6)), ((3, 5), (3, 5)))  # disc 12 of 16, cup exact
    p2 = masks(((2, 6), (1, 6)), ((3, 4), (3, 5)))  # disc + 4 false positives, cup 2 of 4
    p3 = masks(((2, 6), (2, 6)), ((3, 5), (3, 5)), extra_cup=(slice(0, 1), slice(0, 2)))  # cup + 2 pixels outside the disc
    cases = [("f1", "Domain1", p1, label), ("f2", "Domain2", p2, label), ("f3", "Domain2", p3, label)]
    expected = {"f1": [24 / 28, 1.0], "f2": [32 / 36, 4 / 6], "f3": [1.0, 1.0]}  # f3's cup: 2*4/(6+4) without the rule
    metric, summary = _evaluate_with_the_bundle_config("fundus", cases, tmp_path, image_size=8)
    assert summary["channels"] == ["disc", "cup"]
    for c in summary["cases"]:
        assert [c["disc"], c["cup"]] == pytest.approx(expected[c["case"]], abs=1e-6), c["case"]
    assert summary["sites"]["Domain2"]["cup"]["mean"] == pytest.approx((4 / 6 + 1.0) / 2)
    assert metric == pytest.approx(np.mean([v for vs in expected.values() for v in vs]), abs=1e-6)


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
@pytest.mark.parametrize("stylized_weight", [1.0, 0.5])
@pytest.mark.parametrize("stylized_bn", ["train", "frozen"])
def test_phase3_two_backward_passes_give_the_gradient_of_the_summed_loss(stylized_bn, stylized_weight):
    """MixStyleFlowIteration back-propagates the clean terms before the stylized pass (to halve
    peak memory); the accumulated gradient must equal that of one backward of the total loss
    ``clean + stylized_weight * stylized``. With ``stylized_bn="frozen"`` the stylized terms see
    the batch-norm weights as constants."""
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
    iteration = MixStyleFlowIteration(rec_weight=0.5, stylized_bn=stylized_bn, stylized_weight=stylized_weight)
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
    total = loss_fn(seg, y) + 0.5 * mse(rec, x) + stylized_weight * (loss_fn(seg_s, y) + 0.5 * mse(rec_s, x))
    total.backward()

    terms = {k: float(v.detach()) for k, v in terms.items()}
    assert terms["loss"] == pytest.approx(float(total.detach()), rel=1e-5)
    # the reported loss from its own terms: clean + weight * stylized, on this fixed batch
    clean = terms["seg_loss"] + 0.5 * terms["rec_loss"]
    stylized = terms["seg_loss_stylized"] + 0.5 * terms["rec_loss_stylized"]
    assert terms["loss"] == pytest.approx(clean + stylized_weight * stylized, rel=1e-6)
    assert abs(stylized) > 1e-3  # the weight matters
    for (name, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)

def test_style_shift_readable_scale_against_a_direct_computation():
    from msf_monai.style_shift import readable_scale

    calibration = {"threshold": 9.0, "cases": [{"score": v} for v in (1.0, 2.0, 3.0, 5.0)]}  # median 2.5
    for score, percentile, level in [
        (0.5, 0.0, 0.0),  # below every source case
        (2.5, 50.0, 0.0),  # the median
        (9.0, 100.0, np.log10(2.0)),  # the threshold: 0.30
        (2.5 + 6.5 * 999, 100.0, 3.0),  # 999 threshold-distances beyond the median: three orders
    ]:
        p, lv = readable_scale(score, calibration)
        assert p == pytest.approx(percentile) and lv == pytest.approx(level), score
    assert all(np.isnan(v) for v in readable_scale(3.0, {"threshold": 1.0, "cases": []}))
    # all source cases alike: the spread falls back to 1, no division by zero
    assert readable_scale(4.0, {"threshold": 2.0, "cases": [{"score": 2.0}] * 3}) == (100.0, pytest.approx(np.log10(3.0)))
