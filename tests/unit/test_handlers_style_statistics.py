"""Phase II's handlers (msf_monai.handlers.style_statistics): style statistics and their regime, and the flow fitter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.engines import SupervisedEvaluator

from msf_monai.bundle import UnfinishedPhaseError
from msf_monai.files import file_digest
from msf_monai.flows import StyleFlowBank
from msf_monai.handlers import StyleStatisticsIteration, StyleStatisticsRecorder
from msf_monai.networks import DualDecoderNet
from msf_monai.resume import require_finished_run
from training_utils import bn_buffers, tiny_loader


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


@pytest.mark.slow
def test_phase2_statistics_equal_the_phase3_regime(tmp_path):
    torch.manual_seed(0)
    net = DualDecoderNet()
    net.train()
    for _ in range(2):  # running statistics that differ from any single batch's
        net(torch.rand(4, 1, 32, 32))
    buffers = bn_buffers(net)
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
    for key, value in bn_buffers(net).items():  # recording changed no running statistic
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


def test_phase2_fitter_resumes_finished_flows_without_refitting(tmp_path, monkeypatch):
    from msf_monai import flows
    from msf_monai.handlers import StyleFlowFitter, StyleStatisticsRecorder

    rng = np.random.default_rng(0)
    recorder = StyleStatisticsRecorder(layers=[2])
    recorder.stats = {2: {"mean": rng.normal(0, 1, (40, 4)).astype(np.float32), "var": rng.uniform(0.5, 2, (40, 4)).astype(np.float32)}}

    def fitter():
        torch.manual_seed(0)
        return StyleFlowFitter(recorder, StyleFlowBank({2: 4}, num_blocks=2), tmp_path / "flows.pt", epochs=4,
                               lr=1e-3, resume_path=tmp_path / "resume.pt", checkpoint_every=2, settings={"a": 1})

    first = fitter()
    first(None)
    calls = []
    original = flows.fit_flows_jointly
    monkeypatch.setattr(flows, "fit_flows_jointly", lambda *a, **k: calls.append(k.get("resume_state")) or original(*a, **k))
    second = fitter()
    second(None)
    assert len(calls) == 1 and calls[0] is not None and calls[0]["finished"]  # restored, not refitted
    assert second.history == first.history
    for a, b in zip(first.bank.state_dict().values(), second.bank.state_dict().values()):
        assert torch.equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flows.pt", "resume.pt"]


def test_a_flow_fit_marks_its_state_unfinished_from_the_start(tmp_path):
    """Phase II likewise: Phase III must not take the previous fit's flows for finished ones
    while a --resume false fit that replaces them is under way or was killed."""
    import numpy as np

    from msf_monai.flows import StyleFlowBank
    from msf_monai.handlers import StyleFlowFitter, StyleStatisticsRecorder

    rng = np.random.default_rng(0)
    recorder = StyleStatisticsRecorder(layers=[2])
    recorder.stats = {2: {"mean": rng.normal(0, 1, (40, 4)).astype(np.float32), "var": rng.uniform(0.5, 2, (40, 4)).astype(np.float32)}}
    flows, state = tmp_path / "style_flows.pt", tmp_path / "style_flows_resume.pt"

    def fitter(resume=True):
        return StyleFlowFitter(recorder, StyleFlowBank({2: 4}, num_blocks=2), flows, epochs=2, lr=1e-3,
                               resume_path=state, resume=resume, checkpoint_every=1)

    fitter()(None)
    assert torch.load(state, weights_only=True)["output_sha1"] == file_digest(flows)
    assert require_finished_run(flows, what="Phase II") == str(flows)

    class Killed(Exception):
        pass

    again = fitter(resume=False)

    def killed(*args, **kwargs):
        raise Killed

    again.bank.fit = killed
    with pytest.raises(Killed):
        again(None)
    assert torch.load(state, weights_only=True)["finished"] is False
    with pytest.raises(UnfinishedPhaseError, match="Phase II run that did not finish"):
        require_finished_run(flows, what="Phase II", command="python -m monai.bundle run --config_file phase2.json")
