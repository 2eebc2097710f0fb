"""The training steps (msf_monai.engines), checked against direct computations."""

from __future__ import annotations

import contextlib

import pytest
import torch
from monai.engines.utils import IterationEvents
from monai.losses import DiceCELoss

from training_utils import bn_buffers, styled_net, tiny_loader, tiny_trainer
from msf_monai.engines import (
    DualDecoderIteration, MixStyleFlowIteration, StylizerIteration, add_image_noise, rescale_to_reference,
)
from msf_monai.networks import DualDecoderNet, reference_unet
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


# the stylized pass and batch norm
def _stylized_bn_effect(stylized_bn: str):
    """BN buffers after a real Phase III step, and after the same step's clean pass alone."""
    torch.manual_seed(0)
    net = styled_net()
    ref = styled_net()
    ref.load_state_dict(net.state_dict())
    loader = tiny_loader(n_batches=1)
    tiny_trainer(net, MixStyleFlowIteration(stylized_bn=stylized_bn, noise_std=0.0), loader).run()
    # reference: only the clean pass of the same batch updates batch norm
    ref.train()
    ref(next(iter(loader))["image"])
    return bn_buffers(net), bn_buffers(ref)


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
    net = styled_net()
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


def _stylizer_run(regime: str = "train", stylized_weight: float = 1.0, n_batches: int = 2):
    torch.manual_seed(0)
    stylizer = styled_net()
    frozen = {k: v.clone() for k, v in stylizer.state_dict().items()}
    unet = reference_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    seen = []
    unet.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    iteration = StylizerIteration(stylizer, stylizer_regime=regime, stylize_mode="residual", rec_weight=0.0, noise_std=0.0,
                                  stylized_weight=stylized_weight)
    trainer = tiny_trainer(unet, iteration, tiny_loader(n_batches=n_batches))
    trainer.run()
    return stylizer, frozen, unet, before, trainer, seen


@pytest.mark.slow
def test_stylizer_iteration_trains_a_unet_on_frozen_phase1_styles():
    """The UNet learns from both batches; the stylizer (weights, batch-norm statistics) is untouched."""
    stylizer, frozen, unet, before, trainer, seen = _stylizer_run()
    for k, v in stylizer.state_dict().items():
        torch.testing.assert_close(v, frozen[k], msg=f"the stylizer changed {k}")
    assert any(not torch.equal(v, before[k]) for k, v in unet.state_dict().items() if v.is_floating_point())
    out = trainer.state.output[0]
    assert set(out) >= {"seg_loss", "seg_loss_stylized"} and "rec_loss" not in out  # a UNet has no reconstruction
    assert float(out["loss"]) == pytest.approx(float(out["seg_loss"]) + float(out["seg_loss_stylized"]), rel=1e-5)
    stylized, image = out["stylized"], out["image"]
    assert stylized.shape == image.shape and not torch.allclose(stylized, image, atol=1e-2)
    assert float(stylized.min()) == pytest.approx(float(image.min()), abs=1e-5)
    # the UNet sees, per step, the clean batch and then the stylized one (output: decollated, first image)
    assert len(seen) == 4
    torch.testing.assert_close(seen[-2][0], image)
    torch.testing.assert_close(seen[-1][0], stylized)
    assert trainer.state.perturbation["image_change"] > 0
    for m in stylizer.modules():  # "train" regime: batch statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.training


@pytest.mark.slow
def test_stylizer_iteration_the_stylized_term_trains_the_unet():
    """``stylized_weight`` 0 and 1 from the same start and random streams end with other weights."""
    weights = {}
    for w in (0.0, 1.0):
        unet = _stylizer_run(stylized_weight=w, n_batches=1)[2]
        weights[w] = torch.cat([p.detach().flatten() for p in unet.parameters()])
    assert not torch.allclose(weights[0.0], weights[1.0])


@pytest.mark.slow
def test_stylizer_iteration_runs_the_stylizer_in_its_flows_regime():
    """In the ``eval`` regime the stylizer's batch norm uses its running statistics (and leaves them
    unchanged) while its style layers still act."""
    stylizer, frozen, _, _, _, _ = _stylizer_run(regime="eval", n_batches=1)
    bns = [m for m in stylizer.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert all(m.training for m in stylizer.image_decoder_styles.values())
    for k, v in stylizer.state_dict().items():
        torch.testing.assert_close(v, frozen[k], msg=f"the stylizer changed {k}")


def test_stylizer_iteration_regimes_differ_and_bad_settings_are_refused():
    """The ``eval`` regime normalises the stylizer with its running statistics: another stylized batch."""
    torch.manual_seed(0)
    stylizer = styled_net()
    for m in stylizer.modules():  # running statistics unlike any batch's
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(0.3)
            m.running_var.fill_(4.0)
    x = torch.rand(4, 1, 32, 32)
    made = {}
    for regime in ("train", "eval"):
        it = StylizerIteration(stylizer, stylizer_regime=regime, stylizer_noise_std=0.0)
        it._stylizer_mode()
        z = stylizer.encode(x)
        made[regime] = it.stylize(None, z, x, None, stylizer.reconstruct(z))
        assert stylizer.image_decoder_styles["2"].training  # the style layers act in both regimes
    assert not torch.allclose(made["train"], made["eval"], atol=1e-3)
    with pytest.raises(ValueError, match="stylizer_regime"):
        StylizerIteration(stylizer, stylizer_regime="test")
    with pytest.raises(ValueError, match="MixStyleFlow layers"):
        StylizerIteration(DualDecoderNet())
