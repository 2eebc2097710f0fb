"""RealNVP style flows: learn the distribution of feature styles and sample new ones.

MixStyleFlow describes the "style" of an image by per-channel statistics of an image-decoder
feature map: the spatial mean and the spatial spread (standard deviation, or variance in the
reference code) of every channel. For every style layer two RealNVP flows are fitted to the
statistics recorded over the training images -- a mean flow ("MuFlow") and a spread flow
("STDFlow"). New styles are drawn by sampling the base distribution at a temperature
``T > 1`` and mapping the draws back through the flows, which yields plausible but more diverse
styles than the training set contains.

Building blocks (all on top of ``nflows``):

* :class:`ClampedAffineCoupling` -- a RealNVP affine coupling with an ``exp`` scale (nflows'
  own affine coupling squashes its scale into ``(0, 1.001]``);
* :class:`CouplingMLP` -- the conditioner network of a coupling, zero-initialised so that every
  coupling starts as the identity;
* :func:`build_style_flow`, :func:`fit_flow`, :func:`sample_flow` -- build, train (maximum
  likelihood) and sample (temperature, with a guard against non-finite / exploding draws);
* :class:`StyleFlowBank` -- the pair of flows for each style layer, with fitting, sampling,
  likelihood scores and a single-file, ``weights_only``-loadable checkpoint format.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from nflows.distributions import DiagonalNormal, StandardNormal
from nflows.flows import Flow
from nflows.transforms import ActNorm, AffineCouplingTransform, CompositeTransform
from torch import nn

__all__ = [
    "ClampedAffineCoupling",
    "CouplingMLP",
    "FlowFitError",
    "StyleFlowBank",
    "StylePool",
    "build_style_flow",
    "fit_flow",
    "sample_flow",
    "DEFAULT_TEMPERATURES",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "DEFAULT_GUARD_RANGE",
]

_LOGGER = logging.getLogger("msf_monai.flows")

#: Sampling temperatures of the paper for image-decoder layers 2, 3 and 4 (others: 1.0).
DEFAULT_TEMPERATURES: dict[int, float] = {2: 3.5, 3: 2.5, 4: 1.5}
CHECKPOINT_FORMAT = "msf_monai.StyleFlowBank"
CHECKPOINT_VERSION = 2  # 2: the observed range of the fitted statistics (relative sampling guard)
#: Default of :attr:`StyleFlowBank.guard_range`: a sampled style is redrawn when any channel
#: lies more than this many times the channel's observed range outside that range.
DEFAULT_GUARD_RANGE = 1.0
_STATISTICS = ("std", "variance")
_BASES = ("standard", "diagonal")


class FlowFitError(RuntimeError, FloatingPointError):
    """Flow training produced a non-finite loss or gradient (the fit diverged).

    Derives from both :class:`RuntimeError` and :class:`FloatingPointError` so either can be
    caught.
    """


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------


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

    ActNorm layers initialise from the first batch they see in training mode; :func:`fit_flow`
    takes care of that.
    """
    features = int(features)
    if features < 2:
        raise ValueError(f"a coupling flow needs at least 2 features, got {features}")
    if int(num_blocks) < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if base not in _BASES:
        raise ValueError(f"base must be one of {_BASES}, got {base!r}")
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


# ---------------------------------------------------------------------------------------------
# fitting and sampling
# ---------------------------------------------------------------------------------------------


def _flow_param(flow: nn.Module) -> torch.Tensor:
    return next(flow.parameters())


def _as_data(data: Any, name: str = "data", min_rows: int = 2) -> torch.Tensor:
    """Validate ``data`` as a finite 2-D ``[N, C]`` array with ``N >= min_rows``; return float32."""
    if isinstance(data, np.ndarray):
        if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
            raise ValueError(f"{name} must be a real numeric array, got dtype {data.dtype}")
        data = torch.from_numpy(np.ascontiguousarray(data))
    elif not isinstance(data, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(data).__name__}")
    if data.is_complex() or data.dtype == torch.bool:
        raise ValueError(f"{name} must be a real numeric tensor, got dtype {data.dtype}")
    if data.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, C], got shape {tuple(data.shape)}")
    if data.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows (samples), got {data.shape[0]}")
    data = data.detach().to(torch.float32)
    bad = int((~torch.isfinite(data)).sum())
    if bad:
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN/Inf or float32 overflow) out of {data.numel()}")
    return data


@torch.no_grad()
def initialise_actnorms(flow: Flow, x: torch.Tensor, logger: logging.Logger) -> None:
    """Data-dependent ActNorm initialisation on ``x`` (a reasonably large batch).

    Does what nflows' ActNorm does on its first training batch, layer by layer, but floors the
    standard deviation so a constant column cannot produce ``inf``/``NaN`` parameters.
    """
    transform = flow._transform
    layers = list(transform._transforms) if isinstance(transform, CompositeTransform) else [transform]
    h = x
    for layer in layers:
        if isinstance(layer, ActNorm) and not bool(layer.initialized):
            std = h.std(dim=0)
            tiny = 1e-6 * (1.0 + h.abs().mean(dim=0))
            degenerate = ~(std > tiny)
            if bool(degenerate.any()):  # summarised once per fit by StyleFlowBank.fit
                logger.debug(
                    "ActNorm init: %d (near-)constant feature(s) %s; using unit scale for them",
                    int(degenerate.sum()),
                    torch.nonzero(degenerate).flatten().tolist()[:20],
                )
            std = torch.where(degenerate, torch.ones_like(std), std)
            layer.log_scale.data.copy_(-torch.log(std))
            layer.shift.data.copy_(-(h / std).mean(dim=0))
            layer.initialized.data = torch.tensor(True, dtype=torch.bool, device=layer.initialized.device)
        h, _ = layer(h)


def _mean_nll(flow: Flow, x: torch.Tensor, batch: int = 4096) -> float:
    with torch.no_grad():
        total = 0.0
        for i in range(0, x.shape[0], batch):
            total += float(-flow.log_prob(x[i : i + batch]).sum())
    return total / x.shape[0]


def check_fit_settings(epochs: int, batch_size: int, lr: float) -> None:
    """``ValueError`` for fit settings no fit can run with (separate and joint fits alike)."""
    if int(epochs) < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not (lr > 0):
        raise ValueError(f"lr must be > 0, got {lr}")


def fit_flow(
    flow: Flow,
    data: torch.Tensor | np.ndarray,
    epochs: int = 100,
    lr: float = 1e-4,
    batch_size: int = 20,
    grad_clip: float | None = 5.0,
    weight_decay: float = 0.01,
    val_data: torch.Tensor | np.ndarray | None = None,
    seed: int | None = None,
    log_every: int = 10,
    logger: logging.Logger | None = None,
    init_samples: int = 2048,
    restore_best: bool = True,
    resume_state: Mapping[str, Any] | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[dict], None] | None = None,
) -> list[dict[str, float]]:
    """Maximum-likelihood training of ``flow`` on ``data`` ``[N, C]`` (AdamW, shuffled batches).

    With ``val_data`` and ``restore_best``, the flow ends with the weights of the epoch of lowest
    validation NLL (early stopping: style statistics are few, a flow overfits them quickly).

    Before the first step the ActNorm layers are initialised on a random subset of up to
    ``init_samples`` rows (all rows if fewer) instead of on the first mini-batch, which would be
    a noisy estimate with the small paper batch size of 20. Gradients are clipped to
    ``grad_clip`` (total norm; ``None`` = no clipping). Returns one dict per epoch with
    ``"epoch"`` (1-based), ``"train_nll"`` (mean NLL per sample over the epoch's batches) and,
    if ``val_data`` is given, ``"val_nll"`` (eval mode). The flow is left in eval mode.

    Resumable: every ``checkpoint_every`` epochs (and when the fit ends, with ``"finished":
    True``) ``on_checkpoint(state)`` receives the full fit state (flow and optimiser state,
    epoch, history, best epoch so far, the shuffling generator's state), plain tensors and
    values ready for ``torch.save``. Passing such a state back as ``resume_state`` continues
    the fit after that epoch, with the same result as an uninterrupted fit; a finished state
    only restores the final weights.

    Raises ``ValueError`` for invalid data and :class:`FlowFitError` when the loss or the
    gradient norm becomes non-finite (the fit diverged: lower ``lr`` or ``scale_clamp``).
    """
    log = logger or _LOGGER
    check_fit_settings(epochs, batch_size, lr)
    ref = _flow_param(flow)
    x = _as_data(data, "data").to(ref.device)
    features = getattr(flow._distribution, "_shape", None)
    if features is not None and tuple(features) != (x.shape[1],):
        raise ValueError(f"data has {x.shape[1]} features but the flow expects {tuple(features)}")
    xv = None
    if val_data is not None:
        xv = _as_data(val_data, "val_data", min_rows=1).to(ref.device)
        if xv.shape[1] != x.shape[1]:
            raise ValueError(f"val_data has {xv.shape[1]} features, data has {x.shape[1]}")

    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(int(seed))
    else:
        gen.seed()
    n = x.shape[0]

    flow.train()
    optimiser = torch.optim.AdamW(flow.parameters(), lr=lr, weight_decay=weight_decay)
    history: list[dict[str, float]] = []
    best_nll, best_state = math.inf, None
    first_epoch = 1
    if resume_state is not None:
        flow.load_state_dict(resume_state["flow"])
        if resume_state.get("finished"):
            flow.eval()
            log.info("flow fit already finished (%d epochs): restored its final weights", int(resume_state["epoch"]))
            return [dict(r) for r in resume_state["history"]]
        optimiser.load_state_dict(resume_state["optimiser"])
        gen.set_state(resume_state["generator"])
        history = [dict(r) for r in resume_state["history"]]
        best_nll = float(resume_state["best_nll"])
        best_state = resume_state.get("best_state")
        first_epoch = int(resume_state["epoch"]) + 1
        log.info("resuming the flow fit after epoch %d of %d", first_epoch - 1, int(epochs))
    else:
        init_idx = torch.randperm(n, generator=gen)[: max(2, min(n, int(init_samples)))].to(ref.device)
        initialise_actnorms(flow, x[init_idx], log)

    def fit_state(epoch: int, finished: bool = False) -> dict:
        return {
            "epoch": int(epoch),
            "finished": bool(finished),
            "flow": {k: v.detach().cpu().clone() for k, v in flow.state_dict().items()},
            "optimiser": detached_cpu_copy(optimiser.state_dict()),
            "generator": gen.get_state(),
            "history": [dict(r) for r in history],
            "best_nll": float(best_nll),
            "best_state": None if best_state is None else {k: v.detach().cpu().clone() for k, v in best_state.items()},
        }

    bs = int(batch_size)
    for epoch in range(first_epoch, int(epochs) + 1):
        flow.train()
        perm = torch.randperm(n, generator=gen).to(ref.device)
        total, count = 0.0, 0
        for b, start in enumerate(range(0, n, bs)):
            batch = x[perm[start : start + bs]]
            loss = -flow.log_prob(batch).mean()
            if not torch.isfinite(loss):
                raise FlowFitError(
                    f"flow fit diverged: non-finite NLL ({float(loss.detach())}) at epoch {epoch}, batch {b} "
                    f"(lr={lr}); try a lower learning rate or scale_clamp"
                )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for p in flow.parameters() if p.grad is not None]
            if grad_clip is not None:
                gnorm = torch.nn.utils.clip_grad_norm_(params, float(grad_clip))
            else:
                gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            if not torch.isfinite(gnorm):
                raise FlowFitError(
                    f"flow fit diverged: non-finite gradient norm at epoch {epoch}, batch {b} (lr={lr})"
                )
            optimiser.step()
            total += float(loss.detach()) * batch.shape[0]
            count += batch.shape[0]
        record: dict[str, float] = {"epoch": epoch, "train_nll": total / count}
        if xv is not None:
            flow.eval()
            record["val_nll"] = _mean_nll(flow, xv)
            if restore_best and record["val_nll"] < best_nll:
                best_nll = record["val_nll"]
                best_state = {k: v.detach().clone() for k, v in flow.state_dict().items()}
        history.append(record)
        if log_every and (epoch % int(log_every) == 0 or epoch == int(epochs)):
            extra = f", val NLL {record['val_nll']:.4f}" if "val_nll" in record else ""
            log.info("flow epoch %d/%d: train NLL %.4f%s", epoch, int(epochs), record["train_nll"], extra)
        if on_checkpoint is not None and checkpoint_every and epoch % int(checkpoint_every) == 0 and epoch < int(epochs):
            on_checkpoint(fit_state(epoch))
    if best_state is not None:
        flow.load_state_dict(best_state)
        best = min(history, key=lambda r: r["val_nll"])
        log.info("kept the weights of epoch %d (lowest validation NLL %.4f)", best["epoch"], best["val_nll"])
    flow.eval()
    if on_checkpoint is not None:
        on_checkpoint(fit_state(int(epochs), finished=True))
    return history


def detached_cpu_copy(value: Any) -> Any:
    """A detached CPU copy of nested dicts/lists of tensors (an optimiser state)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, Mapping):
        return {k: detached_cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(detached_cpu_copy(v) for v in value)
    return value


def _summary(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel ``low``, ``high`` and ``std`` of statistics ``[N, C]`` (the relative guard's
    range and the scale in which perturbations are measured)."""
    values = values.detach().float()
    return {"low": values.amin(0), "high": values.amax(0), "std": values.std(0, correction=0)}


def _base_noise(flow: Flow, n: int, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` draws of the base distribution with its spread scaled by ``temperature``."""
    ref = _flow_param(flow)
    dist = flow._distribution
    shape = tuple(dist._shape)
    if isinstance(dist, StandardNormal):
        eps = torch.randn((n, *shape), generator=generator, device=ref.device, dtype=ref.dtype)
        return temperature * eps
    if isinstance(dist, DiagonalNormal):
        eps = torch.randn((n, *shape), generator=generator, device=ref.device, dtype=ref.dtype)
        mean = dist.mean_.reshape(1, *shape)
        std = torch.exp(dist.log_std_).reshape(1, *shape)
        return mean + temperature * std * eps
    raise NotImplementedError(f"temperature sampling is not implemented for base {type(dist).__name__}")


def sample_flow(
    flow: Flow,
    n: int,
    temperature: float = 1.0,
    max_abs: float = 1e4,
    max_tries: int = 10,
    generator: torch.Generator | None = None,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int]:
    """Draw ``n`` samples ``[n, C]`` at ``temperature``; return ``(samples, n_replaced)``.

    ``z = T * eps`` (standard base) or ``mean + T * std * eps`` (diagonal base) is mapped
    through the inverse transform, in eval mode and without gradients (the previous mode is
    restored). Guard: rows with a non-finite entry, ``|x| > max_abs`` or (with ``bounds =
    (low [C], high [C])``) an entry outside ``[low, high]`` are redrawn at the same temperature
    up to ``max_tries`` rounds, then at temperature 1 (up to ``max_tries`` more rounds); rows
    still outside the bounds are then clamped into them (with a warning), and rows still
    non-finite or over ``max_abs`` raise a ``RuntimeError``. ``n_replaced`` is the number of rows
    of the first draw that had to be replaced. Reproducible: pass a seeded ``torch.Generator`` (or seed
    the global RNG with ``torch.manual_seed``).
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not (max_abs > 0):
        raise ValueError(f"max_abs must be > 0, got {max_abs}")
    if generator is not None and generator.device != _flow_param(flow).device:
        raise ValueError(f"generator is on {generator.device} but the flow is on {_flow_param(flow).device}")

    def draw(m: int, t: float) -> torch.Tensor:
        return flow._transform.inverse(_base_noise(flow, m, t, generator))[0]

    low = high = None
    if bounds is not None:
        low, high = (torch.as_tensor(b).to(_flow_param(flow)) for b in bounds)

    def broken_rows(x: torch.Tensor) -> torch.Tensor:
        return ~torch.isfinite(x).all(dim=1) | (x.abs() > max_abs).any(dim=1)

    def bad_rows(x: torch.Tensor) -> torch.Tensor:
        bad = broken_rows(x)
        if low is not None:
            bad |= ((x < low) | (x > high)).any(dim=1)
        return bad

    was_training = flow.training
    if was_training:  # switching modes walks every submodule: skip it on the hot path
        flow.eval()
    try:
        with torch.no_grad():
            x = draw(n, float(temperature))
            bad = bad_rows(x)
            n_replaced = int(bad.sum())
            rounds = [float(temperature)] * int(max_tries) + [1.0] * max(1, int(max_tries))
            for t in rounds:
                if not bool(bad.any()):
                    break
                idx = torch.nonzero(bad).flatten()
                x[idx] = draw(idx.numel(), t)
                bad = bad_rows(x)
            if bool(bad.any()) and low is not None and not bool(broken_rows(x).any()):
                # finite rows that keep leaving the bounds: pull them in rather than stop training
                _LOGGER.warning("sample_flow: %d of %d samples stayed outside the guard bounds after resampling; "
                                "clamped into them", int(bad.sum()), n)
                x = x.clamp(low, high)
                bad = bad_rows(x)
            if bool(bad.any()):
                raise RuntimeError(
                    f"sample_flow: {int(bad.sum())} of {n} samples are still non-finite or exceed "
                    f"|x| > {max_abs} after resampling at T={temperature} and T=1; the flow looks broken"
                )
    finally:
        if was_training:
            flow.train()
    return x, n_replaced


# ---------------------------------------------------------------------------------------------
# the bank of style flows
# ---------------------------------------------------------------------------------------------


def _plain(value: Any, where: str) -> Any:
    """Convert ``value`` to types ``torch.load(weights_only=True)`` accepts, or raise TypeError."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if isinstance(k, np.generic):
                k = k.item()
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"{where}: dict keys must be str or int, got {k!r}")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    raise TypeError(f"{where}: value of type {type(value).__name__} cannot be stored in a weights_only checkpoint")


class _FlowJob(NamedTuple):
    """One flow of a bank to fit: its history key, name in messages, module, rows and seed."""

    key: str
    label: str
    flow: Flow
    train: torch.Tensor
    val: torch.Tensor | None
    seed: int


class StyleFlowBank(nn.Module):
    """Mean flow ("MuFlow") and spread flow ("STDFlow") for every style layer.

    ``layer_channels`` maps a style layer id (e.g. image-decoder layers ``2, 3, 4``) to its
    channel count. ``statistic`` says what the spread flow models: ``"std"`` -- the per-channel
    standard deviation (paper) or ``"variance"`` -- the variance (reference code). Statistics
    are always *given* as variances (as recorded) and :meth:`sample` always *returns* standard
    deviations. Sampling temperatures default to the paper's ``{2: 3.5, 3: 2.5, 4: 1.5}``
    (1.0 for other layers).
    """

    def __init__(
        self,
        layer_channels: Mapping[int, int],
        temperatures: Mapping[int, float] | None = None,
        statistic: str = "std",
        num_blocks: int = 4,
        scale_clamp: float | None = 5.0,
        base: str = "standard",
    ):
        super().__init__()
        if not isinstance(layer_channels, Mapping) or not layer_channels:
            raise ValueError("layer_channels must be a non-empty mapping {layer: channels}")
        channels: dict[int, int] = {}
        for layer, ch in layer_channels.items():
            try:
                key = int(layer)
            except (TypeError, ValueError):
                raise ValueError(f"layer ids must be integers, got {layer!r}") from None
            if int(ch) < 2 or int(ch) != ch:
                raise ValueError(f"layer {key}: need an integer channel count >= 2 for a coupling flow, got {ch!r}")
            channels[key] = int(ch)
        if temperatures is None:
            temps = {layer: float(DEFAULT_TEMPERATURES.get(layer, 1.0)) for layer in channels}
        else:
            temps = {int(k): float(v) for k, v in temperatures.items()}
            if set(temps) != set(channels):
                raise ValueError(
                    f"temperatures keys {sorted(temps)} do not match layer_channels keys {sorted(channels)}"
                )
            for layer, t in temps.items():
                if not (math.isfinite(t) and t > 0):
                    raise ValueError(f"layer {layer}: temperature must be a positive finite number, got {t}")
        if statistic not in _STATISTICS:
            raise ValueError(f"statistic must be one of {_STATISTICS}, got {statistic!r}")
        if base not in _BASES:
            raise ValueError(f"base must be one of {_BASES}, got {base!r}")

        self._channels = dict(sorted(channels.items()))
        self.temperatures = dict(sorted(temps.items()))
        self.statistic = statistic
        self.num_blocks = int(num_blocks)
        self.scale_clamp = None if scale_clamp is None else float(scale_clamp)
        self.base = base
        self.metadata: dict[str, Any] = {}
        #: per layer and flow (``"mean"``/``"spread"``, in the flow's own space; ``"sigma"``: the
        #: channel std whatever ``statistic`` is): per-channel ``low``/``high`` (observed range)
        #: and ``std`` of the statistics the flows were fitted on; set by :meth:`fit`, saved with
        #: the bank (empty for checkpoints of version 1)
        self.observed: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        #: relative sampling guard: a sampled style is redrawn when any channel lies more than
        #: ``guard_range`` x its observed range outside that range (``None``: no relative guard)
        self.guard_range: float | None = DEFAULT_GUARD_RANGE
        self.last_replaced: dict[str, int] = {}
        #: per layer, over the bank's life: samples drawn and replaced by the guard (mean + spread)
        self.guard_counts: dict[int, dict[str, int]] = {}
        self.mean_flows = nn.ModuleDict(
            {str(k): build_style_flow(c, self.num_blocks, scale_clamp=self.scale_clamp, base=base) for k, c in self._channels.items()}
        )
        self.spread_flows = nn.ModuleDict(
            {str(k): build_style_flow(c, self.num_blocks, scale_clamp=self.scale_clamp, base=base) for k, c in self._channels.items()}
        )

    # -- introspection ---------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        """Sorted style layer ids."""
        return list(self._channels)

    @property
    def layer_channels(self) -> dict[int, int]:
        return dict(self._channels)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (plain types) -- enough to rebuild an identical bank."""
        return {
            "layer_channels": dict(self._channels),
            "temperatures": dict(self.temperatures),
            "statistic": self.statistic,
            "num_blocks": self.num_blocks,
            "scale_clamp": self.scale_clamp,
            "base": self.base,
        }

    @property
    def is_fitted(self) -> bool:
        """True when every ActNorm of every flow has been data-initialised (i.e. fitted)."""
        return all(bool(m.initialized) for m in self.modules() if isinstance(m, ActNorm))

    def _check_layer(self, layer: int) -> int:
        try:
            key = int(layer)
        except (TypeError, ValueError):
            raise KeyError(f"unknown style layer {layer!r}; the bank has layers {self.layers}") from None
        if key not in self._channels:
            raise KeyError(f"unknown style layer {layer!r}; the bank has layers {self.layers}")
        return key

    def extra_repr(self) -> str:
        return f"layer_channels={self._channels}, temperatures={self.temperatures}, statistic={self.statistic!r}"

    # -- statistics handling ---------------------------------------------------------------

    def _spread_from_var(self, var: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(var.clamp_min(0.0)) if self.statistic == "std" else var

    def _validated_stats(self, stats: Mapping[Any, Mapping[str, Any]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        if not isinstance(stats, Mapping):
            raise ValueError(f"stats must be a mapping {{layer: {{'mean': [N, C], 'var': [N, C]}}}}, got {type(stats).__name__}")
        by_int: dict[int, Any] = {}
        for k, v in stats.items():
            try:
                by_int[int(k)] = v
            except (TypeError, ValueError):
                continue
        missing = [layer for layer in self.layers if layer not in by_int]
        if missing:
            raise ValueError(f"stats are missing layer(s) {missing}; got layers {sorted(by_int)}")
        out = {}
        for layer, ch in self._channels.items():
            entry = by_int[layer]
            if not isinstance(entry, Mapping) or "mean" not in entry or "var" not in entry:
                raise ValueError(f"stats[{layer}] must be a mapping with 'mean' and 'var' arrays")
            arrays = {}
            for name in ("mean", "var"):
                arr = _as_data(entry[name], f"layer {layer} statistic '{name}'")
                if arr.shape[1] != ch:
                    raise ValueError(f"layer {layer} statistic '{name}' has {arr.shape[1]} channels, the bank expects {ch}")
                arrays[name] = arr
            if arrays["mean"].shape[0] != arrays["var"].shape[0]:
                raise ValueError(
                    f"layer {layer}: 'mean' has {arrays['mean'].shape[0]} rows but 'var' has {arrays['var'].shape[0]}"
                )
            neg = int((arrays["var"] < 0).sum())
            if neg:
                raise ValueError(f"layer {layer} statistic 'var' has {neg} negative value(s); variances must be >= 0")
            out[layer] = (arrays["mean"], arrays["var"])
        return out

    # -- fitting ---------------------------------------------------------------------------

    def fit(
        self,
        stats: Mapping[Any, Mapping[str, Any]],
        epochs: int = 100,
        lr: float = 1e-4,
        batch_size: int = 20,
        grad_clip: float | None = 5.0,
        weight_decay: float = 0.01,
        val_fraction: float = 0.1,
        seed: int = 0,
        log_every: int = 10,
        logger: logging.Logger | None = None,
        resume_state: Mapping[str, Mapping] | None = None,
        checkpoint_every: int = 0,
        on_checkpoint: Callable[[dict], None] | None = None,
        joint: bool = True,
    ) -> dict[str, list[dict[str, float]]]:
        """Fit all ``2 x L`` flows to recorded statistics.

        ``stats[layer] = {"mean": [N, C], "var": [N, C]}`` (per-image channel means and
        variances). A random ``val_fraction`` of the images (same split for both flows of a
        layer, kept only if it leaves >= 2 training rows) is held out to report validation NLL.
        Returns the per-epoch histories keyed ``"mean_<layer>"`` / ``"spread_<layer>"``.

        ``joint`` (default): all flows are fitted at once as one batched module
        (:func:`msf_monai.flow_stack.fit_flows_jointly`; same batches, steps and early stopping
        per flow as separate fits, several times faster); ``False``: one after another with
        :func:`fit_flow`.

        Statistics with non-finite values are rejected (``ValueError`` naming the layer); a
        diverging fit raises :class:`FlowFitError` naming the flow and its layer.

        Resumable (see :func:`fit_flow`): ``on_checkpoint(states)`` receives the fit state
        every ``checkpoint_every`` epochs and when the fit ends (joint: ``{"joint": state}``;
        one after another: ``{"<kind>_<layer>": state}`` of every flow started so far);
        ``resume_state`` (such a dict) continues the fit. A state of the other kind is
        continued the way it was saved.
        """
        from msf_monai.flow_stack import fit_flows_jointly

        log = logger or _LOGGER
        if not (0.0 <= val_fraction < 1.0):
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        data = self._validated_stats(stats)
        histories: dict[str, list[dict[str, float]]] = {}
        states: dict[str, dict] = {k: dict(v) for k, v in (resume_state or {}).items()}
        if states:
            joint = "joint" in states
        constant: list[str] = []
        jobs: list[_FlowJob] = []
        for i, (layer, (mean, var)) in enumerate(data.items()):
            spread = self._spread_from_var(var)
            for kind, values in (("mean", mean), ("spread", spread)):
                n_const = int((values.std(dim=0) <= 1e-6 * (1.0 + values.abs().mean(dim=0))).sum())
                if n_const:
                    constant.append(f"layer {layer} {kind} {n_const}/{values.shape[1]}")
            self.observed[layer] = {
                kind: _summary(values) for kind, values in (("mean", mean), ("spread", spread), ("sigma", var.clamp_min(0).sqrt()))
            }
            n = mean.shape[0]
            n_val = int(round(n * val_fraction))
            if n_val >= 1 and n - n_val >= 2:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 7919 * layer))
                tr, va = perm[n_val:], perm[:n_val]
            else:
                tr, va = torch.arange(n), None
            for j, (kind, flows, values) in enumerate((("mean", self.mean_flows, mean), ("spread", self.spread_flows, spread))):
                jobs.append(_FlowJob(f"{kind}_{layer}", f"{kind} flow of style layer {layer}", flows[str(layer)], values[tr],
                                     None if va is None else values[va], int(seed) + 2 * i + j))
        settings = dict(epochs=epochs, lr=lr, batch_size=batch_size, grad_clip=grad_clip, weight_decay=weight_decay,
                        log_every=log_every, logger=log, checkpoint_every=checkpoint_every)
        if joint:
            log.info("fitting %d flows jointly on %d samples each (%s)", len(jobs), len(jobs[0].train),
                     ", ".join(f"{job.key}: {job.train.shape[1]} channels" for job in jobs))

            def checkpoint_joint(state: dict) -> None:
                if on_checkpoint is not None:
                    on_checkpoint({"joint": state})

            labels = {job.key: job.label for job in jobs}
            try:
                results = fit_flows_jointly(
                    [job.flow for job in jobs], [job.train for job in jobs], [job.key for job in jobs], [job.seed for job in jobs],
                    val_data=None if jobs[0].val is None else [job.val for job in jobs], resume_state=states.get("joint"),
                    on_checkpoint=checkpoint_joint, **settings)
            except FlowFitError as err:
                if getattr(err, "flow_name", None) in labels:
                    raise FlowFitError(f"{labels[err.flow_name]}: {err.detail}") from err
                raise
            histories = {job.key: h for job, h in zip(jobs, results)}
        for key, label, flow, x_train, x_val, flow_seed in ([] if joint else jobs):
            log.info("fitting %s on %d samples x %d channels", label, len(x_train), x_train.shape[1])

            def checkpoint(state: dict, key: str = key) -> None:
                states[key] = state
                if on_checkpoint is not None:
                    on_checkpoint(dict(states))

            try:
                histories[key] = fit_flow(flow, x_train, val_data=x_val, seed=flow_seed, resume_state=states.get(key),
                                          on_checkpoint=checkpoint, **settings)
            except FlowFitError as err:
                raise FlowFitError(f"{label}: {err}") from err
        if constant:
            log.info("(near-)constant style channels, e.g. channels a ReLU never activates (the flows give them unit "
                     "scale and the sampling guard leaves them unbounded): %s", ", ".join(constant))
        self.eval()
        return histories

    # -- sampling and scoring --------------------------------------------------------------

    def sampling_bounds(self, layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(low, high)`` per channel that a sampled ``kind`` (``"mean"``/``"spread"``) statistic
        of ``layer`` must lie in: the observed range widened by :attr:`guard_range` times its
        width on each side (channels that were constant are left unbounded); ``None`` when there
        is no relative guard (``guard_range=None`` or a version-1 checkpoint without the observed
        range)."""
        obs = self.observed.get(self._check_layer(layer))
        if obs is None or self.guard_range is None:
            return None
        low, high = obs[kind]["low"], obs[kind]["high"]
        width = high - low
        # a channel that was (almost) constant gives no usable range: it is left unbounded
        degenerate = width <= 1e-6 * (1.0 + torch.maximum(low.abs(), high.abs()))
        inf = torch.full_like(low, float("inf"))
        return (torch.where(degenerate, -inf, low - self.guard_range * width),
                torch.where(degenerate, inf, high + self.guard_range * width))

    def sample(
        self,
        layer: int,
        n: int,
        temperature: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``n`` styles of ``layer``: ``(mean [n, C], std [n, C])`` on the bank's device,
        in float32 (also under ``torch.autocast``).

        ``temperature=None`` uses the layer's configured temperature. The returned spread is
        always a standard deviation: ``sqrt(clamp(var, 1e-8))`` for ``statistic="variance"``,
        ``clamp(std, 1e-4)`` for ``"std"`` (so spreads stay positive). Guard: a row with a
        non-finite value, or with a channel outside :meth:`sampling_bounds` (the observed range
        of the fitted statistics widened by :attr:`guard_range` times its width on each side),
        is redrawn (:func:`sample_flow`). Replaced rows and clamped entries are recorded in
        :attr:`last_replaced` (totals per layer in :attr:`guard_counts`) and logged as a warning
        with their number.
        """
        key = self._check_layer(layer)
        t = self.temperatures[key] if temperature is None else float(temperature)
        if not getattr(self, "_known_fitted", False):  # walking the modules costs ~1 ms: once
            self._known_fitted = self.is_fitted
            if not self._known_fitted:
                _LOGGER.warning("StyleFlowBank.sample: the flows have not been fitted; samples are meaningless")
        if self.guard_range is not None and key not in self.observed and not getattr(self, "_warned_no_range", False):
            self._warned_no_range = True
            _LOGGER.warning(
                "StyleFlowBank.sample: this bank has no observed statistics range (fitted by an older "
                "version); only the absolute guard |x| <= 1e4 applies. Run Phase II again for the relative guard."
            )
        device_type = _flow_param(self.mean_flows[str(key)]).device.type
        with torch.autocast(device_type, enabled=False):  # styles in float32 inside an AMP step too
            mean, n_mean = sample_flow(self.mean_flows[str(key)], n, t, generator=generator, bounds=self.sampling_bounds(key, "mean"))
            spread, n_spread = sample_flow(
                self.spread_flows[str(key)], n, t, generator=generator, bounds=self.sampling_bounds(key, "spread")
            )
        if self.statistic == "variance":
            floor = 1e-8
            n_clamped = int((spread < floor).sum())
            std = torch.sqrt(spread.clamp_min(floor))
        else:
            floor = 1e-4
            n_clamped = int((spread < floor).sum())
            std = spread.clamp_min(floor)
        self.last_replaced = {"layer": key, "mean": n_mean, "spread": n_spread, "clamped": n_clamped}
        counts = self.guard_counts.setdefault(key, {"drawn": 0, "replaced": 0})
        counts["drawn"] += 2 * int(n)
        counts["replaced"] += n_mean + n_spread
        if n_mean or n_spread:
            _LOGGER.warning(
                "layer %d at T=%.2f: replaced %d mean and %d spread sample(s) that were non-finite or outside the guard range",
                key, t, n_mean, n_spread,
            )
        if n_clamped:
            _LOGGER.debug("layer %d at T=%.2f: clamped %d sampled spread value(s) to >= %g", key, t, n_clamped, floor)
        return mean, std

    def sampler(self, layer: int, pool_size: int = 0) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """``sampler(layer)(n) -> (mean, std)``: a plain callable (not a module) for MixStyleFlow.

        With ``pool_size > 0`` the styles are drawn from the flows ``pool_size`` at a time and
        handed out in order (:class:`StylePool`): the same i.i.d. samples, but one flow pass
        serves many training steps (a flow pass on one row costs about as much as on hundreds).
        """
        key = self._check_layer(layer)
        if pool_size and int(pool_size) > 0:
            return StylePool(self, key, int(pool_size))
        return functools.partial(self.sample, key)

    def log_prob(self, layer: int, mean: torch.Tensor | np.ndarray, var: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Log-likelihood ``[N]`` of style statistics under the layer's two flows (sum of both).

        ``mean`` and ``var`` are ``[N, C]`` channel means and *variances* (converted to std for
        ``statistic="std"``); useful as a style-shift / out-of-distribution score.
        """
        key = self._check_layer(layer)
        ref = _flow_param(self)
        m = _as_data(mean, "mean", min_rows=1).to(ref.device)
        v = _as_data(var, "var", min_rows=1).to(ref.device)
        ch = self._channels[key]
        if m.shape != v.shape or m.shape[1] != ch:
            raise ValueError(f"layer {key}: expected mean and var of shape [N, {ch}], got {tuple(m.shape)} and {tuple(v.shape)}")
        mf, sf = self.mean_flows[str(key)], self.spread_flows[str(key)]
        modes = (mf.training, sf.training)
        mf.eval()
        sf.eval()
        try:
            with torch.no_grad():
                return mf.log_prob(m) + sf.log_prob(self._spread_from_var(v))
        finally:
            mf.train(modes[0])
            sf.train(modes[1])

    # -- persistence -----------------------------------------------------------------------

    def save(self, path: str | os.PathLike, **extra_metadata: Any) -> None:
        """Write the bank to ONE file (atomically), loadable with ``torch.load(weights_only=True)``.

        Content: ``{"format", "version", "config", "state_dict", "metadata"}`` of plain types;
        ``extra_metadata`` must be plain too (numbers, strings, lists, dicts, tensors ...).
        """
        path = os.fspath(path)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": _plain(self.config, "config"),
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
            "metadata": _plain(dict(extra_metadata), "metadata"),
            "observed": {
                str(layer): {kind: {k: v.detach().cpu().clone() for k, v in d.items()} for kind, d in obs.items()}
                for layer, obs in self.observed.items()
            },
        }
        from .files import atomic_save

        atomic_save(payload, path)
        self.metadata = payload["metadata"]

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: Any = "cpu") -> "StyleFlowBank":
        """Rebuild a bank saved with :meth:`save` (``weights_only=True``); returned in eval mode."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"StyleFlowBank checkpoint not found: {path}")
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"{path} is not a readable StyleFlowBank checkpoint: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a StyleFlowBank checkpoint (format tag {CHECKPOINT_FORMAT!r} missing)")
        version = payload.get("version")
        if not isinstance(version, int) or version > CHECKPOINT_VERSION:
            raise ValueError(f"{path}: unsupported StyleFlowBank checkpoint version {version!r} (this code reads <= {CHECKPOINT_VERSION})")
        try:
            config = dict(payload["config"])
            config["layer_channels"] = {int(k): int(v) for k, v in config["layer_channels"].items()}
            config["temperatures"] = {int(k): float(v) for k, v in config["temperatures"].items()}
            bank = cls(**config)
            bank.load_state_dict(payload["state_dict"], strict=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"{path}: corrupt StyleFlowBank checkpoint: {exc}") from exc
        bank.metadata = dict(payload.get("metadata") or {})
        bank.observed = {
            int(layer): {kind: dict(d) for kind, d in obs.items()} for layer, obs in (payload.get("observed") or {}).items()
        }
        if isinstance(map_location, (str, torch.device)):
            bank.to(map_location)
        bank.eval()
        return bank


class StylePool:
    """Hands out styles of one layer of a :class:`StyleFlowBank` from a pool that is refilled
    ``pool_size`` samples at a time (see :meth:`StyleFlowBank.sampler`). Callable as
    ``pool(n) -> (mean [n, C], std [n, C])``; not an ``nn.Module``."""

    def __init__(self, bank: StyleFlowBank, layer: int, pool_size: int = 256):
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.bank, self.layer, self.pool_size = bank, int(layer), int(pool_size)
        self._mean = self._std = None
        self._next = 0

    def __call__(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(n)
        if self._mean is None or self._next + n > self._mean.shape[0]:
            self._mean, self._std = self.bank.sample(self.layer, max(self.pool_size, n))
            self._next = 0
        start, self._next = self._next, self._next + n
        return self._mean[start : self._next], self._std[start : self._next]
