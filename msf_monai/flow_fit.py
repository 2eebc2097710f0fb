"""Fitting a style flow by maximum likelihood, and sampling it at a temperature.

* :func:`fit_flow` -- AdamW on the negative log-likelihood with a validation split, gradient
  clipping, early stopping, resumable state, and a clear :class:`FlowFitError` when it diverges;
* :func:`sample_flow` -- draws of the base distribution scaled by a temperature, mapped back
  through the flow, with a guard against non-finite or exploding draws;
* :func:`as_statistics`, :func:`statistics_summary` -- the checked ``[N, C]`` statistics a flow
  is fitted on and their per-channel range.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from nflows.distributions import DiagonalNormal, StandardNormal
from nflows.flows import Flow
from nflows.transforms import ActNorm, CompositeTransform
from torch import nn

from .saved_state import detached_cpu_copy

__all__ = [
    "FlowFitError",
    "as_statistics",
    "check_fit_settings",
    "fit_flow",
    "flow_parameter",
    "initialise_actnorms",
    "sample_flow",
    "statistics_summary",
]

_LOGGER = logging.getLogger("msf_monai.flows")


class FlowFitError(RuntimeError, FloatingPointError):
    """Flow training produced a non-finite loss or gradient (the fit diverged).

    Derives from both :class:`RuntimeError` and :class:`FloatingPointError` so either can be
    caught.
    """


def flow_parameter(flow: nn.Module) -> torch.Tensor:
    """A parameter of ``flow`` (its device and dtype are the flow's)."""
    return next(flow.parameters())


def as_statistics(data: Any, name: str = "data", min_rows: int = 2) -> torch.Tensor:
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
    ref = flow_parameter(flow)
    x = as_statistics(data, "data").to(ref.device)
    features = getattr(flow._distribution, "_shape", None)
    if features is not None and tuple(features) != (x.shape[1],):
        raise ValueError(f"data has {x.shape[1]} features but the flow expects {tuple(features)}")
    xv = None
    if val_data is not None:
        xv = as_statistics(val_data, "val_data", min_rows=1).to(ref.device)
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
        optimiser.load_state_dict(detached_cpu_copy(resume_state["optimiser"]))  # a copy: the steps update it in place
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


def statistics_summary(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel ``low``, ``high`` and ``std`` of statistics ``[N, C]`` (the relative guard's
    range and the scale in which perturbations are measured)."""
    values = values.detach().float()
    return {"low": values.amin(0), "high": values.amax(0), "std": values.std(0, correction=0)}


def _base_noise(flow: Flow, n: int, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` draws of the base distribution with its spread scaled by ``temperature``."""
    ref = flow_parameter(flow)
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
    if generator is not None and generator.device != flow_parameter(flow).device:
        raise ValueError(f"generator is on {generator.device} but the flow is on {flow_parameter(flow).device}")

    def draw(m: int, t: float) -> torch.Tensor:
        return flow._transform.inverse(_base_noise(flow, m, t, generator))[0]

    low = high = None
    if bounds is not None:
        low, high = (torch.as_tensor(b).to(flow_parameter(flow)) for b in bounds)

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
