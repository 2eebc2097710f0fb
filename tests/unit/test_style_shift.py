"""The style-shift score (msf_monai.style_shift), checked against a computation without the scorer.

The score is the flows' negative log-likelihood of a case's feature statistics; also checked: its
calibration on the source validation cases (Phase II), its readable scale, and the writer's
behaviour without Phase II files."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from bundle_utils import copy_bundle, task_transform
from msf_monai.flows import StyleFlowBank
from msf_monai.networks import DualDecoderNet
from msf_monai.style_shift import StyleShiftScorer, StyleShiftWriter, calibrate_style_shift, image_slices
from msf_monai.tasks.prostate import generate_demo_prostate, image_files


SIZE = 32


def _direct_slice_scores(net, bank, images: torch.Tensor) -> torch.Tensor:
    """The style-shift score computed without the scorer or ``bank.log_prob``: the image decoder's
    feature maps from forward hooks, the spread as ``torch.std`` (``statistic="std"``) or
    ``torch.var`` (``"variance"``), and each layer's mean flow and spread flow on their own."""
    feats = {}
    hooks = [net.image_decoder[k - 1].register_forward_hook(lambda m, i, o, k=k: feats.__setitem__(k, o)) for k in bank.layers]
    net.eval()
    try:
        with torch.no_grad():
            net(images.float())
    finally:
        for h in hooks:
            h.remove()
    total = torch.zeros(images.shape[0])
    with torch.no_grad():
        for k, c in bank.layer_channels.items():
            f = feats[k]
            spread = f.std(dim=(2, 3), unbiased=False) if bank.statistic == "std" else f.var(dim=(2, 3), unbiased=False)
            lp = bank.mean_flows[str(k)].log_prob(f.mean(dim=(2, 3))) + bank.spread_flows[str(k)].log_prob(spread)
            total += -lp / (2 * c)
    return total / len(bank.layers)


def _varied_images(n, seed=0):
    """Images of different contrast and brightness: styles that differ from image to image."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, SIZE, SIZE, generator=g) * torch.linspace(0.2, 3.0, n).view(n, 1, 1, 1) + torch.linspace(-1, 1, n).view(n, 1, 1, 1)


def _trained_like_net(seed=0):
    """A Phase I network whose batch-norm running statistics are those of real data (as after
    training): with the initial ones (0, 1) its decoder features hardly depend on the input."""
    torch.manual_seed(seed)
    net = DualDecoderNet()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one pass sets the statistics of the batch
    with torch.no_grad():
        net.train()(_varied_images(16, seed=seed + 100))
    return net.eval()


def _bank_on_features(net, x, statistic, epochs=1):
    with torch.no_grad():
        _, feats = net.reconstruct(net.encode(x), return_features=True)
    stats = {k: {"mean": feats[k].mean(dim=(2, 3)), "var": feats[k].var(dim=(2, 3), unbiased=False)} for k in (2, 3, 4)}
    bank = StyleFlowBank({2: 32, 3: 16, 4: 16}, statistic=statistic)
    bank.fit(stats, epochs=epochs, batch_size=6, val_fraction=0.0, log_every=0)
    return bank


@pytest.mark.slow
@pytest.mark.parametrize("statistic", ["std", "variance"])
def test_scores_are_the_flows_negative_log_likelihood_per_statistic(statistic):
    net = _trained_like_net()
    x = _varied_images(6)
    bank = _bank_on_features(net, x, statistic)
    scorer = StyleShiftScorer(net, bank, batch_size=4)
    expected = _direct_slice_scores(net, bank, x)
    assert float(expected.max() - expected.min()) > 0.1  # the images do score differently
    torch.testing.assert_close(scorer.slice_scores(x), expected, rtol=1e-4, atol=1e-4)
    # the other statistic fed to the same spread flows gives other scores: the check can tell
    other = f"{'variance' if statistic == 'std' else 'std'}"
    bank.statistic = other
    assert not torch.allclose(_direct_slice_scores(net, bank, x), expected, rtol=1e-3, atol=1e-3)
    bank.statistic = statistic
    # a volume [C, H, W, D] is scored slice by slice: the case score is the median
    volume = x.permute(1, 2, 3, 0)
    score, n = scorer.case_score(volume)
    assert n == 6 and score == pytest.approx(float(expected.median()), rel=1e-4, abs=1e-4)
    # images of another size are resized to the calibrated size first
    scorer32 = StyleShiftScorer(net, bank, image_size=SIZE)
    big = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.isfinite(scorer32.slice_scores(big)).all()


@pytest.mark.slow
def test_calibration_threshold_is_the_configured_quantile_of_the_case_scores(tmp_path):
    net = _trained_like_net()
    torch.save(net.state_dict(), tmp_path / "phase1_model.pt")
    bank = _bank_on_features(net, _varied_images(12, seed=1), "std", epochs=2)
    bank.save(tmp_path / "style_flows.pt")
    # five "volumes" [1, H, W, 3] of increasingly unusual intensity: five different case scores
    g = torch.Generator().manual_seed(1)
    volumes = [torch.rand(1, SIZE, SIZE, 3, generator=g) * (1 + i) + 0.3 * i for i in range(5)]
    val_list = [{"image": v, "case": f"c{i}", "site": "A"} for i, v in enumerate(volumes)]
    expected = np.array([float(_direct_slice_scores(net, bank, v.permute(3, 0, 1, 2)).median()) for v in volumes])
    assert len(set(np.round(expected, 4))) == 5
    for quantile in (0.3, 0.95):
        out = tmp_path / f"style_shift_{quantile}.json"
        result = calibrate_style_shift(net, tmp_path / "style_flows.pt", tmp_path / "phase1_model.pt", val_list,
                                       lambda d: d, out, quantile=quantile)
        np.testing.assert_allclose([c["score"] for c in result["cases"]], expected, rtol=1e-4, atol=1e-4)
        assert [c["case"] for c in result["cases"]] == [f"c{i}" for i in range(5)]
        # numpy's (linear) quantile of the case scores, computed here from the direct scores
        assert result["threshold"] == pytest.approx(float(np.quantile(expected, quantile)), rel=1e-4, abs=1e-4)
        assert json.loads(out.read_text())["threshold"] == result["threshold"] and result["quantile"] == quantile
    # between the 2nd and 3rd smallest of five scores for q = 0.3 (position 1.2): not a case's own score
    low = np.sort(expected)
    assert low[1] < float(np.quantile(expected, 0.3)) < low[2]


@pytest.mark.slow
def test_phase2_calibrates_on_the_source_sites_validation_cases(tmp_path):
    """phase2.json's calibration step scores exactly the source site's validation patients (none
    trained on, no other site) and saves the configured quantile of their scores."""
    from monai.bundle import ConfigParser

    data = tmp_path / "data"
    generate_demo_prostate(data, cases_per_site={"SiteA": 6, "SiteB": 2}, sites=["SiteA", "SiteB"], shape=(40, 40, 4))
    bundle = copy_bundle("prostate", tmp_path)
    phase1 = _trained_like_net()
    (bundle / "models").mkdir()
    torch.save(phase1.state_dict(), bundle / "models" / "phase1_model.pt")
    bank = _bank_on_features(phase1, _varied_images(12, seed=1), "std")
    bank.save(bundle / "models" / "style_flows.pt")

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "phase2.json"))
    parser.update({"bundle_root": str(bundle), "dataset_dir": str(data), "source_site": "SiteA", "image_size": SIZE,
                   "val_fraction": 0.5, "style_shift_quantile": 0.4, "device": "$torch.device('cpu')"})
    # Phase II's evaluator loads the Phase I weights before this step; here they are loaded directly
    parser.get_parsed_content("network").load_state_dict(phase1.state_dict())
    run = parser.get("run")
    step = next(i for i, expr in enumerate(run) if "calibrate_style_shift" in str(expr))
    parser.get_parsed_content(f"run#{step}")
    result = json.loads((bundle / "models" / "style_shift.json").read_text())

    source = [d for d in image_files(data / "SiteA")]
    trained = {d["case"] for d in parser.get_parsed_content("train_list")}
    cases = [c["case"] for c in result["cases"]]
    assert len(cases) == 3 and {c["site"] for c in result["cases"]} == {"SiteA"}
    assert set(cases) <= {d["case"] for d in source} and not set(cases) & trained
    assert len(trained) == 3
    by_case = {d["case"]: d for d in source}
    expected = []
    for case in cases:
        image = task_transform("prostate", image_size=SIZE)({"image": by_case[case]["image"]})["image"]
        expected.append(float(_direct_slice_scores(phase1, bank, image_slices(image)).median()))
    np.testing.assert_allclose([c["score"] for c in result["cases"]], expected, rtol=1e-4, atol=1e-4)
    assert result["threshold"] == pytest.approx(float(np.quantile(expected, 0.4)), rel=1e-4, abs=1e-4)
    assert result["quantile"] == 0.4 and result["source_site"] == "SiteA"


def test_writer_without_phase2_files_warns_and_writes_no_scores(tmp_path, caplog):
    writer = StyleShiftWriter(tmp_path / "phase1_model.pt", tmp_path / "style_flows.pt", tmp_path / "style_shift.json",
                              tmp_path / "out.csv", how_to_create="python -m monai.bundle run --config_file x/phase2.json")

    class _State:
        device = "cpu"

    class _Engine:
        state = _State()

    with caplog.at_level(logging.WARNING, logger="msf_monai.style_shift"):
        writer._start(_Engine())
    assert "style_flows.pt" in caplog.text and "phase2.json" in caplog.text and "--style_shift false" in caplog.text
    writer._write(_Engine())
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("value,enabled", [("false", False), ("False", False), ("0", False), ("true", True), (True, True)])
def test_style_shift_switch_reads_the_command_lines_strings(tmp_path, value, enabled):
    """``--style_shift false`` reaches the writer as the string "false", which ``bool`` calls true."""
    writer = StyleShiftWriter(tmp_path / "p.pt", tmp_path / "f.pt", tmp_path / "c.json", tmp_path / "out.csv", enabled=value)
    assert writer.enabled is enabled


def test_the_flag_agrees_with_the_written_score_and_threshold(tmp_path):
    """A source validation case scores its own calibration threshold up to float noise: the CSV
    shows equal values, so it must not flag the case (the flag compares what is written)."""
    threshold = 1234.56789
    writer = StyleShiftWriter(tmp_path / "p.pt", tmp_path / "f.pt", tmp_path / "c.json", tmp_path / "out.csv")
    writer.calibration = {"threshold": threshold, "n_cases": 1, "cases": [{"score": threshold}]}

    class _Scorer:
        def __init__(self):
            self.scores = iter([threshold * (1 + 1e-12), threshold * 1.01])

        def case_score(self, image):
            return next(self.scores), 4

    class _State:
        batch = [{"image": torch.zeros(1, 8, 8, 4), "case": "at", "site": "A"},
                 {"image": torch.zeros(1, 8, 8, 4), "case": "above", "site": "B"}]

    class _Engine:
        state = _State()

    writer.scorer = _Scorer()
    writer._score(_Engine())
    flags = {r["case"]: r["flag"] for r in writer.rows}
    assert flags == {"at": 0, "above": 1}
    assert all(r["flag"] == int(r["score"] > r["threshold"]) for r in writer.rows)


def test_the_level_agrees_with_the_flag_on_a_tight_calibration(tmp_path):
    """Scores that differ only past the written digits (a tiny demo run: three source cases at
    168.010-168.013): a case above the calibration threshold by less than the rounding is not
    flagged, and its level must not pass log10(2) (the flag's crossing) either."""
    cases = [168.01046752929688, 168.0133514404297, 168.0100555419922]
    writer = StyleShiftWriter(tmp_path / "p.pt", tmp_path / "f.pt", tmp_path / "c.json", tmp_path / "out.csv")
    writer.calibration = {"threshold": 168.0130630493164, "n_cases": 3, "cases": [{"score": c} for c in cases]}

    class _Scorer:
        def __init__(self):
            self.scores = iter([cases[1], 168.02, 168.0])

        def case_score(self, image):
            return next(self.scores), 4

    class _State:
        batch = [{"image": torch.zeros(1, 8, 8, 4), "case": c, "site": "A"} for c in ("Case10", "above", "below")]

    class _Engine:
        state = _State()

    writer.scorer = _Scorer()
    writer._score(_Engine())
    rows = {r["case"]: r for r in writer.rows}
    assert {c: r["flag"] for c, r in rows.items()} == {"Case10": 0, "above": 1, "below": 0}
    for r in writer.rows:
        assert r["flag"] == int(r["shift_level"] > np.log10(2.0)), r


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
