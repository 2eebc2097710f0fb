"""The style flows (msf_monai.flow_model, flow_fit and flows): RealNVP flows, fitting, temperature sampling and its guards, the flow bank."""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import pytest
import torch
from nflows.transforms import ActNorm

from msf_monai.bundle import PhaseError
from msf_monai.flow_fit import FlowFitError, fit_flow, sample_flow
from msf_monai.flow_model import ClampedAffineCoupling, CouplingMLP, build_style_flow
from msf_monai.flows import StyleFlowBank
from training_utils import fitted_bank


LAYERS = {2: 32, 3: 16, 4: 16}


def _perturb(flow, scale=0.3, seed=0):
    """Randomise every parameter so the flow is far from the identity; mark ActNorms initialised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    for m in flow.modules():
        if isinstance(m, ActNorm):
            m.initialized.fill_(True)
    return flow.eval()


def _nonlinear_data(n, seed):
    """Correlated, non-Gaussian 16-D data: banana (quadratic) and log-normal components."""
    a = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)) * 0.4 + torch.eye(16)
    z = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed)) @ a.T
    x = z.clone()
    x[:, 1::4] = z[:, 1::4] + 0.6 * (z[:, 0::4] ** 2 - 1)
    x[:, 2::4] = torch.exp(0.5 * z[:, 2::4])
    return x


@pytest.fixture(scope="module")
def fitted_flow():
    torch.manual_seed(0)
    train, test = _nonlinear_data(2000, seed=10), _nonlinear_data(1000, seed=11)
    flow = build_style_flow(16)
    history = fit_flow(flow, train, epochs=15, lr=3e-3, batch_size=100, val_data=test, seed=0, log_every=0)
    return flow, train, test, history


def _fake_stats(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    stats = {}
    for layer, c in LAYERS.items():
        latent = torch.randn(n, 4, generator=g)
        mix = torch.randn(4, c, generator=g)
        mean = latent @ mix + 0.1 * torch.randn(n, c, generator=g)
        var = torch.exp(0.5 * (latent @ mix) / 2 + 0.1 * torch.randn(n, c, generator=g))
        stats[layer] = {"mean": mean, "var": var.numpy() if layer == 3 else var}  # ndarray accepted too
    return stats


@pytest.fixture(scope="module")
def banks():
    out = {}
    for statistic in ("std", "variance"):
        torch.manual_seed(0)
        bank = StyleFlowBank(LAYERS, statistic=statistic)
        hist = bank.fit(_fake_stats(), epochs=3, lr=1e-3, batch_size=20, val_fraction=0.2, seed=0, log_every=0)
        out[statistic] = (bank, hist)
    return out


# ----------------------------------------------------------------------------- transforms


def test_fresh_flow_is_identity_and_perturbed_flow_inverts():
    fresh = build_style_flow(7).eval()
    x = torch.randn(32, 7)
    z, logdet = fresh._transform(x)
    assert torch.allclose(z, x) and torch.allclose(logdet, torch.zeros(32))

    flow = _perturb(build_style_flow(7, base="diagonal"))  # odd feature count
    x = torch.randn(64, 7)
    with torch.no_grad():
        z, logdet = flow._transform(x)
    assert (z - x).abs().max() > 0.1, "perturbed flow should not be the identity"
    with torch.no_grad():
        x_rec, inv_logdet = flow._transform.inverse(z)
    assert torch.allclose(x_rec, x, atol=1e-4)
    assert torch.allclose(logdet, -inv_logdet, atol=1e-4)

    # log|det J| of the forward map matches autograd for a few rows
    fn = lambda row: flow._transform(row.unsqueeze(0))[0].squeeze(0)  # noqa: E731
    for i in range(3):
        jac = torch.autograd.functional.jacobian(fn, x[i])
        assert math.isclose(float(torch.linalg.slogdet(jac)[1]), float(logdet[i]), abs_tol=1e-3)


def test_clamped_coupling_scale_is_exp_and_bounded():
    coupling = ClampedAffineCoupling(torch.tensor([1, 0, 1, 0]), lambda i, o: CouplingMLP(i, o, (8,)), scale_clamp=2.0)
    params = torch.tensor([[0.5, -0.5, 1.0, 100.0]])  # shifts of 2 transformed features, then raw log-scales
    x = torch.ones(1, 2)
    y, logdet = coupling._coupling_transform_forward(x, params)
    s = torch.tensor([2.0 * math.tanh(0.5), 2.0 * math.tanh(50.0)])  # soft clamp
    assert torch.allclose(y, x * torch.exp(s) + torch.tensor([0.5, -0.5]))  # expands (nflows' own cannot)
    assert float(logdet) == pytest.approx(float(s.sum()), abs=1e-5)
    assert float(logdet) <= 2.0 * 2 + 1e-5
    x_back, inv_logdet = coupling._coupling_transform_inverse(y, params)
    assert torch.allclose(x_back, x, atol=1e-5) and float(inv_logdet) == pytest.approx(-float(logdet))
    with pytest.raises(ValueError):
        ClampedAffineCoupling([1, 0], lambda i, o: CouplingMLP(i, o), scale_clamp=0.0)


@pytest.mark.parametrize("features", [2, 3, 32])
def test_build_style_flow_shapes(features):
    flow = build_style_flow(features, num_blocks=2)
    assert flow.log_prob(torch.randn(5, features)).shape == (5,)
    with pytest.raises(ValueError):
        build_style_flow(1)


# ----------------------------------------------------------------------------- fitting


@pytest.mark.slow
def test_flow_beats_diagonal_gaussian(fitted_flow):
    flow, train, test, history = fitted_flow
    mu, var = train.mean(0), train.var(0)
    diag_nll = float((0.5 * (test - mu) ** 2 / var + 0.5 * torch.log(2 * math.pi * var)).sum(1).mean())
    flow_nll = float(-flow.log_prob(test).mean().detach())
    assert history[-1]["val_nll"] == pytest.approx(flow_nll, rel=1e-4)
    assert flow_nll < diag_nll - 2.0, (flow_nll, diag_nll)
    assert history[-1]["train_nll"] < history[0]["train_nll"]
    assert [h["epoch"] for h in history] == list(range(1, 16))
    assert not flow.training


def test_fit_flow_validates_data():
    flow = build_style_flow(4)
    bad = torch.randn(50, 4)
    bad[3, 1] = float("nan")
    bad[7, 2] = float("inf")
    with pytest.raises(ValueError, match="2 non-finite"):
        fit_flow(flow, bad, epochs=1)
    with pytest.raises(ValueError, match="2-D"):
        fit_flow(flow, torch.randn(50), epochs=1)
    with pytest.raises(ValueError, match="at least 2"):
        fit_flow(flow, torch.randn(1, 4), epochs=1)
    with pytest.raises(ValueError, match="features"):
        fit_flow(flow, torch.randn(10, 5), epochs=1)


def test_fit_flow_divergence_raises():
    flow = build_style_flow(4)
    with pytest.raises(FlowFitError, match="epoch"):
        fit_flow(flow, torch.randn(200, 4), epochs=20, lr=1e6, batch_size=20, seed=0, log_every=0)
    assert issubclass(FlowFitError, FloatingPointError) and issubclass(FlowFitError, RuntimeError)


def test_fit_flow_handles_constant_column_and_logs(caplog):
    data = torch.randn(100, 3)
    data[:, 1] = 2.0  # dead channel: naive ActNorm init would produce inf/NaN
    flow = build_style_flow(3, num_blocks=2)
    with caplog.at_level(logging.INFO, logger="msf_monai.flows"):
        hist = fit_flow(flow, data.numpy().astype(np.float64), epochs=2, lr=1e-3, seed=0, log_every=1)
    assert all(math.isfinite(h["train_nll"]) for h in hist)
    assert any("epoch 2/2" in r.getMessage() for r in caplog.records)
    samples, _ = sample_flow(flow, 50, temperature=1.0)
    assert torch.isfinite(samples).all()


# ----------------------------------------------------------------------------- sampling


def test_temperature_widens_samples_and_is_reproducible(fitted_flow):
    flow = fitted_flow[0]
    cold, _ = sample_flow(flow, 2000, 1.0, generator=torch.Generator().manual_seed(0))
    hot, _ = sample_flow(flow, 2000, 2.5, generator=torch.Generator().manual_seed(0))
    assert float(hot.std(0).mean()) > 1.3 * float(cold.std(0).mean())
    assert (hot.std(0) > cold.std(0)).float().mean() > 0.8
    again, _ = sample_flow(flow, 2000, 1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cold, again)
    torch.manual_seed(5)
    a, _ = sample_flow(flow, 10, 1.0)
    torch.manual_seed(5)
    b, _ = sample_flow(flow, 10, 1.0)
    assert torch.equal(a, b)
    flow.train()
    sample_flow(flow, 3)
    assert flow.training, "sample_flow must restore the training mode"
    flow.eval()


def test_sampling_guard_at_high_temperature(fitted_flow):
    samples, _ = sample_flow(fitted_flow[0], 500, temperature=3.5, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (500, 16) and torch.isfinite(samples).all()

    bad_flow = _perturb(build_style_flow(8), scale=1.0, seed=3)
    raw, _ = sample_flow(bad_flow, 400, 3.5, max_abs=float("inf"), generator=torch.Generator().manual_seed(2))
    row_max = torch.nan_to_num(raw.abs(), nan=float("inf")).amax(1)
    limit = float(row_max.quantile(0.8))  # ~20% of the rows of a fresh draw exceed it
    out, n_replaced = sample_flow(bad_flow, 400, 3.5, max_abs=limit, generator=torch.Generator().manual_seed(2))
    assert out.shape == (400, 8)
    assert torch.isfinite(out).all() and float(out.abs().max()) <= limit
    assert 40 <= n_replaced <= 160
    with pytest.raises(RuntimeError, match="still"):
        sample_flow(bad_flow, 20, 3.5, max_abs=1e-6, max_tries=2)


def test_diagonal_base_temperature_scales_around_its_mean():
    flow = build_style_flow(3, base="diagonal").eval()  # fresh: the transform is the identity
    with torch.no_grad():
        flow._distribution.mean_.fill_(3.0)
        flow._distribution.log_std_.fill_(math.log(2.0))
    x, n_replaced = sample_flow(flow, 20000, temperature=1.5, generator=torch.Generator().manual_seed(0))
    assert n_replaced == 0
    assert torch.allclose(x.mean(0), torch.full((3,), 3.0), atol=0.1)
    assert torch.allclose(x.std(0), torch.full((3,), 3.0), atol=0.1)  # 1.5 * 2


# ----------------------------------------------------------------------------- bank


def test_bank_config_and_validation():
    bank = StyleFlowBank(LAYERS)
    assert bank.layers == [2, 3, 4]
    assert bank.temperatures == {2: 3.5, 3: 2.5, 4: 1.5}
    assert bank.config["statistic"] == "std" and bank.config["layer_channels"] == LAYERS
    assert not bank.is_fitted
    with pytest.raises(ValueError, match="temperatures"):
        StyleFlowBank(LAYERS, temperatures={2: 1.0, 3: 1.0})
    with pytest.raises(ValueError, match="statistic"):
        StyleFlowBank(LAYERS, statistic="stdev")

    stats = _fake_stats(n=20)
    stats[3]["var"] = stats[3]["var"].copy()
    stats[3]["var"][0, :3] = np.nan
    with pytest.raises(ValueError, match=r"layer 3 statistic 'var'.*3 non-finite"):
        bank.fit(stats, epochs=1)
    with pytest.raises(ValueError, match=r"missing layer\(s\) \[4\]"):
        bank.fit({k: v for k, v in _fake_stats(n=20).items() if k != 4}, epochs=1)
    stats = _fake_stats(n=20)
    stats[2]["mean"] = stats[2]["mean"][:, :30]
    with pytest.raises(ValueError, match="layer 2 statistic 'mean' has 30 channels"):
        bank.fit(stats, epochs=1)


@pytest.mark.slow
@pytest.mark.parametrize("statistic", ["std", "variance"])
def test_bank_fit_sample_save_load(banks, statistic, tmp_path):
    bank, hist = banks[statistic]
    assert set(hist) == {f"{k}_{layer}" for k in ("mean", "spread") for layer in LAYERS}
    assert len(hist["spread_2"]) == 3 and "val_nll" in hist["mean_4"][-1]
    assert bank.is_fitted

    for layer, c in LAYERS.items():
        mean, std = bank.sample(layer, 17, generator=torch.Generator().manual_seed(0))
        assert mean.shape == (17, c) and std.shape == (17, c)
        assert torch.isfinite(mean).all() and (std > 0).all()
    assert set(bank.last_replaced) >= {"mean", "spread"}
    draw = bank.sampler(2)
    assert not isinstance(draw, torch.nn.Module)
    assert draw(5)[0].shape == (5, 32)

    path = tmp_path / "flows.pt"
    bank.save(path, epochs=3, dataset="fake", scores=[0.5, 1.5], nested={"a": 1, 2: "b"})
    assert os.listdir(tmp_path) == ["flows.pt"], "no temporary files left behind"
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "msf_monai.StyleFlowBank" and raw["version"] == 2
    assert set(raw["observed"]) == {str(k) for k in bank.layers}  # the relative guard's range
    assert raw["config"]["statistic"] == statistic

    loaded = StyleFlowBank.load(path)
    assert loaded.metadata == {"epochs": 3, "dataset": "fake", "scores": [0.5, 1.5], "nested": {"a": 1, 2: "b"}}
    assert loaded.config == bank.config and loaded.is_fitted
    for layer in LAYERS:
        a = bank.sample(layer, 9, generator=torch.Generator().manual_seed(7))
        b = loaded.sample(layer, 9, generator=torch.Generator().manual_seed(7))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bank_log_prob_scores_shifted_styles_lower(banks):
    bank, _ = banks["std"]
    stats = _fake_stats(n=40, seed=1)
    mean, var = stats[2]["mean"], stats[2]["var"]
    lp = bank.log_prob(2, mean, var)
    assert lp.shape == (40,) and torch.isfinite(lp).all()
    shifted = bank.log_prob(2, mean + 10.0, var * 25.0)
    assert float(shifted.mean()) < float(lp.mean()) - 10.0


def test_bank_load_errors(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        StyleFlowBank.load(missing)
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {}}, wrong)
    with pytest.raises(ValueError, match="wrong.pt"):
        StyleFlowBank.load(wrong)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        StyleFlowBank.load(garbage)
    with pytest.raises(TypeError, match="metadata"):
        StyleFlowBank({2: 4}).save(tmp_path / "x.pt", bad=object())


@pytest.mark.slow
def test_fit_flow_keeps_the_best_validation_epoch():
    torch.manual_seed(0)
    data = torch.randn(60, 4) * torch.tensor([1.0, 2.0, 0.5, 1.0])
    val = torch.randn(30, 4) * torch.tensor([1.0, 2.0, 0.5, 1.0])
    flow = build_style_flow(4)
    # a high learning rate on few samples overfits: the last epoch is not the best one
    history = fit_flow(flow, data, epochs=40, lr=3e-2, batch_size=10, val_data=val, seed=0)
    best = min(r["val_nll"] for r in history)
    with torch.no_grad():
        final = float(-flow.log_prob(val).mean())
    assert final == pytest.approx(best, rel=1e-5)


@pytest.mark.slow
def test_style_pool_hands_out_the_banks_samples_in_order():
    torch.manual_seed(0)
    channels = {2: 8}
    bank = StyleFlowBank(channels, temperatures={2: 1.0})
    g = torch.Generator().manual_seed(0)
    bank.fit({2: {"mean": torch.randn(100, 8, generator=g), "var": torch.rand(100, 8, generator=g) + 0.1}}, epochs=2, log_every=0)
    torch.manual_seed(5)
    direct_mean, direct_std = bank.sample(2, 10)
    torch.manual_seed(5)
    pool = bank.sampler(2, pool_size=10)
    parts = [pool(3), pool(3), pool(3)]
    torch.testing.assert_close(torch.cat([m for m, _ in parts]), direct_mean[:9])
    torch.testing.assert_close(torch.cat([s for _, s in parts]), direct_std[:9])
    mean, std = pool(4)  # more than is left: a fresh pool
    assert mean.shape == std.shape == (4, 8)
    assert not isinstance(pool, torch.nn.Module)


def test_constant_channels_are_summarised_in_one_line(caplog):
    """A channel that never varies (a dead ReLU) is reported once per fit, not as one warning per
    ActNorm layer and flow."""
    import logging

    rng = np.random.default_rng(0)
    mean = rng.normal(size=(40, 4))
    mean[:, 1] = 0.5  # constant mean channel
    var = rng.uniform(0.5, 2.0, size=(40, 4))
    bank = StyleFlowBank({2: 4, 3: 4})
    with caplog.at_level(logging.DEBUG, logger="msf_monai.flows"):
        bank.fit({2: {"mean": mean, "var": var}, 3: {"mean": rng.normal(size=(40, 4)), "var": var}}, epochs=1, lr=1e-3)
    summary = [r for r in caplog.records if "constant style channels" in r.getMessage()]
    assert len(summary) == 1 and summary[0].levelno == logging.INFO
    assert "layer 2 mean 1/4" in summary[0].getMessage() and "layer 3" not in summary[0].getMessage()
    assert not [r for r in caplog.records if "ActNorm init" in r.getMessage() and r.levelno >= logging.WARNING]


# ----------------------------------------------------------------------------- temperature and spread statistic


def _shifted_identity_bank(statistic, temperatures, offset=16.0):
    """A bank whose flows are the identity plus ``offset``: a sample is ``offset + T * eps``
    exactly, so what ``sample`` returns can be computed here from the same normal draws."""
    bank = StyleFlowBank({k: 4 for k in temperatures}, temperatures=temperatures, statistic=statistic, num_blocks=1)
    for flows in (bank.mean_flows, bank.spread_flows):
        for flow in flows.values():
            for m in flow.modules():
                if isinstance(m, ActNorm):
                    m.initialized.fill_(True)
            with torch.no_grad():  # the first (input) ActNorm, applied last when sampling: x = h - shift
                flow._transform._transforms[0].shift.fill_(-offset)
    bank.guard_range = None
    return bank.eval()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.5])
def test_identity_flow_samples_have_the_temperature_as_std(temperature):
    flow = build_style_flow(6).eval()  # fresh: every coupling and ActNorm is the identity
    x, n_replaced = sample_flow(flow, 20000, temperature, generator=torch.Generator().manual_seed(0))
    assert n_replaced == 0
    # the std of a 20000-sample std is T / 200: 3 % is 6 of them
    torch.testing.assert_close(x.std(0), torch.full((6,), temperature), rtol=0.03, atol=0)
    assert float(x.mean(0).abs().max()) < 0.05 * temperature


@pytest.mark.parametrize("statistic", ["std", "variance"])
def test_bank_samples_at_each_layers_temperature_and_returns_a_std(statistic):
    """``sample`` scales the base noise by the layer's own temperature and returns a standard
    deviation: the square root of a sampled variance, a sampled std as it is."""
    temps = {2: 0.5, 3: 2.0}
    bank = _shifted_identity_bank(statistic, temps)
    for layer, t in temps.items():
        mean, std = bank.sample(layer, 500, generator=torch.Generator().manual_seed(layer))
        g = torch.Generator().manual_seed(layer)  # the same draws, in the same order: mean flow, then spread flow
        eps_mean, eps_spread = torch.randn(500, 4, generator=g), torch.randn(500, 4, generator=g)
        spread = 16.0 + t * eps_spread
        assert bool((spread > 1.0).all())  # no clamping at the floor
        torch.testing.assert_close(mean, 16.0 + t * eps_mean)
        torch.testing.assert_close(std, spread.sqrt() if statistic == "variance" else spread)
        assert float((mean - 16.0).std()) == pytest.approx(t, rel=0.1)
    # an explicit temperature replaces the layer's
    mean, _ = bank.sample(2, 500, temperature=3.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mean, 16.0 + 3.0 * torch.randn(500, 4, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("statistic", ["std", "variance"])
def test_bank_fits_the_spread_flow_on_the_statistic_and_keeps_sigma_a_std(statistic):
    g = torch.Generator().manual_seed(0)
    var = torch.rand(50, 4, generator=g) * torch.tensor([0.1, 1.0, 4.0, 9.0]) + 0.01
    stats = {2: {"mean": torch.randn(50, 4, generator=g), "var": var}}
    bank = StyleFlowBank({2: 4}, temperatures={2: 1.0}, statistic=statistic, num_blocks=1)
    bank.fit(stats, epochs=0, val_fraction=0.0, log_every=0)  # only the data-dependent ActNorm init
    spread = var.sqrt() if statistic == "std" else var
    # the spread flow's input ActNorm standardises the data it was given: std or variance
    first = bank.spread_flows["2"]._transform._transforms[0]
    torch.testing.assert_close(first.log_scale.detach(), -torch.log(spread.std(0)), rtol=1e-4, atol=1e-5)
    obs = bank.observed[2]
    torch.testing.assert_close(obs["spread"]["low"], spread.amin(0))
    torch.testing.assert_close(obs["spread"]["high"], spread.amax(0))
    # "sigma" (the scale MixStyleFlow measures its shift in) is a std whatever the statistic
    torch.testing.assert_close(obs["sigma"]["std"], var.sqrt().std(0, correction=0))
    from msf_monai.styles import mixstyleflow_layers

    layer = mixstyleflow_layers(bank, p=1.0, lam=0.0)[2]
    torch.testing.assert_close(layer.style_scale[1], var.sqrt().std(0, correction=0))
    # log_prob scores the spread flow on the same statistic
    with torch.no_grad():
        direct = bank.mean_flows["2"].log_prob(stats[2]["mean"]) + bank.spread_flows["2"].log_prob(spread)
    torch.testing.assert_close(bank.log_prob(2, stats[2]["mean"], var), direct)


@pytest.mark.parametrize("statistic", ["std", "variance"])
def test_mixstyleflow_imposes_the_sampled_std_on_the_features(statistic):
    """End to end: a style layer fed by the bank gives its features the std the bank returns
    (sampled 16 -> std 4 when the flows model variances, std 16 when they model stds)."""
    from msf_monai.styles import mixstyleflow_layers

    bank = _shifted_identity_bank(statistic, {2: 1.0})
    layer = mixstyleflow_layers(bank, temperatures=[1e-6], p=1.0, lam=0.0, pool_size=0)[2].train()
    x = torch.randn(3, 4, 8, 8) * 0.3 + 1.0
    out = layer(x)
    expected = 4.0 if statistic == "variance" else 16.0
    torch.testing.assert_close(out.std(dim=(2, 3), unbiased=False), torch.full((3, 4), expected), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out.mean(dim=(2, 3)), torch.full((3, 4), 16.0), rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- resumed fits, failures and the guards


def _flow(seed=0):
    torch.manual_seed(seed)
    return build_style_flow(4, num_blocks=2)


@pytest.mark.slow
def test_flow_fit_resumed_from_a_checkpoint_equals_an_uninterrupted_fit():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=gen) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + 1
    val = torch.randn(20, 4, generator=gen)
    kw = dict(epochs=6, lr=1e-3, val_data=val, seed=3, log_every=0)
    whole = _flow()
    history = fit_flow(whole, x, **kw)
    states = []

    class Killed(Exception):
        pass

    def crash_at_4(state):
        states.append(state)
        if state["epoch"] == 4:
            raise Killed

    with pytest.raises(Killed):
        fit_flow(_flow(), x, checkpoint_every=2, on_checkpoint=crash_at_4, **kw)
    resumed = _flow(seed=1)  # other initial weights: everything comes from the state
    assert fit_flow(resumed, x, resume_state=states[-1], **kw) == history
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))


def test_flow_problems_name_the_layer_and_the_guard_count_is_reported(caplog, tmp_path):
    bank = StyleFlowBank({2: 4}, temperatures={2: 1.0})
    good = np.abs(np.random.default_rng(0).normal(1, 0.2, (30, 4))).astype(np.float32)
    bad = good.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="layer 2 statistic 'mean'.*non-finite"):
        bank.fit({2: {"mean": bad, "var": good}}, epochs=1)
    with pytest.raises(FlowFitError, match="mean flow of style layer 2: flow fit diverged"):
        noise = np.random.default_rng(1).normal(size=(200, 4)).astype(np.float32)
        bank.fit({2: {"mean": noise, "var": noise**2}}, epochs=20, lr=1e6, val_fraction=0.0)
    # in the Phase II handler both stop the phase with a message, not a traceback
    from msf_monai.handlers import StyleFlowFitter, StyleStatisticsRecorder

    recorder = StyleStatisticsRecorder(layers=[2])
    recorder.stats = {2: {"mean": bad, "var": good}}
    fitter = StyleFlowFitter(recorder, StyleFlowBank({2: 4}), tmp_path / "flows.pt", epochs=1)
    with pytest.raises(PhaseError, match="layer 2"):
        fitter(None)
    # the sampling guard: replaced samples are counted and logged. An input ActNorm with scale
    # e^-8 makes the inverse map blow most draws at T = 3.5 beyond the guard's |x| <= 1e4
    bank = StyleFlowBank({2: 4}, temperatures={2: 3.5})
    with torch.no_grad():
        for flows in (bank.mean_flows, bank.spread_flows):
            flows["2"]._transform._transforms[0].log_scale.fill_(-8.0)
    with caplog.at_level(logging.WARNING, logger="msf_monai.flows"):
        bank.sample(2, 300, generator=torch.Generator().manual_seed(0))
    n_mean, n_spread = bank.last_replaced["mean"], bank.last_replaced["spread"]
    assert n_mean > 30 and n_spread > 30
    assert f"replaced {n_mean} mean and {n_spread} spread sample(s)" in caplog.text
    assert bank.guard_counts[2] == {"drawn": 600, "replaced": n_mean + n_spread}


@pytest.mark.slow
def test_relative_guard_keeps_samples_within_the_observed_range(tmp_path):
    bank, stats = fitted_bank()
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


def test_version_1_flow_checkpoints_still_load_without_the_relative_guard(tmp_path, caplog):
    bank, _ = fitted_bank()
    bank.save(tmp_path / "flows.pt")
    payload = torch.load(tmp_path / "flows.pt", weights_only=True)
    payload["version"] = 1
    del payload["observed"]
    torch.save(payload, tmp_path / "old.pt")
    old = StyleFlowBank.load(tmp_path / "old.pt")
    assert old.observed == {} and old.sampling_bounds(2, "mean") is None
    mean, std = old.sample(2, 10)
    assert mean.shape == (10, 4) and "no observed statistics range" in caplog.text
