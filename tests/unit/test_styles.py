"""The feature-style layers (msf_monai.styles): MixStyleFlow, GIN and the baseline style layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from msf_monai import styles
from msf_monai.styles import (
    DSU,
    GIN,
    STYLE_LAYERS,
    MaxStyle,
    EFDMix,
    MixStyle,
    MixStyleFlow,
    RandConv,
    TriD,
    build_style_layer,
    channel_stats,
    mix_feature_style,
    mixstyleflow_layers,
)
from training_utils import fitted_bank


BASELINES = ["mixstyle", "dsu", "trid", "efdm", "randconv", "maxstyle"]


def styled_batch(b: int = 6, c: int = 4, h: int = 16, w: int = 16, seed: int = 0, dtype=torch.float32):
    """Images whose per-channel means/stds differ clearly between images (and from [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    shift = torch.linspace(-6.0, 6.0, b * c, dtype=torch.float64)[torch.randperm(b * c, generator=g)].view(b, c, 1, 1)
    scale = torch.linspace(0.5, 4.0, b * c, dtype=torch.float64)[torch.randperm(b * c, generator=g)].view(b, c, 1, 1)
    return (base * scale + shift).to(dtype)


def stats(x: torch.Tensor):
    """Per-image, per-channel spatial mean and (population) std, shape [B, C]."""
    return x.mean(dim=(2, 3)), x.std(dim=(2, 3), unbiased=False)


class TableSampler:
    """Deterministic style sampler: sampler(n) returns the first n rows of a fixed table."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean, std
        self.calls: list[int] = []

    def __call__(self, n: int):
        self.calls.append(n)
        return self.mean[:n].clone(), self.std[:n].clone()


def make_table(b: int, c: int, dtype=torch.float32):
    mean = torch.arange(b * c, dtype=dtype).view(b, c) * 0.5 - 2.0
    std = torch.arange(b * c, dtype=dtype).view(b, c) * 0.1 + 0.3
    return mean, std


def make_layer(name: str, **kwargs):
    if name == "mixstyleflow":
        kwargs.setdefault("style_sampler", TableSampler(*make_table(8, 4)))
    return build_style_layer(name, **kwargs)


def input_for(name: str, dtype=torch.float32):
    if name == "randconv":
        return styled_batch(b=6, c=3, h=32, w=32, dtype=dtype)
    return styled_batch(dtype=dtype)


# ---------------------------------------------------------------------------------------------
# channel_stats / mix_feature_style
# ---------------------------------------------------------------------------------------------


def test_channel_stats_shapes_and_values():
    x = styled_batch()
    mu, sigma = channel_stats(x, eps=0.0)
    assert mu.shape == sigma.shape == (6, 4, 1, 1)
    m, s = stats(x)
    torch.testing.assert_close(mu[..., 0, 0], m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sigma[..., 0, 0], s, atol=1e-5, rtol=1e-5)


def test_mix_feature_style_lam_one_is_identity():
    x = styled_batch()
    mean, std = make_table(6, 4)
    torch.testing.assert_close(mix_feature_style(x, mean, std, 1.0), x, atol=1e-5, rtol=1e-5)
    lam = torch.ones(6)
    torch.testing.assert_close(mix_feature_style(x, mean[:1], std[:1], lam), x, atol=1e-5, rtol=1e-5)


def test_mix_feature_style_lam_zero_imposes_new_stats():
    x = styled_batch()
    mean, std = make_table(6, 4)
    out = mix_feature_style(x, mean.view(6, 4, 1, 1), std.view(6, 4, 1, 1), torch.zeros(6, 1, 1, 1))
    m, s = stats(out)
    torch.testing.assert_close(m, mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, std, atol=1e-4, rtol=1e-4)


def test_mix_feature_style_per_image_lambda():
    x = styled_batch()
    mean, std = make_table(6, 4)
    lam = torch.linspace(0.0, 1.0, 6)
    out = mix_feature_style(x, mean, std, lam)
    m_in, s_in = stats(x)
    m, s = stats(out)
    lam2 = lam[:, None]
    torch.testing.assert_close(m, lam2 * m_in + (1 - lam2) * mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, lam2 * s_in + (1 - lam2) * std, atol=1e-4, rtol=1e-4)


def test_mix_feature_style_bad_shape_raises():
    x = styled_batch()
    with pytest.raises(ValueError):
        mix_feature_style(x, torch.zeros(6, 3), torch.ones(6, 3), 0.5)


# ---------------------------------------------------------------------------------------------
# MixStyleFlow
# ---------------------------------------------------------------------------------------------


def test_mixstyleflow_lam_one_identity():
    x = styled_batch()
    layer = MixStyleFlow(TableSampler(*make_table(6, 4)), p=1.0, lam=1.0).train()
    torch.testing.assert_close(layer(x), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sample_per", ["batch", "image"])
def test_mixstyleflow_lam_zero_gives_sampled_stats(sample_per):
    x = styled_batch()
    mean, std = make_table(6, 4)
    sampler = TableSampler(mean, std)
    layer = MixStyleFlow(sampler, p=1.0, lam=0.0, sample_per=sample_per).train()
    out = layer(x)
    m, s = stats(out)
    if sample_per == "batch":
        assert sampler.calls == [1]
        exp_m, exp_s = mean[:1].expand(6, 4), std[:1].expand(6, 4)
    else:
        assert sampler.calls == [6]
        exp_m, exp_s = mean, std
    torch.testing.assert_close(m, exp_m, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, exp_s, atol=1e-4, rtol=1e-4)
    # per image statistics really were changed
    m_in, _ = stats(x)
    assert (m - m_in).abs().max() > 1.0


def test_mixstyleflow_p0_and_eval_are_exact_identity():
    x = styled_batch()
    sampler = TableSampler(*make_table(6, 4))
    layer = MixStyleFlow(sampler, p=0.0, lam=0.0).train()
    assert torch.equal(layer(x), x)
    layer = MixStyleFlow(sampler, p=1.0, lam=0.0).eval()
    assert torch.equal(layer(x), x)
    assert sampler.calls == []
    # eval without a sampler is fine too
    assert torch.equal(MixStyleFlow(p=1.0).eval()(x), x)


def test_mixstyleflow_probability_gate_is_seeded():
    x = styled_batch()
    layer = MixStyleFlow(TableSampler(*make_table(6, 4)), p=0.5, lam=0.0).train()
    torch.manual_seed(123)
    first = [not torch.equal(layer(x), x) for _ in range(40)]
    torch.manual_seed(123)
    second = [not torch.equal(layer(x), x) for _ in range(40)]
    assert first == second
    assert 5 < sum(first) < 35  # applied roughly half of the time


@pytest.mark.parametrize("p", [0.3, 0.9])
@pytest.mark.parametrize("name", sorted(STYLE_LAYERS))
def test_probability_gate_acts_with_probability_p(name, p):
    """Over 4000 training calls a layer acts on a fraction p of them, within 5 standard errors
    (0.036 for p = 0.3, 0.024 for p = 0.9): an inverted gate (1 - p), a squared one (p^2) or a
    fixed rate falls outside."""
    kwargs = {"style_sampler": TableSampler(*make_table(8, 3))} if name == "mixstyleflow" else {}
    layer = build_style_layer(name, p=p, **kwargs).train()
    calls = []
    layer.stylize = lambda x: calls.append(1) or x  # count the active calls, skip the work
    x = torch.zeros(2, 3, 4, 4)
    torch.manual_seed(0)
    n = 4000
    for _ in range(n):
        if hasattr(layer, "reset"):  # MaxStyle draws whether it acts once per reset (per training step)
            layer.reset()
        layer(x)
    bound = 5 * (p * (1 - p) / n) ** 0.5
    assert abs(len(calls) / n - p) < bound, (len(calls) / n, p)


def test_mixstyleflow_gradients_flow():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    layer = MixStyleFlow(TableSampler(*make_table(6, 4)), p=1.0, lam="uniform").train()
    x = styled_batch().requires_grad_(True)
    out = layer(conv(x))
    out.square().mean().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_mixstyleflow_statistics_are_detached():
    # lam = 0: out = std_new * (x - mu) / sigma + mean_new; with detached mu, sigma the
    # gradient is exactly std_new / sigma times the upstream gradient
    mean, std = make_table(6, 4)
    layer = MixStyleFlow(TableSampler(mean, std), p=1.0, lam=0.0, sample_per="image").train()
    x = styled_batch().requires_grad_(True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    layer(x).backward(g)
    _, sigma = channel_stats(x.detach())
    torch.testing.assert_close(x.grad, std.view(6, 4, 1, 1) / sigma * g, atol=1e-5, rtol=1e-4)


def test_mixstyleflow_sampler_not_registered():
    class FlowLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = nn.Parameter(torch.zeros(4))

        def forward(self, n):
            return self.loc.expand(n, 4) + 1.0, torch.ones(n, 4) * 2.0

    flow = FlowLike()
    layer = MixStyleFlow(flow, p=1.0, lam=0.0)
    assert layer.style_sampler is flow
    assert len(layer.state_dict()) == 0
    assert list(layer.children()) == [] and list(layer.parameters()) == []
    x = styled_batch().requires_grad_(True)
    out = layer.train()(x)
    m, s = stats(out)
    torch.testing.assert_close(m, torch.ones(6, 4), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, torch.full((6, 4), 2.0), atol=1e-4, rtol=1e-4)
    # sampled styles are data: no gradient reaches the sampler, only the input
    out.sum().backward()
    assert flow.loc.grad is None and x.grad is not None

    other = TableSampler(*make_table(6, 4))
    layer.set_sampler(other)
    assert layer.style_sampler is other and len(layer.state_dict()) == 0
    layer.set_sampler(None)
    with pytest.raises(RuntimeError, match="sampler"):
        layer(styled_batch())


def test_mixstyleflow_moves_sampled_stats_to_input_dtype():
    mean, std = make_table(6, 4, dtype=torch.float64)
    layer = MixStyleFlow(TableSampler(mean, std), p=1.0, lam=0.0, sample_per="image").train()
    x = styled_batch(dtype=torch.float32)
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == x.shape


@pytest.mark.parametrize("lam", ["uniform", "beta", "UNIFORM"])
def test_mixstyleflow_random_lambda_is_convex(lam):
    torch.manual_seed(0)
    x = styled_batch()
    mean, std = make_table(6, 4)
    layer = MixStyleFlow(TableSampler(mean, std), p=1.0, lam=lam, sample_per="image").train()
    out = layer(x)
    m_in, _ = stats(x)
    m, _ = stats(out)
    lo, hi = torch.minimum(m_in, mean), torch.maximum(m_in, mean)
    assert ((m >= lo - 1e-4) & (m <= hi + 1e-4)).all()
    # one lambda per image: (m - mean) / (m_in - mean) is the same for all channels of an image
    ratio = (m - mean) / (m_in - mean)
    assert (ratio.max(dim=1).values - ratio.min(dim=1).values).abs().max() < 1e-3
    assert not torch.allclose(out, x, atol=1e-3)


def test_mixstyleflow_argument_validation():
    with pytest.raises(ValueError, match="lam"):
        MixStyleFlow(lam="gaussian")
    with pytest.raises(ValueError, match="lam"):
        MixStyleFlow(lam=1.5)
    with pytest.raises(ValueError, match="sample_per"):
        MixStyleFlow(sample_per="channel")
    with pytest.raises(ValueError, match="p"):
        MixStyleFlow(p=1.2)
    with pytest.raises(ValueError, match="beta_alpha"):
        MixStyleFlow(beta_alpha=0.0)
    with pytest.raises(TypeError):
        MixStyleFlow(style_sampler=42)
    with pytest.raises(RuntimeError, match="sampler"):
        MixStyleFlow(p=1.0).train()(styled_batch())
    bad = MixStyleFlow(lambda n: (torch.zeros(n, 3), torch.ones(n, 3)), p=1.0).train()
    with pytest.raises(RuntimeError, match="shape"):
        bad(styled_batch())


# ---------------------------------------------------------------------------------------------
# baselines (generic behaviour)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BASELINES + ["mixstyleflow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_kept(name, dtype):
    torch.manual_seed(0)
    x = input_for(name, dtype)
    out = make_layer(name, p=1.0).train()(x)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", BASELINES + ["mixstyleflow"])
def test_eval_and_p0_identity(name):
    x = input_for(name)
    assert torch.equal(make_layer(name, p=1.0).eval()(x), x)
    assert torch.equal(make_layer(name, p=0.0).train()(x), x)


@pytest.mark.parametrize("name", BASELINES)
def test_training_changes_statistics(name):
    torch.manual_seed(0)
    x = input_for(name)
    layer = make_layer(name, p=1.0).train()
    out = layer(x)
    m_in, s_in = stats(x)
    m, s = stats(out)
    assert (m - m_in).abs().max() > 0.5
    assert (s - s_in).abs().max() > 0.2


@pytest.mark.parametrize("name", BASELINES)
def test_gradients_reach_input(name):
    torch.manual_seed(0)
    x = input_for(name).requires_grad_(True)
    make_layer(name, p=1.0).train()(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", BASELINES + ["mixstyleflow"])
def test_no_parameters(name):
    layer = make_layer(name)
    assert list(layer.parameters()) == [] and len(layer.state_dict()) == 0


# ---------------------------------------------------------------------------------------------
# baselines (reference checks)
# ---------------------------------------------------------------------------------------------


def test_mixstyle_matches_reference_mix(monkeypatch):
    lam = 0.3
    monkeypatch.setattr(styles, "_sample_beta", lambda alpha, n, device=None: torch.full((n,), lam))
    monkeypatch.setattr(styles, "_random_perm", lambda n, device=None: torch.arange(n - 1, -1, -1))
    x = styled_batch(b=2)
    out = MixStyle(p=1.0).train()(x)
    m_in, s_in = stats(x)
    m, s = stats(out)
    exp_m = lam * m_in + (1 - lam) * m_in.flip(0)
    exp_s = lam * s_in + (1 - lam) * s_in.flip(0)
    torch.testing.assert_close(m, exp_m, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, exp_s, atol=1e-4, rtol=1e-4)
    # and the full map: sigma_mix * normalised + mu_mix
    mu, sig = channel_stats(x)
    exp = exp_s[..., None, None] * (x - mu) / sig + exp_m[..., None, None]
    torch.testing.assert_close(out, exp, atol=1e-4, rtol=1e-4)


def test_mixstyle_stats_are_convex_combinations_with_real_sampling():
    # batch of 2: whatever the permutation, each image's stats lie between the two images' stats
    x = styled_batch(b=2)
    m_in, _ = stats(x)
    lo, hi = m_in.min(dim=0).values, m_in.max(dim=0).values
    for seed in range(5):
        torch.manual_seed(seed)
        m, _ = stats(MixStyle(p=1.0).train()(x))
        assert ((m >= lo - 1e-4) & (m <= hi + 1e-4)).all()


def test_dsu_matches_seeded_reference():
    x = styled_batch()
    eps = 1e-6
    torch.manual_seed(7)
    out = DSU(p=1.0, eps=eps).train()(x)
    # replay the random draws: gate, eps_mu, eps_sigma
    torch.manual_seed(7)
    torch.rand(())
    e_mu = torch.randn(6, 4, 1, 1)
    e_sig = torch.randn(6, 4, 1, 1)
    mu, sig = channel_stats(x, eps)
    exp_mu = mu + e_mu * (mu.var(dim=0, keepdim=True) + eps).sqrt()
    exp_sig = sig + e_sig * (sig.var(dim=0, keepdim=True) + eps).sqrt()
    m, s = stats(out)
    torch.testing.assert_close(m, exp_mu[..., 0, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, exp_sig[..., 0, 0].abs(), atol=1e-4, rtol=1e-4)


def test_dsu_single_image_batch_is_finite():
    torch.manual_seed(0)
    x = styled_batch(b=1)
    out = DSU(p=1.0).train()(x)
    assert torch.isfinite(out).all()


def test_trid_full_mask_gives_uniform_random_stats(monkeypatch):
    monkeypatch.setattr(styles, "_sample_beta", lambda alpha, n, device=None: torch.ones(n))
    x = styled_batch()
    torch.manual_seed(3)
    out = TriD(p=1.0).train()(x)
    m, s = stats(out)
    assert ((m >= 0) & (m <= 1)).all()
    assert ((s > 0) & (s <= 1 + 1e-5)).all()
    # replay: gate, mu_r, sigma_r
    torch.manual_seed(3)
    torch.rand(())
    mu_r = torch.rand(6, 4, 1, 1)
    sig_r = torch.rand(6, 4, 1, 1)
    torch.testing.assert_close(m, mu_r[..., 0, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, sig_r[..., 0, 0], atol=1e-4, rtol=1e-4)


def test_trid_empty_mask_is_identity(monkeypatch):
    monkeypatch.setattr(styles, "_sample_beta", lambda alpha, n, device=None: torch.zeros(n))
    x = styled_batch()
    torch.testing.assert_close(TriD(p=1.0).train()(x), x, atol=1e-4, rtol=1e-5)


def test_efdmix_lambda_zero_copies_sorted_values(monkeypatch):
    monkeypatch.setattr(styles, "_sample_beta", lambda alpha, n, device=None: torch.zeros(n))
    monkeypatch.setattr(styles, "_random_perm", lambda n, device=None: torch.arange(n - 1, -1, -1))
    x = styled_batch(b=2)
    out = EFDMix(p=1.0).train()(x)
    flat_out, flat_x = out.flatten(2), x.flatten(2)
    # image 0 takes image 1's value distribution (and vice versa) ...
    torch.testing.assert_close(flat_out.sort(-1).values, flat_x.flip(0).sort(-1).values)
    # ... while keeping its own ranks (spatial structure)
    assert torch.equal(flat_out.argsort(-1), flat_x.argsort(-1))


def test_efdmix_lambda_one_is_identity(monkeypatch):
    monkeypatch.setattr(styles, "_sample_beta", lambda alpha, n, device=None: torch.ones(n))
    x = styled_batch()
    torch.testing.assert_close(EFDMix(p=1.0).train()(x), x)


def test_randconv_1x1_no_mix_is_channel_scaling():
    torch.manual_seed(0)
    x = styled_batch(b=3, c=1, h=32, w=32)
    out = RandConv(p=1.0, kernel_sizes=(1,), mix=False).train()(x)
    ratio = out / x
    torch.testing.assert_close(ratio, ratio.flatten()[:1].expand_as(ratio).reshape(ratio.shape), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, x)


def test_randconv_mix_is_per_image_blend():
    x = styled_batch(b=4, c=3, h=32, w=32)
    torch.manual_seed(1)
    mixed = RandConv(p=1.0, kernel_sizes=(3,), mix=True).train()(x)
    torch.manual_seed(1)
    pure = RandConv(p=1.0, kernel_sizes=(3,), mix=False).train()(x)
    # mixed = a * x + (1 - a) * pure, with one a in [0, 1] per image
    a = ((mixed - pure) * (x - pure)).flatten(1).sum(1) / (x - pure).flatten(1).square().sum(1)
    assert ((a >= 0) & (a <= 1)).all()
    torch.testing.assert_close(mixed, a.view(-1, 1, 1, 1) * x + (1 - a.view(-1, 1, 1, 1)) * pure, atol=1e-4, rtol=1e-4)


def test_randconv_validation():
    with pytest.raises(ValueError):
        RandConv(kernel_sizes=(2,))
    with pytest.raises(ValueError):
        RandConv(kernel_sizes=())


def test_maxstyle_matches_reference_formula():
    """With its draw fixed, MaxStyle's output equals the formula written out by hand."""
    torch.manual_seed(0)
    x = styled_batch(b=4)
    layer = MaxStyle(p=1.0).train()
    out = layer(x)
    st = layer._style
    mu = x.mean(dim=(2, 3), keepdim=True)
    sig = (x.var(dim=(2, 3), keepdim=True, unbiased=False) + layer.eps).sqrt()
    lam = st["lam"].detach().clamp(0, 1).view(-1, 1, 1, 1)
    perm = st["perm"]
    assert not torch.equal(perm, torch.arange(4)), "the permutation must not be the identity"
    g = st["gamma_noise"].detach()[..., None, None]
    b = st["beta_noise"].detach()[..., None, None]
    sig_mix = (1 - lam) * sig + lam * sig[perm] + g * sig.std(dim=0, keepdim=True)
    mu_mix = (1 - lam) * mu + lam * mu[perm] + b * mu.std(dim=0, keepdim=True)
    torch.testing.assert_close(out, sig_mix * (x - mu) / sig + mu_mix, rtol=1e-4, atol=1e-4)


def test_maxstyle_keeps_its_draw_until_reset_and_is_differentiable():
    torch.manual_seed(0)
    x = styled_batch(b=4)
    layer = MaxStyle(p=1.0).train()
    first = layer(x)
    torch.testing.assert_close(layer(x), first)  # same draw: an adversary can optimise it
    params = layer.style_parameters()
    assert len(params) == 3 and all(t.requires_grad for t in params)
    grads = torch.autograd.grad(first.square().mean(), params)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    layer.reset()
    assert layer.style_parameters() == []
    assert not torch.allclose(layer(x), first)  # a new draw
    assert len(layer.state_dict()) == 0


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------


def test_registry_names_and_build():
    assert set(STYLE_LAYERS) == {"mixstyleflow", "mixstyle", "dsu", "trid", "efdm", "randconv", "maxstyle", "gin"}
    assert isinstance(build_style_layer("MaxStyle"), MaxStyle)
    assert isinstance(build_style_layer("MixStyle", p=0.3), MixStyle)
    assert build_style_layer("mixstyle", p=0.3).p == 0.3
    assert isinstance(build_style_layer("DSU"), DSU)
    assert isinstance(build_style_layer("efdm", alpha=0.2), EFDMix)
    assert isinstance(build_style_layer("TriD"), TriD)
    assert isinstance(build_style_layer("randconv"), RandConv)
    assert isinstance(build_style_layer("MixStyleFlow", lam="beta"), MixStyleFlow)


def test_registry_unknown_name_lists_valid():
    with pytest.raises(ValueError) as info:
        build_style_layer("adain")
    msg = str(info.value)
    assert "adain" in msg
    for name in STYLE_LAYERS:
        assert name in msg


def test_mixstyleflow_layers_take_temperatures_guard_and_measure_shift():
    bank, stats = fitted_bank()
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
