"""scripts/benchmark_speed.py runs end to end with tiny settings and reports every figure
(the speed targets themselves are checked by reading its output, not by a timed test)."""

import json

import pytest
from bundle_utils import load_script


def _load_script():
    return load_script("benchmark_speed")


@pytest.mark.slow
def test_benchmark_speed_smoke(tmp_path, capsys):
    module = _load_script()
    out = tmp_path / "speed.json"
    module.main(sizes=(32,), batch_size=4, warmup=1, repeats=2, phase2_slices=8, flow_epochs=1, methods=("mixstyle", "randconv"),
                channels_last=True, output=str(out))
    report = json.loads(out.read_text())
    res = report["results"]["32x32"]
    for key in ("phase1", "phase3_mixstyleflow", "flow_sample_mix", "step_mixstyle", "step_randconv", "inference", "phase2",
                "phase1_channels_last", "phase3_mixstyleflow_channels_last"):
        assert key in res
    assert len(res["phase1"]["times_s"]) == 2
    assert len(res["flow_sample_mix"]["times_s"]) == 2
    # the time inside the style layers is part of the Phase III step
    assert 0 < res["flow_sample_mix"]["median_s"] < res["phase3_mixstyleflow"]["median_s"]
    assert res["inference"]["slices_per_s"] > 0
    assert res["phase2"]["extract_s_per_1000_slices"] > 0
    printed = capsys.readouterr().out
    assert "| 32x32 | phase3_mixstyleflow |" in printed and "of a Phase III step" in printed
    assert "phase1 with channels_last:" in printed


def test_channels_last_step_matches_the_default_format():
    """The channels_last arm times the same computation: one Phase I step from the same weights
    on the same batch gives the same loss and gradients, and runs in NHWC. In float64: this
    tiny network (batch 2, 2 x 2 pixels at its deepest level) is so ill-conditioned in float32
    that rounding alone moves single gradients by several per cent between kernels (and
    between thread counts), while in float64 the two formats agree to 1e-13."""
    import torch
    from msf_monai.engines import DualDecoderIteration
    from msf_monai.networks import DualDecoderNet

    module = _load_script()
    batch = {k: v.double() for k, v in module._batches(1, 2, 32, 1)[0].items()}
    nets, losses = [], []
    for channels_last in (False, True):
        torch.manual_seed(0)
        net = DualDecoderNet(1, 1).double()
        step = module._trainer(net, DualDecoderIteration(), torch.device("cpu"), channels_last=channels_last)
        losses.append(float(step(batch)["loss"]))
        nets.append(net)
    conv = next(m for m in nets[1].modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert losses[0] == pytest.approx(losses[1], rel=1e-10)
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, msg=name)
