"""The RealNVP flow of one set of style statistics: its coupling layers and how it is built.

* :class:`ClampedAffineCoupling` -- a RealNVP affine coupling with an ``exp`` scale (nflows'
  own affine coupling squashes its scale into ``(0, 1.001]``);
* :class:`CouplingMLP` -- the conditioner network of a coupling, zero-initialised so that every
  coupling starts as the identity;
* :func:`build_style_flow` -- the flow (couplings and ActNorms over a standard or diagonal
  Gaussian base), all on top of ``nflows``.

Fitting and sampling are in :mod:`msf_monai.flow_fit`, the per-layer bank of flows and its file
in :mod:`msf_monai.flows`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from nflows.distributions import DiagonalNormal, StandardNormal
from nflows.flows import Flow
from nflows.transforms import ActNorm, AffineCouplingTransform, CompositeTransform
from torch import nn

__all__ = ["BASES", "ClampedAffineCoupling", "CouplingMLP", "build_style_flow"]

#: the base distributions a flow can have
BASES = ("standard", "diagonal")


class ClampedAffineCoupling(AffineCouplingTransform):
    """RealNVP affine coupling ``y = x * exp(s_c) + t`` with a softly clamped log-scale.

    The conditioner outputs ``[t, s]`` for the transformed features (nflows' layout: shift
    first). The log-scale is ``s_c = scale_clamp * tanh(s / scale_clamp)``, which is ~``s``
    for small ``s`` but bounded by ``±scale_clamp``, so a single coupling can never scale by
    more than ``exp(scale_clamp)``. This keeps training and high-temperature sampling stable.
    (The MixStyleFlow reference code hard-clamps ``s`` and ``t`` at ``±25`` instead; nflows'
    own :class:`AffineCouplingTransform` uses ``sigmoid(s + 2) + 1e-3``, i.e. it can only
    shrink, which is not RealNVP.) ``scale_clamp=None`` disables the clamp (plain ``exp``).

    ``log|det J| = sum(s_c)`` over the transformed features (forward), ``-sum(s_c)`` (inverse).
    """

    def __init__(
        self,
        mask: torch.Tensor | Sequence[int],
        transform_net_create_fn: Callable[[int, int], nn.Module],
        unconditional_transform: Callable[..., Any] | None = None,
        scale_clamp: float | None = 5.0,
    ):
        if scale_clamp is not None and not (math.isfinite(scale_clamp) and scale_clamp > 0):
            raise ValueError(f"scale_clamp must be a positive finite number or None, got {scale_clamp!r}")
        super().__init__(mask, transform_net_create_fn, unconditional_transform)
        self.scale_clamp = None if scale_clamp is None else float(scale_clamp)

    def _log_scale_and_shift(self, transform_params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.num_transform_features
        shift = transform_params[:, :n, ...]
        raw = transform_params[:, n:, ...]
        if self.scale_clamp is None:
            return raw, shift
        return self.scale_clamp * torch.tanh(raw / self.scale_clamp), shift

    def _scale_and_shift(self, transform_params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_scale, shift = self._log_scale_and_shift(transform_params)
        return torch.exp(log_scale), shift

    def _coupling_transform_forward(self, inputs, transform_params):
        log_scale, shift = self._log_scale_and_shift(transform_params)
        outputs = inputs * torch.exp(log_scale) + shift
        return outputs, log_scale.reshape(log_scale.shape[0], -1).sum(dim=1)

    def _coupling_transform_inverse(self, inputs, transform_params):
        log_scale, shift = self._log_scale_and_shift(transform_params)
        outputs = (inputs - shift) * torch.exp(-log_scale)
        return outputs, -log_scale.reshape(log_scale.shape[0], -1).sum(dim=1)


class CouplingMLP(nn.Module):
    """Conditioner of a coupling: MLP ``identity features -> [shift, log-scale]``.

    Linear layers of widths ``hidden`` with LeakyReLU in between. The last layer is
    initialised to zero, so the coupling starts as the identity map and the flow starts as
    (ActNorm-normalised) data, which makes the first steps of maximum-likelihood training
    well behaved. ``context`` is accepted (nflows calls ``net(x, context)``) and ignored.
    """

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (64, 64), negative_slope: float = 0.01):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        widths = [int(in_features), *(int(h) for h in hidden)]
        if any(w < 1 for w in widths):
            raise ValueError(f"hidden widths must be >= 1, got {tuple(hidden)}")
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.LeakyReLU(negative_slope)]
        last = nn.Linear(widths[-1], int(out_features))
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


def build_style_flow(
    features: int,
    num_blocks: int = 4,
    hidden: Sequence[int] | None = None,
    scale_clamp: float | None = 5.0,
    base: str = "standard",
    input_actnorm: bool = True,
) -> Flow:
    """Build a RealNVP flow for ``features``-dimensional style statistics.

    Structure: ``[ActNorm] + num_blocks x [ClampedAffineCoupling, ActNorm]`` with alternating
    even / odd channel masks (so every feature is transformed in every second block; works for
    odd ``features`` too). The optional leading ActNorm (default on) standardises the raw
    statistics before the first coupling's MLP sees them -- style statistics can have very
    different scales per channel. Coupling MLPs have hidden widths ``hidden`` (default
    ``(C, 2C, C)``, e.g. ``[32, 64, 32]`` for 32 channels).

    ``base``: ``"standard"`` -- fixed ``N(0, I)`` (paper), or ``"diagonal"`` -- trainable
    diagonal Gaussian (reference code).

    ActNorm layers initialise from the first batch they see in training mode; :func:`msf_monai.flow_fit.fit_flow`
    takes care of that.
    """
    features = int(features)
    if features < 2:
        raise ValueError(f"a coupling flow needs at least 2 features, got {features}")
    if int(num_blocks) < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    widths = tuple(hidden) if hidden is not None else (features, 2 * features, features)

    def make_net(in_f: int, out_f: int) -> nn.Module:
        return CouplingMLP(in_f, out_f, widths)

    transforms: list[nn.Module] = [ActNorm(features)] if input_actnorm else []
    idx = torch.arange(features)
    for block in range(int(num_blocks)):
        mask = ((idx + block) % 2 == 0).to(torch.int64)  # 1 = transformed, 0 = conditioned on
        transforms.append(ClampedAffineCoupling(mask, make_net, scale_clamp=scale_clamp))
        transforms.append(ActNorm(features))
    distribution = StandardNormal([features]) if base == "standard" else DiagonalNormal([features])
    return Flow(CompositeTransform(transforms), distribution)
