"""The style methods (msf_monai.methods): every ``style_method`` trains through phase3.json, changing training, not evaluation.

The in-process tests parse the generated ``phase3.json`` with MONAI's ConfigParser (as
``monai.bundle run`` does) on a copy of the prostate bundle with demo data at 32 px, run one
training iteration with ``style_p = 1`` (every style layer acts), and check:

* the method's style layers (or its input augmentation) really changed what they were given
  (the stylized batch / feature maps differ from the clean ones);
* the trained weights load strictly into the evaluation network (``SegmentationOnlyNet``, or the
  UNet for the reference arm), whose
  eval-mode output equals the training network's eval-mode output: evaluation is unaffected.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from bundle_utils import copy_bundle
from msf_monai.errors import ConfigValueError
from msf_monai.flows import StyleFlowBank
from msf_monai.methods import METHODS, get_method
from msf_monai.networks import DualDecoderNet, SegmentationView, build_network, image_decoder_channels
from msf_monai.styles import GIN, MixStyleFlow
from training_utils import tiny_loader, tiny_trainer


TINY = {"image_size": 32, "epochs": 1, "batch_size": 4, "num_workers": 0, "device": "$torch.device('cpu')"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A prostate bundle copy with demo data, a (quickly fitted) flow bank for MixStyleFlow and
    an (untrained) Phase I model for the stylizer."""
    root = tmp_path_factory.mktemp("methods")
    target = copy_bundle("prostate", root)
    rng = np.random.default_rng(0)
    channels = image_decoder_channels()
    bank = StyleFlowBank({k: channels[k] for k in (2, 3, 4)})
    stats = {k: {"mean": rng.normal(size=(40, c)), "var": rng.uniform(0.5, 2.0, size=(40, c))} for k, c in bank.layer_channels.items()}
    bank.fit(stats, epochs=2, lr=1e-3)
    (target / "models").mkdir()
    bank.save(target / "models" / "style_flows.pt")
    enc = StyleFlowBank({1: 32, 2: 64, 3: 128}, temperatures={1: 1.5, 2: 2.5, 3: 3.5})
    enc.fit({k: {"mean": rng.normal(size=(40, c)), "var": rng.uniform(0.5, 2.0, size=(40, c))} for k, c in enc.layer_channels.items()},
            epochs=2, lr=1e-3)
    enc.save(target / "models" / "style_flows_encoder.pt", style_source="encoder")
    torch.save(DualDecoderNet().state_dict(), target / "models" / "phase1_model.pt")  # unet_mixstyleflow's stylizer
    return target


def _parser(bundle_root, method: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "phase3.json"))
    parser.update({"bundle_root": str(bundle_root), "style_method": method, "style_p": 1.0, **TINY})
    # one iteration, without validation, checkpoints or logs: what is tested is the step itself
    parser.update({"train#handlers": [], "train#extra_handlers": [], "train#trainer#epoch_length": 1, "train#trainer#decollate": False})
    return parser


def _style_modules(net, iteration):
    modules = list(getattr(net, "encoder_styles", {}).values()) + list(getattr(net, "image_decoder_styles", {}).values())
    if getattr(iteration, "input_style", None) is not None:
        modules.append(iteration.input_style)
    if getattr(iteration, "stylizer", None) is not None:  # styles made by the frozen Phase I network
        modules += list(iteration.stylizer.image_decoder_styles.values())
    return modules


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_changes_training_not_evaluation(bundle, method):
    parser = _parser(bundle, method)
    torch.manual_seed(0)
    trainer = parser.get_parsed_content("train#trainer")
    net = trainer.network

    changed = []

    def record(module, args, out):
        changed.append(float((out.detach() - args[0].detach()).abs().max()))

    hooks = [m.register_forward_hook(record) for m in _style_modules(net, parser.get_parsed_content("train#iteration"))]
    trainer.run()
    for h in hooks:
        h.remove()
    output = trainer.state.output
    assert np.isfinite(float(output["loss"]))

    if method in ("none", "unet"):
        assert not changed and "stylized" not in output
    else:
        assert changed, f"{method}: no style layer ran during the training step"
        assert max(changed) > 1e-3, f"{method}: the style layers left their inputs unchanged"
    if get_method(method).where in ("input", "image_decoder"):
        assert float((output["stylized"] - output["image"]).abs().max()) > 1e-3, "the stylized batch equals the clean one"

    # evaluation: the same weights in the evaluation network, eval mode, give the same output
    eval_net = build_network(get_method(method).architecture, in_channels=1, out_channels=1, segmentation_only=True)
    eval_net.load_state_dict(net.state_dict(), strict=True)
    eval_net.eval()
    view = SegmentationView(net).eval()
    x = output["image"][:2]
    with torch.no_grad():
        torch.testing.assert_close(eval_net(x), view(x))
        first = view(x)
        second = view(x)
    torch.testing.assert_close(first, second)  # no randomness left in evaluation


def test_method_outputs_are_kept_apart(bundle):
    parser = _parser(bundle, "dsu")
    assert parser.get_parsed_content("checkpoint_name") == "model_dsu.pt"
    assert parser.get_parsed_content("output_dir").endswith("phase3_dsu")
    parser = _parser(bundle, "mixstyleflow")
    assert parser.get_parsed_content("checkpoint_name") == "model.pt"


@pytest.mark.slow
def test_maxstyle_search_makes_the_batch_harder(bundle):
    """MaxStyle's adversarial steps raise the segmentation loss of the stylized batch, and leave
    the network's weights and batch-norm running statistics (and batch counters) untouched."""
    parser = _parser(bundle, "maxstyle")
    trainer = parser.get_parsed_content("train#trainer")
    net, it = trainer.network, parser.get_parsed_content("train#iteration")
    batch = next(iter(trainer.data_loader))
    x, y = batch["image"][:4], batch["label"][:4]
    net.train()

    class _Engine:
        network, loss_function = net, trainer.loss_function

    def loss_of(stylized):
        with torch.no_grad():
            return float(trainer.loss_function(net.segment(net.encode(stylized)), y).mean())

    losses = {}
    for steps in (0, 5):
        torch.manual_seed(3)
        it.steps = steps
        z = net.encode(x).detach()  # a training forward: it moves the running statistics, before the snapshot
        before = {k: v.clone() for k, v in net.state_dict().items()}
        assert any("running_mean" in k for k in before) and any("num_batches_tracked" in k for k in before)
        stylized = it.stylize(_Engine, z, x, y)
        # the whole state, buffers included: the search ran 1 + steps train-mode passes through
        # batch norm, none of which may count as training data
        after = net.state_dict()
        for k, v in before.items():
            torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=k)
        losses[steps] = loss_of(stylized)
    # (a plain training forward does move them, so the check above can fail)
    tracked = {k: v.clone() for k, v in net.state_dict().items() if "running_mean" in k or "num_batches_tracked" in k}
    net.encode(x)
    assert all(not torch.equal(net.state_dict()[k], v) for k, v in tracked.items() if k.startswith(("stem", "down")))
    assert losses[5] > losses[0], losses


@pytest.mark.slow
def test_phase3_settings_reach_the_step_and_init_from_phase1_loads_phase1_weights(bundle, tmp_path):
    """``stylized_weight`` and ``style_p`` of phase3.json reach the training step and the style
    layers; ``init_from_phase1`` starts Phase III from the Phase I checkpoint (default: from scratch)."""
    from msf_monai.networks import DualDecoderNet

    torch.manual_seed(123)
    phase1 = DualDecoderNet().state_dict()
    torch.save(phase1, tmp_path / "phase1_model.pt")

    def initialised(init: bool):
        parser = _parser(bundle, "mixstyleflow")
        parser.update({"stylized_weight": 0.5, "style_p": 0.3, "init_from_phase1": init,
                       "phase1_checkpoint": str(tmp_path / "phase1_model.pt")})
        steps = parser.get("initialize")
        index = next(i for i, step in enumerate(steps) if isinstance(step, dict) and step["_target_"].endswith("load_finished_weights"))
        parser.get_parsed_content(f"initialize#{index}")  # the step that loads (or not) the Phase I weights
        return parser

    parser = initialised(True)
    iteration = parser.get_parsed_content("train#iteration")
    assert iteration.stylized_weight == 0.5
    assert parser.get("train#trainer#network") == "@network"  # the network trained is the one initialised
    net = parser.get_parsed_content("network")
    assert [m.p for m in net.image_decoder_styles.values()] == [0.3, 0.3, 0.3]
    state = net.state_dict()
    assert set(state) == set(phase1)
    for k, v in phase1.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)

    fresh = initialised(False).get_parsed_content("network").state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in phase1.items() if k.endswith("weight"))


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


def test_the_stylizer_is_frozen_phase1_in_its_flows_regime(bundle, tmp_path):
    """``unet_mixstyleflow``'s stylizer: Phase I's weights, MixStyleFlow layers, no gradient, and
    the Phase II regime from the flow bank's metadata reaches the training step."""
    models = bundle / "models"
    bank = StyleFlowBank.load(models / "style_flows.pt")
    eval_flows = tmp_path / "style_flows_eval.pt"
    bank.save(eval_flows, stats_regime="eval")
    method = get_method("unet_mixstyleflow")
    assert method.image_decoder_styles(flow_checkpoint=str(eval_flows)) == {}  # the UNet gets no style layers
    assert get_method("mixstyleflow").stylizer(str(models / "phase1_model.pt")) is None
    for flows, regime in ((models / "style_flows.pt", "train"), (eval_flows, "eval")):
        stylizer = method.stylizer(str(models / "phase1_model.pt"), flow_style_kwargs={"flow_checkpoint": str(flows)})
        assert sorted(stylizer.image_decoder_styles) == ["2", "3", "4"]
        assert not any(p.requires_grad for p in stylizer.parameters())
        phase1 = torch.load(models / "phase1_model.pt", weights_only=True)
        assert all(torch.equal(stylizer.state_dict()[k], v) for k, v in phase1.items())
        assert method.iteration(stylizer=stylizer).stylizer_regime == regime
    with pytest.raises(ConfigValueError, match="needs a stylizer"):
        method.iteration()
    with pytest.raises(ConfigValueError, match="init_from_phase1"):
        method.check_init_from_phase1(True)
    assert method.check_init_from_phase1(False) is False and get_method("mixstyleflow").check_init_from_phase1(True)
