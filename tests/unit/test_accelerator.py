"""The GPU path: AMP, workers and cuDNN settings resolved per device, and the training pieces
that must keep float32 statistics under AMP. Tests taking ``device`` also run on CUDA when
present (scripts/gpu_check.sh)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from monai.bundle import ConfigParser

from msf_monai import accelerator
from msf_monai.engines import MixStyleFlowIteration
from msf_monai.flows import StyleFlowBank
from msf_monai.networks import DualDecoderNet
from msf_monai.styles import MixStyleFlow, channel_stats
from training_utils import tiny_loader

from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss


def test_settings_resolve_per_device(monkeypatch, caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert accelerator.amp_enabled("auto", cpu) is False and accelerator.amp_enabled("auto", cuda) is True
    assert accelerator.amp_enabled("false", cuda) is False and accelerator.amp_enabled(True, cuda) is True
    with caplog.at_level(logging.INFO, logger="msf_monai.accelerator"):
        assert accelerator.amp_enabled("true", cpu) is False
    assert "needs a CUDA device" in caplog.text
    with pytest.raises(ValueError, match="--amp"):
        accelerator.amp_enabled("maybe", cuda)
    assert accelerator.amp_kwargs(cpu) == {}
    for bf16, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        assert accelerator.amp_kwargs(cuda) == {"dtype": dtype}
    monkeypatch.setattr(accelerator.os, "cpu_count", lambda: 2)
    assert accelerator.worker_count("auto", cpu) == 0 and accelerator.worker_count("auto", cuda) == 2
    assert accelerator.worker_count(3, cpu) == 3 and accelerator.pin_memory(cuda) and not accelerator.pin_memory(cpu)
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        accelerator.configure_backends(cuda, "false")
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        accelerator.configure_backends(cuda, True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        torch.backends.cudnn.benchmark = False
        accelerator.configure_backends(cpu, False)  # nothing to do on CPU
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


@pytest.mark.parametrize("task", ["prostate", "fundus"])
@pytest.mark.parametrize("phase", ["phase1", "phase2", "phase3", "evaluate", "inference"])
def test_configs_use_the_resolved_settings(task, phase):
    parser = ConfigParser()
    parser.read_config(f"bundles/{task}/configs/{phase}.json")
    parser["device"] = "$torch.device('cpu')"
    assert parser.get_parsed_content("loader_workers") == 0 and parser.get_parsed_content("pin_memory") is False
    assert parser["num_workers"] == "auto"
    if phase != "phase2":  # Phase II records statistics in float32
        assert parser["amp"] == "auto" and parser.get_parsed_content("use_amp") is False
    # data loaders and datasets use the resolved count; only the settings check reads the raw value
    loaders = json.dumps({k: v for k, v in parser.config.items() if k != "checked_settings"})
    assert "@num_workers" not in loaders.replace('"$msf_monai.accelerator.worker_count(@num_workers, @device)"', "")
    assert "msf_monai.accelerator.configure_backends(@device" in json.dumps(parser["initialize"])


@pytest.mark.slow
def test_style_statistics_and_flow_samples_stay_float32_under_autocast(device):
    bank = StyleFlowBank({2: 4}).to(device)
    bank.fit({2: {"mean": torch.randn(40, 4), "var": torch.rand(40, 4) + 0.1}}, epochs=2, log_every=0)
    dtype = torch.bfloat16
    with torch.autocast(device.type, dtype=dtype):
        mean, std = bank.sample(2, 6)
        x = torch.randn(2, 4, 8, 8, device=device).to(dtype)
        mu, sigma = channel_stats(x)
    assert mean.dtype == std.dtype == mu.dtype == sigma.dtype == torch.float32
    assert mean.device.type == device.type


@pytest.mark.slow
def test_phase3_step_with_the_resolved_amp_settings(device):
    """One MixStyleFlow step as the configs run it on this device (AMP with the resolved dtype on
    CUDA, float32 on CPU): finite losses, the stylized pass taken, weights updated."""
    torch.manual_seed(0)
    bank = StyleFlowBank({2: 32, 3: 16, 4: 16})
    bank.fit({k: {"mean": torch.randn(40, c), "var": torch.rand(40, c) + 0.1} for k, c in bank.layer_channels.items()},
             epochs=1, log_every=0)
    bank.to(device)
    styles = {k: MixStyleFlow(bank.sampler(k), p=1.0) for k in bank.layers}
    net = DualDecoderNet(image_decoder_styles=styles).to(device)
    before = [p.detach().clone() for p in net.parameters()]
    trainer = SupervisedTrainer(
        device=device, max_epochs=1, train_data_loader=tiny_loader(n_batches=1), network=net,
        optimizer=torch.optim.AdamW(net.parameters(), 1e-3), loss_function=DiceCELoss(sigmoid=True),
        iteration_update=MixStyleFlowIteration(), amp=accelerator.amp_enabled("auto", device),
        amp_kwargs=accelerator.amp_kwargs(device),
    )
    trainer.run()
    out = trainer.state.output[0]
    assert all(torch.isfinite(torch.as_tensor(out[k])).all() for k in ("loss", "seg_loss_stylized", "rec_loss_stylized"))
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


@pytest.mark.slow
def test_training_steps_refuse_what_they_do_not_implement_and_run_compiled():
    from monai.data import MetaTensor
    from monai.inferers import SlidingWindowInferer

    from msf_monai.engines import DualDecoderIteration

    def trainer(**kw):
        net = DualDecoderNet()
        return SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=net,
                                 optimizer=torch.optim.AdamW(net.parameters(), 1e-3), loss_function=DiceCELoss(sigmoid=True),
                                 iteration_update=DualDecoderIteration(), **kw)

    loader = [{"image": MetaTensor(b["image"]), "label": MetaTensor(b["label"])} for b in tiny_loader(n_batches=1)]
    with pytest.raises(ValueError, match="accumulation_steps=2"):
        trainer(accumulation_steps=2).run()
    with pytest.raises(ValueError, match="SlidingWindowInferer"):
        trainer(inferer=SlidingWindowInferer(roi_size=(16, 16))).run()
    # MONAI compiles the network; the step hands it plain tensors (the "eager" backend checks the
    # plumbing without a C++ compiler)
    compiled = trainer(compile=True, compile_kwargs={"backend": "eager"})
    assert type(compiled.network).__name__ == "OptimizedModule"
    compiled.run()
    assert torch.isfinite(torch.as_tensor(compiled.state.output[0]["loss"]))
