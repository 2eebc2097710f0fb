"""Stylized-pass batch norm, Phase II statistics regime, relative sampling guard, residual
stylization, perturbation measurement, GIN, the reference UNet and encoder-level MixStyleFlow."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from monai.engines import SupervisedEvaluator
from monai.losses import DiceCELoss

from bundle_utils import SHARED_DATA, check, copy_bundle, run_bundle
from training_utils import tiny_loader, tiny_trainer
from msf_monai.engines import MixStyleFlowIteration, rescale_to_reference
from msf_monai.flow_fit import sample_flow
from msf_monai.flows import StyleFlowBank
from msf_monai.handlers import PerturbationMonitor, StyleStatisticsIteration, StyleStatisticsRecorder
from msf_monai.methods import get_method
from msf_monai.networks import DualDecoderNet, SegmentationView, build_network, checkpoint_architecture
from msf_monai.report import ablation_table, sign_test
from msf_monai.styles import GIN, MixStyleFlow, mixstyleflow_layers


def _styled_net(mean=3.0, std=2.0):
    def sampler(c):
        return lambda n: (torch.full((n, c), mean), torch.full((n, c), std))

    return DualDecoderNet(image_decoder_styles={k: MixStyleFlow(sampler(c), p=1.0, lam=0.0) for k, c in {2: 32, 3: 16, 4: 16}.items()})


def _bn_buffers(net):
    return {k: v.clone() for k, v in net.state_dict().items() if "running_" in k or "num_batches_tracked" in k}


def _stylized_bn_effect(stylized_bn: str):
    """BN buffers after a real Phase III step, and after the same step's clean pass alone."""
    torch.manual_seed(0)
    net = _styled_net()
    ref = _styled_net()
    ref.load_state_dict(net.state_dict())
    loader = tiny_loader(n_batches=1)
    tiny_trainer(net, MixStyleFlowIteration(stylized_bn=stylized_bn, noise_std=0.0), loader).run()
    # reference: only the clean pass of the same batch updates batch norm
    ref.train()
    ref(next(iter(loader))["image"])
    return _bn_buffers(net), _bn_buffers(ref)


@pytest.mark.slow
def test_stylized_pass_leaves_batchnorm_statistics_unchanged_by_default():
    after, clean_only = _stylized_bn_effect("frozen")
    assert after.keys() == clean_only.keys() and len(after) > 20
    for key in after:
        torch.testing.assert_close(after[key], clean_only[key], msg=key)


@pytest.mark.slow
def test_old_behaviour_lets_the_stylized_pass_update_batchnorm():
    after, clean_only = _stylized_bn_effect("train")
    changed = [k for k in after if "running_mean" in k and not torch.allclose(after[k], clean_only[k])]
    assert len(changed) > 10
    # one more batch for the segmentation path (the stylized pass), two for the image decoder
    # (making the stylized image, then the stylized pass)
    tracked = {k: int(after[k]) - int(clean_only[k]) for k in after if "num_batches_tracked" in k}
    assert {v for k, v in tracked.items() if k.startswith("seg_decoder")} == {1}
    assert {v for k, v in tracked.items() if k.startswith("image_decoder")} == {2}


def test_stylized_pass_gives_batchnorm_affine_parameters_no_gradient():
    torch.manual_seed(0)
    net = _styled_net()
    batch = next(iter(tiny_loader(n_batches=1)))
    grads = {}

    class Capture:  # what forward_backward reads from the engine
        network, loss_function = net, DiceCELoss(sigmoid=True)

        class state:
            output = {}

        @staticmethod
        def fire_event(event):
            pass

    def backward(loss):
        net.zero_grad(set_to_none=True)
        loss.backward()
        grads[len(grads)] = {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}

    net.train()
    MixStyleFlowIteration().forward_backward(Capture, batch["image"], batch["label"], backward)
    stylized = grads[1]  # the second backward is the stylized pass alone (gradients were cleared)
    bn = [n for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(stylized[f"{n}.weight"] is None and stylized[f"{n}.bias"] is None for n in bn)
    assert stylized["stem.0.weight"] is not None and float(stylized["stem.0.weight"].abs().sum()) > 0
    assert all(p.requires_grad for p in net.parameters())  # restored afterwards
    assert grads[0][f"{bn[0]}.weight"] is not None  # the clean pass trains them


@pytest.mark.slow
def test_phase2_statistics_equal_the_phase3_regime(tmp_path):
    torch.manual_seed(0)
    net = DualDecoderNet()
    net.train()
    for _ in range(2):  # running statistics that differ from any single batch's
        net(torch.rand(4, 1, 32, 32))
    buffers = _bn_buffers(net)
    loader = tiny_loader(n_batches=2, batch=3)

    def record(iteration, layers=(2, 3, 4)):
        recorder = StyleStatisticsRecorder(layers=layers)
        SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=net, iteration_update=iteration,
                            val_handlers=[recorder], decollate=False).run()
        return recorder.stats

    stats = record(StyleStatisticsIteration(regime="train", noise_std=0.0))
    # reference: the features of Phase III's clean pass (train-mode batch norm on the batch)
    expected = {k: ([], []) for k in (2, 3, 4)}
    ref = DualDecoderNet()
    ref.load_state_dict(net.state_dict())
    ref.train()
    for batch in loader:
        with torch.no_grad():
            _, feats = ref.reconstruct(ref.encode(batch["image"]), return_features=True)
        for k in expected:
            expected[k][0].append(feats[k].mean(dim=(2, 3)))
            expected[k][1].append(feats[k].var(dim=(2, 3), unbiased=False))
    for k in (2, 3, 4):
        np.testing.assert_allclose(stats[k]["mean"], torch.cat(expected[k][0]).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats[k]["var"], torch.cat(expected[k][1]).numpy(), rtol=1e-4, atol=1e-6)
    # the input noise of a training step is applied
    noised = record(StyleStatisticsIteration(regime="train", noise_std=0.05), layers=(4,))
    assert not np.allclose(noised[4]["mean"], stats[4]["mean"], atol=1e-4)
    for key, value in _bn_buffers(net).items():  # recording changed no running statistic
        torch.testing.assert_close(value, buffers[key])
    # the eval regime gives other statistics (running batch norm, clean input)
    assert not np.allclose(record(StyleStatisticsIteration(regime="eval"), layers=(2,))[2]["mean"], stats[2]["mean"], atol=1e-3)


def test_encoder_statistics_come_from_the_encoder_stages():
    torch.manual_seed(0)
    net = DualDecoderNet().eval()
    x = torch.rand(2, 1, 32, 32)
    feats = StyleStatisticsIteration(regime="eval", source="encoder").features(net, x)
    assert {k: f.shape[1] for k, f in feats.items()} == net.encoder_channels
    with torch.no_grad():
        h = net.down_blocks[0](net.stem(x))
    torch.testing.assert_close(feats[1], h)


def _fitted_bank(seed=0):
    torch.manual_seed(seed)
    stats = {2: {"mean": np.random.RandomState(seed).randn(200, 4) * 0.1 + 0.5,
                 "var": np.random.RandomState(seed + 1).rand(200, 4) * 0.01 + 0.01}}
    bank = StyleFlowBank({2: 4}, temperatures={2: 3.5}, num_blocks=2)
    bank.fit(stats, epochs=3, lr=1e-3, log_every=0)
    return bank, stats


@pytest.mark.slow
def test_relative_guard_keeps_samples_within_the_observed_range(tmp_path):
    bank, stats = _fitted_bank()
    # perturb the flow so that it emits outliers: a huge shift on one output channel
    flow = bank.mean_flows["2"]
    actnorm = [m for m in flow._transform._transforms if hasattr(m, "log_scale")][-1]
    with torch.no_grad():
        actnorm.shift[0] += 50.0  # ActNorm's inverse subtracts the shift: channel 0 lands ~50 away
    raw, _ = sample_flow(flow, 400, 3.5, max_abs=float("inf"), generator=torch.Generator().manual_seed(0))
    low, high = bank.sampling_bounds(2, "mean")
    outside = ((raw < low) | (raw > high)).any(dim=1)
    assert int(outside.sum()) > 0  # the perturbed flow does emit outliers ...
    # ... and with channel 0 far off every row stays outside: after the redraws they are pulled
    # into the bounds, never passed on
    assert bool(outside.all())
    mean, _ = bank.sample(2, 50)
    assert bool(((mean >= low) & (mean <= high)).all()) and bank.last_replaced["mean"] == 50
    # a milder perturbation: some rows out of range, replaced and counted
    with torch.no_grad():
        actnorm.shift[0] -= 50.0
        actnorm.log_scale[0] -= 1.0  # widen channel 0 by e
    raw, _ = sample_flow(flow, 2000, 3.5, max_abs=float("inf"), generator=torch.Generator().manual_seed(0))
    n_out = int(((raw < low) | (raw > high)).any(dim=1).sum())
    assert n_out > 0
    mean, std = bank.sample(2, 2000)
    assert bool(((mean >= low) & (mean <= high)).all())
    assert bank.last_replaced["mean"] > 0 and bank.guard_counts[2]["replaced"] >= bank.last_replaced["mean"]
    assert (std > 0).all()
    # the bound is k times the observed range on each side, k configurable; None switches it off
    obs = stats[2]["mean"]
    width = obs.max(0) - obs.min(0)
    np.testing.assert_allclose(low.numpy(), obs.min(0) - width, rtol=1e-4)
    bank.guard_range = 0.5
    low2, _ = bank.sampling_bounds(2, "mean")
    np.testing.assert_allclose(low2.numpy(), obs.min(0) - 0.5 * width, rtol=1e-4)
    bank.guard_range = None
    assert bank.sampling_bounds(2, "mean") is None
    # a channel that was constant in the data gives no range: it is left unbounded
    bank.guard_range = 1.0
    bank.observed[2]["mean"]["high"] = bank.observed[2]["mean"]["low"].clone()
    low3, high3 = bank.sampling_bounds(2, "mean")
    assert torch.isinf(low3).all() and torch.isinf(high3).all()
    bank.observed[2]["mean"]["high"] = torch.as_tensor(obs.max(0), dtype=torch.float32)
    # the observed range travels with the checkpoint
    bank.guard_range = 1.0
    bank.save(tmp_path / "flows.pt")
    loaded = StyleFlowBank.load(tmp_path / "flows.pt")
    torch.testing.assert_close(loaded.sampling_bounds(2, "mean")[0], low)


def test_mixstyleflow_layers_take_temperatures_guard_and_measure_shift():
    bank, stats = _fitted_bank()
    layers = mixstyleflow_layers(bank, temperatures=[1.0], guard_range=2.0, p=1.0, lam=0.0)
    assert bank.temperatures[2] == 1.0 and bank.guard_range == 2.0
    x = torch.randn(3, 4, 8, 8)
    layers[2].train()(x)
    shift = layers[2].last_shift
    # lam = 0: the whole distance from each image's own statistics to the sampled ones, in
    # units of the real statistics' spread
    assert shift is not None and shift["mean"] > 1.0
    with pytest.raises(ValueError, match="temperatures"):
        mixstyleflow_layers(bank, temperatures=[1.0, 2.0])
    # the shift against a direct computation: style (3, 2), lam 0.25, spreads of the real statistics (2, 4)
    layer = MixStyleFlow(lambda n: (torch.full((n, 4), 3.0), torch.full((n, 4), 2.0)), p=1.0, lam=0.25,
                         style_scale=(torch.full((4,), 2.0), torch.full((4,), 4.0))).train()
    layer(x)
    mu, sigma = x.mean(dim=(2, 3)), (x.var(dim=(2, 3), unbiased=False) + 1e-6).sqrt()
    assert layer.last_shift["mean"] == pytest.approx(float((0.75 * (3.0 - mu)).abs().mean() / 2.0), rel=1e-5)
    assert layer.last_shift["std"] == pytest.approx(float((0.75 * (2.0 - sigma)).abs().mean() / 4.0), rel=1e-5)
    layer.p = 0.0
    layer(x)
    assert layer.last_shift is None  # an inactive call measures nothing


def test_residual_stylization_keeps_the_input_detail():
    it = MixStyleFlowIteration(stylize_mode="residual")
    x = torch.rand(2, 1, 16, 16)
    rec = torch.full_like(x, 0.5)
    same = it.compose(rec.clone(), x, rec)  # no style change: the input itself
    torch.testing.assert_close(same, rescale_to_reference(x, x))
    shifted = it.compose(rec + 0.1 * torch.linspace(0, 1, 16).view(1, 1, 1, 16), x, rec)
    expected = rescale_to_reference(x + 0.1 * torch.linspace(0, 1, 16).view(1, 1, 1, 16), x)
    torch.testing.assert_close(shifted, expected)
    decoded = MixStyleFlowIteration(stylize_mode="decoded").compose(rec + 0.1, x, rec)
    assert not torch.allclose(decoded, shifted)
    with pytest.raises(ValueError, match="stylize_mode"):
        MixStyleFlowIteration(stylize_mode="blend")
    with pytest.raises(ValueError, match="stylized_bn"):
        MixStyleFlowIteration(stylized_bn="eval")


@pytest.mark.slow
def test_perturbation_is_measured_and_logged(tmp_path):
    torch.manual_seed(0)
    net = _styled_net()
    bank, _ = _fitted_bank()
    monitor = PerturbationMonitor(tmp_path / "perturbation.json")
    tiny_trainer(net, MixStyleFlowIteration(stylize_mode="residual"), tiny_loader(n_batches=2), [monitor]).run()
    report = json.loads((tmp_path / "perturbation.json").read_text())
    mean = report["mean"]
    assert mean["blur"] == pytest.approx(0.0, abs=1e-5)  # residual: the un-stylized image is the input
    assert mean["image_change"] > 0.05
    assert mean["active_share"] == 1.0 and len(report["epochs"]) == 1


def test_gin_keeps_shape_norm_and_varies():
    torch.manual_seed(0)
    gin = GIN(p=1.0)
    x = torch.rand(3, 1, 32, 32)
    a, b = gin.train()(x), gin(x)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert not torch.allclose(a, b)  # a new random network per call
    assert not torch.allclose(a[0], a[1] * x[0].norm() / x[1].norm())  # and per image
    torch.testing.assert_close(a.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-3, atol=1e-3)
    assert torch.equal(gin.eval()(x), x)
    rgb = torch.rand(2, 3, 16, 16)
    assert GIN(p=1.0).train()(rgb).shape == rgb.shape
    with pytest.raises(ValueError, match="2-D"):
        GIN(p=1.0).train()(torch.rand(1, 1, 8, 8, 8))


def test_gin_method_trains_with_a_clean_reconstruction_target():
    iteration = get_method("gin").iteration(p=1.0)
    assert isinstance(iteration.input_style, GIN)
    targets = []
    mse = iteration.rec_loss
    iteration.rec_loss = lambda rec, target: targets.append(target) or mse(rec, target)
    torch.manual_seed(0)
    trainer = tiny_trainer(DualDecoderNet(), iteration, tiny_loader(n_batches=1))
    trainer.run()
    batch = next(iter(tiny_loader(n_batches=1)))
    assert len(targets) == 1 and torch.equal(targets[0], batch["image"])  # reconstruct the clean image ...
    out = trainer.state.output[0]
    assert not torch.allclose(out["stylized"], out["image"])  # ... from the GIN-augmented one


@pytest.mark.slow
def test_reference_unet_trains_and_is_recognised(tmp_path):
    method = get_method("unet")
    net = build_network(method.architecture)
    assert 1.5e6 < sum(p.numel() for p in net.parameters()) < 1.8e6
    torch.manual_seed(0)
    trainer = tiny_trainer(net, method.iteration(), tiny_loader(n_batches=1))
    trainer.run()
    assert float(trainer.state.output[0]["rec_loss"]) == 0.0
    assert SegmentationView(net)(torch.rand(1, 1, 32, 32)).shape == (1, 1, 32, 32)
    torch.save(net.state_dict(), tmp_path / "unet.pt")
    torch.save(DualDecoderNet().state_dict(), tmp_path / "dual.pt")
    assert checkpoint_architecture(str(tmp_path / "unet.pt")) == "unet"
    assert checkpoint_architecture(str(tmp_path / "dual.pt")) == "dual_decoder"
    with pytest.raises(ValueError, match="no style layers"):
        build_network("unet", encoder_styles={1: GIN()})


def test_sign_test_and_ablation_table():
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    assert sign_test(5, 5) == 1.0
    assert sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)

    def summary(values):
        cases = [{"site": "B", "case": f"c{i}", "p": v} for i, v in enumerate(values)]
        cases.append({"site": "A", "case": "a0", "p": 0.8})
        return {"channels": ["p"], "cases": cases,
                "sites": {"A": {"n": 1, "p": {"mean": 0.8}}, "B": {"n": len(values), "p": {"mean": float(np.mean(values))}}}}

    base = [summary([0.5, 0.6, 0.7]), summary([0.5, 0.6, 0.7])]
    better = [summary([0.6, 0.7, 0.6]), summary([0.6, 0.7, 0.9])]
    text = ablation_table({"base": base, "new": better}, source_site="A",
                          perturbations={"new": [{"image_change": 0.2, "blur": 0.1, "dec2_mean": 1.0, "dec2_std": 3.0}]})
    row = [line for line in text.splitlines() if line.startswith("| new")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and cells[3] == "68.3 ± 5.0"  # unseen mean ± std over seeds
    assert cells[4] == "3 / 3" and cells[5] == f"{sign_test(3, 0):.3f}"
    assert cells[6:] == ["0.20", "0.10", "2.00"]
    # with seeds: only the seeds both rows have are compared (seed 1 of "new" alone: 1 of 3 better)
    text = ablation_table({"base": base, "new": better[1:]}, source_site="A", seeds={"base": [0, 1], "new": [0]})
    row = [line for line in text.splitlines() if line.startswith("| new")][0]
    assert [c.strip() for c in row.strip("|").split("|")][4] == "3 / 3"
    worse = [summary([0.4, 0.7, 0.6])]
    text = ablation_table({"base": base, "new": worse}, source_site="A", seeds={"base": [0, 1], "new": [1]})
    row = [line for line in text.splitlines() if line.startswith("| new")][0]
    assert [c.strip() for c in row.strip("|").split("|")][4] == "1 / 3"


def test_encoder_mixstyleflow_samples_from_encoder_flows(tmp_path):
    method = get_method("mixstyleflow_encoder")
    assert method.needs_flows and method.style_source == "encoder" and method.flow_file() == "style_flows_encoder.pt"
    bank = StyleFlowBank({1: 32, 2: 64}, temperatures={1: 1.5, 2: 2.5}, num_blocks=1)
    rng = np.random.RandomState(0)
    bank.fit({k: {"mean": rng.randn(50, c), "var": rng.rand(50, c) + 0.1} for k, c in {1: 32, 2: 64}.items()},
             epochs=1, log_every=0)
    bank.save(tmp_path / "enc.pt", style_source="encoder")
    styles = method.encoder_styles(p=1.0, flow_checkpoint=str(tmp_path / "enc.pt"))
    assert set(styles) == {1, 2} and all(isinstance(s, MixStyleFlow) for s in styles.values())
    assert method.image_decoder_styles(flow_checkpoint=str(tmp_path / "enc.pt")) == {}
    bank.save(tmp_path / "dec.pt", style_source="image_decoder")
    from msf_monai.bundle import ConfigValueError

    with pytest.raises(ConfigValueError, match="encoder"):
        method.encoder_styles(p=1.0, flow_checkpoint=str(tmp_path / "dec.pt"))


def test_version_1_flow_checkpoints_still_load_without_the_relative_guard(tmp_path, caplog):
    bank, _ = _fitted_bank()
    bank.save(tmp_path / "flows.pt")
    payload = torch.load(tmp_path / "flows.pt", weights_only=True)
    payload["version"] = 1
    del payload["observed"]
    torch.save(payload, tmp_path / "old.pt")
    old = StyleFlowBank.load(tmp_path / "old.pt")
    assert old.observed == {} and old.sampling_bounds(2, "mean") is None
    mean, std = old.sample(2, 10)
    assert mean.shape == (10, 4) and "no observed statistics range" in caplog.text


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "prostate_nci_isbi").is_dir(), reason="needs ../shared/data")
def test_new_arms_run_through_the_bundle(tmp_path):
    """Encoder-level MixStyleFlow (Phase II on encoder statistics, then Phase III), residual
    stylization with the old Phase II regime, and the reference UNet, trained and evaluated by
    the bundle's own configs on real volumes."""
    data = tmp_path / "data"
    for site, names in {"A": ["Case00", "Case01", "Case02", "Case03"], "B": ["Case29"]}.items():
        (data / site).mkdir(parents=True)
        for name in names:
            for suffix in ("", "_Segmentation"):
                shutil.copy(SHARED_DATA / "prostate_nci_isbi" / f"{name}{suffix}.nii.gz", data / site)
    bundle = copy_bundle("prostate", tmp_path)
    common = ("--dataset_dir", str(data), "--source_site", "A", "--image_size", "32")
    train = (*common, "--batch_size", "8", "--epochs", "1", "--val_interval", "1")
    models = bundle / "models"
    check(run_bundle(tmp_path, "phase1", *train))
    check(run_bundle(tmp_path, "phase2", *common, "--epochs", "1", "--style_source", "encoder"))
    encoder_bank = StyleFlowBank.load(models / "style_flows_encoder.pt")
    assert encoder_bank.layer_channels == {1: 32, 2: 64, 3: 128} and encoder_bank.metadata["style_source"] == "encoder"
    assert encoder_bank.metadata["stats_regime"] == "train"
    check(run_bundle(tmp_path, "phase3", *train, "--style_method", "mixstyleflow_encoder"))
    shift = json.loads((bundle / "logs" / "phase3_mixstyleflow_encoder" / "perturbation.json").read_text())["mean"]
    assert any(k.startswith("enc") for k in shift)
    check(run_bundle(tmp_path, "phase2", *common, "--epochs", "1", "--stats_regime", "eval"))
    assert StyleFlowBank.load(models / "style_flows.pt").metadata["stats_regime"] == "eval"
    out = check(run_bundle(tmp_path, "phase3", *train, "--stylize_mode", "residual", "--stylized_bn", "train",
                           "--style_temperatures", "[1, 1, 1]", "--style_guard_range", "None"))
    assert "perturbation" in out
    residual = json.loads((bundle / "logs" / "phase3" / "perturbation.json").read_text())["mean"]
    assert residual["blur"] == pytest.approx(0.0, abs=1e-5)
    check(run_bundle(tmp_path, "phase3", *train, "--style_method", "unet"))
    assert checkpoint_architecture(str(models / "model_unet.pt")) == "unet"
    check(run_bundle(tmp_path, "evaluate", *common, "--checkpoint", str(models / "model_unet.pt")))
    summary = json.loads((bundle / "eval" / "model_unet_summary.json").read_text())
    assert summary["sites"]["B"]["n"] == 1
