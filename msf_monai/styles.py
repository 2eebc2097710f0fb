"""Feature-style layers for domain generalisation: MixStyleFlow and the baselines it is compared with.

Every layer acts on feature maps ``[B, C, *spatial]`` (``[B, C, H, W]`` in this package) and is a
training-time augmentation only:

* in eval mode (``not self.training``) or with ``p == 0`` it returns its input unchanged;
* in training mode it is applied to the whole batch with probability ``p`` (one draw of
  ``torch.rand(())`` per forward call, so ``torch.manual_seed`` makes it reproducible);
* it keeps shape and dtype and is vectorised over the batch.

"Style" means the per-image, per-channel spatial mean ``mu(f)`` and standard deviation
``sigma(f) = sqrt(var(f) + eps)`` (population variance), see :func:`channel_stats`. The
statistics-based layers normalise with *detached* statistics, as in their reference code, so
gradients flow through the normalised content only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DSU",
    "EFDMix",
    "GIN",
    "MaxStyle",
    "MixStyle",
    "MixStyleFlow",
    "RandConv",
    "STYLE_LAYERS",
    "StyleLayer",
    "StyleSampler",
    "TriD",
    "build_style_layer",
    "channel_stats",
    "mix_feature_style",
    "mixstyleflow_layers",
]

StyleSampler = Callable[[int], "tuple[torch.Tensor, torch.Tensor]"]
"""``sampler(n) -> (mean [n, C], std [n, C])``: draws ``n`` feature styles (e.g. from a normalizing flow)."""

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics are computed in float32 for half-precision inputs (numerical safety)."""
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def channel_stats(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel spatial mean and std of ``x`` ``[B, C, *spatial]``.

    Returns ``(mu, sigma)`` of shape ``[B, C, 1, ...]`` (``[B, C, 1, 1]`` for 2-D features), with
    ``sigma = sqrt(var + eps)`` and ``var`` the population (biased) variance, so that the
    normalised map ``(x - mu) / sigma`` has zero mean and (almost) unit std. Not detached.
    """
    if x.dim() < 3:
        raise ValueError(f"expected features [B, C, *spatial], got shape {tuple(x.shape)}")
    dims = tuple(range(2, x.dim()))
    var, mu = torch.var_mean(x.to(_compute_dtype(x)), dim=dims, keepdim=True, unbiased=False)  # one pass
    return mu, (var + eps).sqrt()


def _as_stat(t: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Reshape a style statistic ``[n, C]`` or ``[n, C, 1, ...]`` to broadcast against ``x``."""
    t = torch.as_tensor(t).to(device=x.device, dtype=dtype)
    b, c = x.shape[:2]
    if t.dim() == 2:
        t = t.reshape(*t.shape, *([1] * (x.dim() - 2)))
    if t.dim() != x.dim() or t.shape[1] != c or t.shape[0] not in (1, b) or any(s != 1 for s in t.shape[2:]):
        raise ValueError(
            f"{name} must have shape [B, C], [1, C] or [B, C, 1, 1] with B={b}, C={c}; got {tuple(t.shape)}"
        )
    return t


def _as_lam(lam: float | torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | float:
    """Turn a mixing weight (float, ``[B]`` or ``[B, 1, 1, 1]``) into something broadcastable with ``x``."""
    if not torch.is_tensor(lam):
        return float(lam)
    lam = lam.to(device=x.device, dtype=dtype)
    if lam.dim() == 0:
        return lam
    if lam.dim() == 1:
        lam = lam.reshape(-1, *([1] * (x.dim() - 1)))
    if lam.dim() != x.dim() or lam.shape[0] not in (1, x.shape[0]) or any(s != 1 for s in lam.shape[1:]):
        raise ValueError(f"lam must be a float, a [B] or a [B, 1, 1, 1] tensor; got shape {tuple(lam.shape)}")
    return lam


def _sample_beta(alpha: float, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` draws of Beta(alpha, alpha) as a float32 ``[n]`` tensor (global torch RNG)."""
    conc = torch.tensor(float(alpha), device=device, dtype=torch.float32)
    return torch.distributions.Beta(conc, conc).sample((n,))


def _random_perm(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A random permutation of the batch indices ``0..n-1``."""
    return torch.randperm(n, device=device)


def _bcast(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` with ``ndim`` dimensions in total."""
    return t.reshape(-1, *([1] * (ndim - 1)))


def _bcast_channels(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``[B, C]`` -> ``[B, C, 1, ..., 1]`` with ``ndim`` dimensions in total."""
    return t.reshape(*t.shape[:2], *([1] * (ndim - 2)))


def _check_prob(p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    return float(p)


def _check_positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not float(value) > 0.0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def mix_feature_style(
    x: torch.Tensor,
    mu_new: torch.Tensor,
    sigma_new: torch.Tensor,
    lam: float | torch.Tensor,
    eps: float = 1e-6,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Re-style ``x`` with a mixture of its own and new statistics (MixStyleFlow, eq. 7).

    ``f_bar = (f - mu(f)) / sigma(f)`` with detached ``mu, sigma``;
    ``gamma_mix = lam * sigma(f) + (1 - lam) * sigma_new``;
    ``beta_mix = lam * mu(f) + (1 - lam) * mu_new``; returns ``gamma_mix * f_bar + beta_mix``.

    Args:
        x: features ``[B, C, *spatial]``.
        mu_new, sigma_new: new style, ``[B, C]``, ``[1, C]`` (shared by the batch) or ``[B, C, 1, 1]``.
        lam: weight of the original style: a float, a ``[B]`` or a ``[B, 1, 1, 1]`` tensor.
            ``lam = 1`` returns ``x`` (up to rounding), ``lam = 0`` imposes the new style.
        eps: added to the variance of ``x``.
        return_stats: also return ``(mu, sigma)`` of ``x`` and the applied ``(beta_mix, gamma_mix)``
            (``[B, C, 1, 1]`` each), e.g. to measure the perturbation without a second pass.
    """
    dtype = _compute_dtype(x)
    mu, sigma = channel_stats(x.detach(), eps)
    mu_new = _as_stat(mu_new, x, dtype, "mu_new")
    sigma_new = _as_stat(sigma_new, x, dtype, "sigma_new")
    lam = _as_lam(lam, x, dtype)
    gamma_mix = lam * sigma + (1.0 - lam) * sigma_new
    beta_mix = lam * mu + (1.0 - lam) * mu_new
    out = _restyle(x, mu, sigma, beta_mix, gamma_mix)
    return (out, (mu, sigma), (beta_mix, gamma_mix)) if return_stats else out


def _restyle(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, mu_new: torch.Tensor, sigma_new: torch.Tensor):
    """``sigma_new * (x - mu) / sigma + mu_new`` in the compute dtype, cast back to ``x.dtype``.

    Computed as one fused ``x * a + b`` over the feature map (``a = sigma_new / sigma``,
    ``b = mu_new - mu * a`` are per image and channel): one pass instead of four, the same value
    and, with detached ``mu`` and ``sigma``, the same gradient.
    """
    dtype = _compute_dtype(x)
    scale = sigma_new / sigma
    shift = mu_new - mu * scale
    return torch.addcmul(shift, x.to(dtype), scale).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# base class
# ----------------------------------------------------------------------------------------------


class StyleLayer(nn.Module):
    """Base class: identity unless training, then applies :meth:`stylize` with probability ``p``.

    Subclasses implement ``stylize(x)``; the gating (eval mode, ``p == 0``, one ``torch.rand(())``
    draw per call) lives here so all layers behave alike.
    """

    def __init__(self, p: float = 0.5, eps: float = 1e-6):
        super().__init__()
        self.p = _check_prob(p)
        if isinstance(eps, bool) or not isinstance(eps, Real) or float(eps) < 0.0:
            raise ValueError(f"eps must be a number >= 0, got {eps!r}")
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if torch.rand(()).item() >= self.p:
            return x
        return self.stylize(x)

    def stylize(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Apply the style perturbation to the whole batch (called only when active)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"p={self.p}, eps={self.eps}"


# ----------------------------------------------------------------------------------------------
# MixStyleFlow
# ----------------------------------------------------------------------------------------------


class MixStyleFlow(StyleLayer):
    """MixStyleFlow: mix each image's feature style with a style drawn from a learned distribution.

    Formula (MixStyleFlow, eq. 7): ``f_bar = (f - mu(f)) / sigma(f)`` (detached statistics),
    ``out = (lam*sigma(f) + (1-lam)*sigma_new) * f_bar + lam*mu(f) + (1-lam)*mu_new`` where
    ``(mu_new, sigma_new) = style_sampler(n)`` come from a normalizing flow fitted to the
    training-domain feature statistics.

    Defaults: ``p=0.5``; ``lam="uniform"`` (paper: ``lam ~ U[0, 1]`` per image; ``"beta"`` gives
    the reference code's ``lam ~ Beta(0.1, 0.1)``); ``sample_per="batch"`` (reference code: one
    style shared by the batch; ``"image"`` draws one per image); ``eps=1e-6``.

    The sampler is a plain callable ``sampler(n) -> (mean [n, C], std [n, C])``. It is stored
    without being registered as a submodule (it is not in ``state_dict`` and not moved by
    ``.to()``); its outputs are detached and moved to the device/dtype of the features, i.e. the
    sampled styles are treated as data and no gradient reaches the flow.
    """

    _LAM_MODES = ("uniform", "beta")
    _SAMPLE_PER = ("batch", "image")

    def __init__(
        self,
        style_sampler: StyleSampler | None = None,
        p: float = 0.5,
        lam: str | float = "uniform",
        beta_alpha: float = 0.1,
        sample_per: str = "batch",
        eps: float = 1e-6,
        style_scale: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__(p=p, eps=eps)
        #: per-channel std of the real means and stds (``[C]`` each) the shift is measured in
        self.style_scale = None if style_scale is None else tuple(torch.as_tensor(t).float() for t in style_scale)
        #: after an active call: how far the mixed style moved from the features' own, as the
        #: mean over images and channels of ``|beta_mix - mu| / scale_mu`` (``"mean"``) and
        #: ``|gamma_mix - sigma| / scale_sigma`` (``"std"``); ``None`` after an inactive call
        self.last_shift: dict[str, float] | None = None
        if isinstance(lam, str):
            if lam.lower() not in self._LAM_MODES:
                raise ValueError(f"lam must be one of {self._LAM_MODES} or a float in [0, 1], got {lam!r}")
            lam = lam.lower()
        elif isinstance(lam, bool) or not isinstance(lam, Real) or not 0.0 <= float(lam) <= 1.0:
            raise ValueError(f"lam must be one of {self._LAM_MODES} or a float in [0, 1], got {lam!r}")
        else:
            lam = float(lam)
        self.lam = lam
        self.beta_alpha = _check_positive(beta_alpha, "beta_alpha")
        if not isinstance(sample_per, str) or sample_per.lower() not in self._SAMPLE_PER:
            raise ValueError(f"sample_per must be one of {self._SAMPLE_PER}, got {sample_per!r}")
        self.sample_per = sample_per.lower()
        self.set_sampler(style_sampler)

    @property
    def style_sampler(self) -> StyleSampler | None:
        """The current style sampler (``None`` when unset)."""
        return self.__dict__["_style_sampler"]

    def set_sampler(self, sampler: StyleSampler | None) -> None:
        """Set (or clear with ``None``) the style sampler without registering it as a submodule."""
        if sampler is not None and not callable(sampler):
            raise TypeError(f"style_sampler must be callable as sampler(n) -> (mean, std), got {type(sampler)!r}")
        # bypass nn.Module.__setattr__ so an nn.Module sampler is not registered (no state_dict entry)
        object.__setattr__(self, "_style_sampler", sampler)

    def _sample_lam(self, b: int, device: torch.device) -> torch.Tensor | float:
        if self.lam == "uniform":
            return torch.rand(b).to(device)
        if self.lam == "beta":
            return _sample_beta(self.beta_alpha, b).to(device)
        return self.lam

    def _sample_style(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sampler = self.style_sampler
        if sampler is None:
            raise RuntimeError(
                "MixStyleFlow is active in training mode but has no style sampler; "
                "pass style_sampler=... or call set_sampler(...) (e.g. with the fitted flow's sampler)"
            )
        n = 1 if self.sample_per == "batch" else x.shape[0]
        out = sampler(n)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise RuntimeError("style_sampler(n) must return a pair (mean [n, C], std [n, C])")
        mean, std = (torch.as_tensor(t).detach() for t in out)
        for name, t in (("mean", mean), ("std", std)):
            if t.dim() != 2 or t.shape[0] != n or t.shape[1] != x.shape[1]:
                raise RuntimeError(
                    f"style_sampler({n}) returned {name} of shape {tuple(t.shape)}, expected ({n}, {x.shape[1]})"
                )
        dtype = _compute_dtype(x)
        return mean.to(device=x.device, dtype=dtype), std.to(device=x.device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_shift = None
        return super().forward(x)

    def stylize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._sample_style(x)
        lam = self._sample_lam(x.shape[0], x.device)
        if self.style_scale is None:
            return mix_feature_style(x, mean, std, lam, self.eps)
        out, own, mixed = mix_feature_style(x, mean, std, lam, self.eps, return_stats=True)
        with torch.no_grad():  # the perturbation's size in units of the real statistics' spread
            self.last_shift = {
                name: float(((m - o).flatten(1).abs() / scale.to(o.device).clamp_min(1e-6)).mean())
                for name, o, m, scale in zip(("mean", "std"), own, mixed, self.style_scale)
            }
        return out

    def extra_repr(self) -> str:
        has = "set" if self.style_sampler is not None else "None"
        return (
            f"p={self.p}, lam={self.lam!r}, beta_alpha={self.beta_alpha}, sample_per={self.sample_per!r}, "
            f"eps={self.eps}, style_sampler={has}"
        )


# ----------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------


class _BetaStyleLayer(StyleLayer):
    """A style layer with one ``Beta(alpha, alpha)`` weight per image (MixStyle, TriD, EFDMix)."""

    def __init__(self, p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6):
        super().__init__(p=p, eps=eps)
        self.alpha = _check_positive(alpha, "alpha")

    def _beta(self, like: torch.Tensor, dims: int) -> torch.Tensor:
        """``[B, 1, ...]`` (``dims`` dimensions) Beta weights with ``like``'s batch size, device and dtype."""
        return _bcast(_sample_beta(self.alpha, like.shape[0]).to(device=like.device, dtype=like.dtype), dims)

    def extra_repr(self) -> str:
        return f"p={self.p}, alpha={self.alpha}, eps={self.eps}"


class MixStyle(_BetaStyleLayer):
    """MixStyle: mix feature statistics between random pairs of images in the batch.

    Formula (Zhou et al., "Domain generalization with MixStyle", ICLR 2021):
    ``mu_mix = lam*mu + (1-lam)*mu[perm]``, ``sigma_mix = lam*sigma + (1-lam)*sigma[perm]``,
    ``out = sigma_mix * (f - mu) / sigma + mu_mix`` with detached statistics,
    ``lam ~ Beta(alpha, alpha)`` per image and ``perm`` a random batch permutation.
    Defaults (paper): ``p=0.5``, ``alpha=0.1``, ``eps=1e-6``.
    """

    def stylize(self, x: torch.Tensor) -> torch.Tensor:
        mu, sigma = channel_stats(x.detach(), self.eps)
        lam = self._beta(mu, x.dim())
        perm = _random_perm(x.shape[0]).to(x.device)
        mu_mix = lam * mu + (1.0 - lam) * mu[perm]
        sigma_mix = lam * sigma + (1.0 - lam) * sigma[perm]
        return _restyle(x, mu, sigma, mu_mix, sigma_mix)


class DSU(StyleLayer):
    """DSU: perturb feature statistics with Gaussian noise scaled by their batch variance.

    Formula (Li et al., "Uncertainty modeling for out-of-distribution generalization", ICLR 2022):
    ``mu' = mu + eps_mu * sqrt(Var_batch(mu) + eps)``, ``sigma' = sigma + eps_sigma *
    sqrt(Var_batch(sigma) + eps)``, ``eps_* ~ N(0, 1)`` per image and channel,
    ``out = sigma' * (f - mu) / sigma + mu'`` with detached statistics. ``Var_batch`` is the
    unbiased variance over the batch (0 for a batch of one). Defaults (paper): ``p=0.5``, ``eps=1e-6``.
    """

    def stylize(self, x: torch.Tensor) -> torch.Tensor:
        mu, sigma = channel_stats(x.detach(), self.eps)
        correction = 1 if x.shape[0] > 1 else 0
        sqrtvar_mu = (mu.var(dim=0, keepdim=True, correction=correction) + self.eps).sqrt()
        sqrtvar_sigma = (sigma.var(dim=0, keepdim=True, correction=correction) + self.eps).sqrt()
        mu_new = mu + torch.randn_like(mu) * sqrtvar_mu
        sigma_new = sigma + torch.randn_like(sigma) * sqrtvar_sigma
        return _restyle(x, mu, sigma, mu_new, sigma_new)


class TriD(_BetaStyleLayer):
    """TriD: replace a random subset of channel statistics by uniformly random ones.

    Formula (Chen et al., "Treasure in distribution: a domain randomization based multi-source
    domain generalization for 2D medical image segmentation", MICCAI 2023):
    ``mu_r, sigma_r ~ U(0, 1)`` per image and channel; ``mask ~ Bernoulli(q)`` per channel with
    ``q ~ Beta(alpha, alpha)`` per image; ``mu' = mask*mu_r + (1-mask)*mu`` (same for sigma);
    ``out = sigma' * (f - mu) / sigma + mu'`` with detached statistics.
    Defaults (paper code): ``p=0.5``, ``alpha=0.1``, ``eps=1e-6``.
    """

    def stylize(self, x: torch.Tensor) -> torch.Tensor:
        mu, sigma = channel_stats(x.detach(), self.eps)
        mu_r = torch.rand_like(mu)
        sigma_r = torch.rand_like(sigma)
        q = self._beta(mu, x.dim())
        mask = torch.bernoulli(q.expand_as(mu))
        mu_new = mask * mu_r + (1.0 - mask) * mu
        sigma_new = mask * sigma_r + (1.0 - mask) * sigma
        return _restyle(x, mu, sigma, mu_new, sigma_new)


class EFDMix(_BetaStyleLayer):
    """EFDMix: exact feature distribution mixing by matching sorted feature values.

    Formula (Zhang et al., "Exact feature distribution matching for arbitrary style transfer and
    domain generalization", CVPR 2022): with spatial dims flattened, ``(v, i) = sort(f)``,
    ``f_copy = v[perm].gather(-1, argsort(i))`` (each value replaced by the equally ranked value
    of the paired image), ``out = f + (f_copy - f.detach()) * (1 - lam)``,
    ``lam ~ Beta(alpha, alpha)`` per image, ``perm`` a random batch permutation.
    Defaults (paper): ``p=0.5``, ``alpha=0.1``. ``eps`` is unused (kept for a uniform interface).
    """

    def stylize(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        flat = x.reshape(b, c, -1)
        values, index = torch.sort(flat, dim=-1)
        inverse = index.argsort(dim=-1)
        perm = _random_perm(b).to(x.device)
        copy = values[perm].gather(-1, inverse)
        lam = self._beta(x, 3)
        out = flat + (copy - flat.detach()) * (1.0 - lam)
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"p={self.p}, alpha={self.alpha}"


class RandConv(StyleLayer):
    """RandConv: image-level augmentation by a randomly initialised convolution.

    Formula (Xu et al., "Robust and generalizable visual representation learning via random
    convolutions", ICLR 2021): per call, ``k`` is drawn from ``kernel_sizes`` and weights
    ``W ~ N(0, 1/(C*k^2))`` (``C`` in = ``C`` out = image channels, padding ``k//2``, no bias);
    ``out = a*x + (1-a)*conv(x, W)`` with ``a ~ U(0, 1)`` per image when ``mix`` else ``conv(x, W)``.
    Defaults (paper): ``p=0.5``, ``kernel_sizes=(1, 3, 5, 7)``, ``mix=True``. Weights are
    regenerated each call and are not parameters. Works for 1-D, 2-D and 3-D images.
    """

    def __init__(self, p: float = 0.5, kernel_sizes: Sequence[int] = (1, 3, 5, 7), mix: bool = True, eps: float = 1e-6):
        super().__init__(p=p, eps=eps)
        ks = tuple(kernel_sizes) if isinstance(kernel_sizes, Sequence) else (kernel_sizes,)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0 for k in ks):
            raise ValueError(f"kernel_sizes must be a non-empty sequence of odd positive ints, got {kernel_sizes!r}")
        self.kernel_sizes = ks
        self.mix = bool(mix)

    def stylize(self, x: torch.Tensor) -> torch.Tensor:
        nd = x.dim() - 2
        if nd not in (1, 2, 3):
            raise ValueError(f"RandConv expects [B, C, *spatial] with 1 to 3 spatial dims, got {tuple(x.shape)}")
        b, c = x.shape[:2]
        k = self.kernel_sizes[int(torch.randint(len(self.kernel_sizes), ()).item())]
        std = 1.0 / math.sqrt(c * k**nd)
        weight = torch.randn((c, c) + (k,) * nd, device=x.device, dtype=x.dtype) * std
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        out = conv(x, weight, padding=k // 2)
        if self.mix:
            a = _bcast(torch.rand(b, device=x.device, dtype=x.dtype), x.dim())
            out = a * x + (1.0 - a) * out
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}, kernel_sizes={self.kernel_sizes}, mix={self.mix}"


class GIN(StyleLayer):
    """GIN: global intensity non-linear augmentation by a shallow random network (image level).

    Method (Ouyang et al., "Causality-inspired single-source domain generalization for medical
    image segmentation", IEEE TMI 2022): per call and per image, a fresh random network of
    ``n_layers`` convolutions (kernel size drawn per layer from ``kernel_sizes``, weights and
    biases ~ N(0, 1), ``interm_channels`` channels between layers, LeakyReLU after every layer
    but the last) maps the image to ``g``; ``out = a*g + (1-a)*x`` with ``a ~ U(0, 1)`` per
    image, then rescaled so that each image keeps its Frobenius norm. Defaults (paper code):
    ``n_layers=4``, ``interm_channels=2``, ``kernel_sizes=(1, 3)``, LeakyReLU slope 0.01.
    Shape, dtype and device are kept; 2-D images ``[B, C, H, W]`` only.
    """

    def __init__(self, p: float = 0.5, n_layers: int = 4, interm_channels: int = 2, kernel_sizes: Sequence[int] = (1, 3),
                 negative_slope: float = 0.01, eps: float = 1e-6):
        super().__init__(p=p, eps=eps)
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 2:
            raise ValueError(f"n_layers must be an int >= 2, got {n_layers!r}")
        if isinstance(interm_channels, bool) or not isinstance(interm_channels, int) or interm_channels < 1:
            raise ValueError(f"interm_channels must be an int >= 1, got {interm_channels!r}")
        ks = tuple(kernel_sizes)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0 for k in ks):
            raise ValueError(f"kernel_sizes must be a non-empty sequence of odd positive ints, got {kernel_sizes!r}")
        self.n_layers, self.interm_channels, self.kernel_sizes = n_layers, interm_channels, ks
        self.negative_slope = float(negative_slope)

    def stylize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"GIN expects 2-D images [B, C, H, W], got {tuple(x.shape)}")
        b, c, hgt, wid = x.shape
        h = x.reshape(1, b * c, hgt, wid)  # one grouped convolution = a different network per image
        in_ch = c
        for i in range(self.n_layers):
            last = i == self.n_layers - 1
            out_ch = c if last else self.interm_channels
            k = self.kernel_sizes[int(torch.randint(len(self.kernel_sizes), ()).item())]
            weight = torch.randn(b * out_ch, in_ch, k, k, device=x.device, dtype=x.dtype)
            bias = torch.randn(b * out_ch, device=x.device, dtype=x.dtype)
            h = F.conv2d(h, weight, bias, padding=k // 2, groups=b)
            if not last:
                h = F.leaky_relu(h, self.negative_slope)
            in_ch = out_ch
        g = h.reshape(b, c, hgt, wid)
        a = _bcast(torch.rand(b, device=x.device, dtype=x.dtype), 4)
        mixed = a * g + (1.0 - a) * x
        norm_in = x.flatten(1).norm(dim=1)
        norm_out = mixed.flatten(1).norm(dim=1)
        return mixed * _bcast(norm_in / (norm_out + 1e-5), 4)

    def extra_repr(self) -> str:
        return (f"p={self.p}, n_layers={self.n_layers}, interm_channels={self.interm_channels}, "
                f"kernel_sizes={self.kernel_sizes}")


class MaxStyle(StyleLayer):
    """MaxStyle: MixStyle plus noise on the statistics, with learnable (adversarial) style parameters.

    Formula (Chen et al., "MaxStyle: adversarial style composition for robust medical image
    segmentation", MICCAI 2022): with detached ``mu, sigma`` and a fixed batch permutation
    ``perm`` (never the identity for ``B > 1``),
    ``sigma_mix = (1-lam)*sigma + lam*sigma[perm]``, ``mu_mix = (1-lam)*mu + lam*mu[perm]``,
    ``out = (sigma_mix + g*Std_batch(sigma)) * (f - mu)/sigma + mu_mix + b*Std_batch(mu)``, with
    ``lam ~ U(0, 1)`` per image (clamped to [0, 1] when used), noise ``g, b ~ N(0, 1)`` per image
    and channel, and ``Std_batch`` the unbiased batch std of the first call's statistics.

    Unlike the other layers its random draw is *kept* until :meth:`reset`: the style parameters
    (``lam``, ``g``, ``b``; :meth:`style_parameters`) are leaf tensors with ``requires_grad`` that
    an adversary can optimise over several forward passes (see
    :class:`msf_monai.engines.MaxStyleIteration`: 5 Adam steps, lr 0.1, maximising the
    segmentation loss). They are plain attributes, not parameters: they never enter
    ``state_dict`` or the network's optimizer. Whether the layer acts (probability ``p``) is also
    drawn once per :meth:`reset`. Defaults (paper code): ``p=0.5``, ``eps=1e-6``.
    """

    def __init__(self, p: float = 0.5, eps: float = 1e-6):
        super().__init__(p=p, eps=eps)
        self._style: dict[str, torch.Tensor] | None = None
        self._active: bool | None = None

    def reset(self) -> None:
        """Forget the current style draw; the next training forward draws a new one."""
        self._style, self._active = None, None

    def style_parameters(self) -> list[torch.Tensor]:
        """The current learnable style tensors (``lam``, ``gamma_noise``, ``beta_noise``); empty
        when the layer is inactive for this draw or has not run since :meth:`reset`."""
        if not self._active or self._style is None:
            return []
        return [self._style[k] for k in ("lam", "gamma_noise", "beta_noise")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self._active is None:
            self._active = bool(torch.rand(()).item() < self.p)
        if not self._active:
            return x
        return self.stylize(x)

    def _draw(self, x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> dict[str, torch.Tensor]:
        b, c = x.shape[:2]
        perm = _random_perm(b)
        while b > 1 and torch.equal(perm, torch.arange(b)):
            perm = _random_perm(b)
        correction = 1 if b > 1 else 0
        style = {
            "perm": perm.to(x.device),
            "sigma_scale": sigma.std(dim=0, keepdim=True, correction=correction),
            "mu_scale": mu.std(dim=0, keepdim=True, correction=correction),
            "lam": torch.rand(b, device=x.device, dtype=mu.dtype),
            "gamma_noise": torch.randn(b, c, device=x.device, dtype=mu.dtype),
            "beta_noise": torch.randn(b, c, device=x.device, dtype=mu.dtype),
        }
        for key in ("lam", "gamma_noise", "beta_noise"):
            style[key].requires_grad_(True)
        return style

    def stylize(self, x: torch.Tensor) -> torch.Tensor:
        mu, sigma = channel_stats(x.detach(), self.eps)
        if self._style is None or self._style["gamma_noise"].shape != mu.shape[:2]:
            self._style = self._draw(x, mu, sigma)
        st = self._style
        lam = _bcast(st["lam"].clamp(0.0, 1.0), x.dim())
        perm = st["perm"]
        sigma_mix = (1.0 - lam) * sigma + lam * sigma[perm] + _bcast_channels(st["gamma_noise"], x.dim()) * st["sigma_scale"]
        mu_mix = (1.0 - lam) * mu + lam * mu[perm] + _bcast_channels(st["beta_noise"], x.dim()) * st["mu_scale"]
        return _restyle(x, mu, sigma, mu_mix, sigma_mix)

    def extra_repr(self) -> str:
        return f"p={self.p}, eps={self.eps}"


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------

STYLE_LAYERS: dict[str, type[StyleLayer]] = {
    "mixstyleflow": MixStyleFlow,
    "mixstyle": MixStyle,
    "maxstyle": MaxStyle,
    "dsu": DSU,
    "trid": TriD,
    "efdm": EFDMix,
    "randconv": RandConv,
    "gin": GIN,
}


def build_style_layer(name: str, **kwargs) -> StyleLayer:
    """Instantiate a style layer by (case-insensitive) name from :data:`STYLE_LAYERS`."""
    key = str(name).strip().lower()
    if key not in STYLE_LAYERS:
        raise ValueError(f"unknown style layer {name!r}; valid names: {', '.join(sorted(STYLE_LAYERS))}")
    return STYLE_LAYERS[key](**kwargs)


def mixstyleflow_layers(
    bank, layers: Sequence[int] | None = None, pool_size: int = 256, temperatures: Sequence[float] | None = None,
    guard_range: float | None | str = "bank", **kwargs
) -> dict[int, MixStyleFlow]:
    """One :class:`MixStyleFlow` per style layer of a fitted flow bank (e.g.
    :class:`msf_monai.flows.StyleFlowBank`).

    The result is what ``DualDecoderNet(image_decoder_styles=...)`` (or ``encoder_styles``) takes;
    ``kwargs`` go to every layer (``p``, ``lam``, ``sample_per``, ...). ``pool_size``: styles are
    drawn from the flows this many at a time and used in turn (the same distribution; 0 = one
    flow pass per call). ``temperatures``: one per chosen layer, replacing the bank's (Phase
    II's) sampling temperatures; ``None`` keeps them. ``guard_range``: the bank's relative
    sampling guard (``None`` switches it off; ``"bank"`` keeps the bank's setting). Each layer
    measures its perturbation in units of the real statistics' spread when the bank has them.
    """
    chosen = list(bank.layers) if layers is None else [int(k) for k in layers]
    missing = [k for k in chosen if k not in bank.layers]
    if missing:
        raise ValueError(f"the flow bank has no flows for layer(s) {missing}; it has {list(bank.layers)}")
    if temperatures is not None:
        temps = [float(t) for t in temperatures]
        if len(temps) != len(chosen) or not all(math.isfinite(t) and t > 0 for t in temps):
            raise ValueError(f"temperatures must be {len(chosen)} positive numbers (one per layer {chosen}), got {temperatures!r}")
        bank.temperatures.update(dict(zip(chosen, temps)))
    if guard_range != "bank":
        if guard_range is not None and not (isinstance(guard_range, Real) and float(guard_range) >= 0):
            raise ValueError(f"guard_range must be a number >= 0 or None, got {guard_range!r}")
        bank.guard_range = None if guard_range is None else float(guard_range)
    layers_out = {}
    for k in chosen:
        obs = getattr(bank, "observed", {}).get(k)
        scale = (obs["mean"]["std"], obs["sigma"]["std"]) if obs and "sigma" in obs else None
        layers_out[k] = MixStyleFlow(bank.sampler(k, pool_size=pool_size), style_scale=scale, **kwargs)
    return layers_out
