"""The bank of style flows: for every style layer a mean flow and a spread flow, with
fitting, sampling, likelihood scores and one ``weights_only``-loadable checkpoint file.

MixStyleFlow describes the "style" of an image by per-channel statistics of a feature map: the
spatial mean and the spatial spread (standard deviation, or variance in the reference code) of
every channel. For every style layer two RealNVP flows (:mod:`msf_monai.flow_model`) are fitted
to the statistics recorded over the training images -- a mean flow ("MuFlow") and a spread flow
("STDFlow") -- with :mod:`msf_monai.flow_fit`. New styles are drawn by sampling the base
distribution at a temperature ``T > 1`` and mapping the draws back through the flows, which
yields plausible but more diverse styles than the training set contains.

* :class:`StyleFlowBank` -- the flows of every layer and their checkpoint format;
* :class:`StylePool` -- styles drawn a pool at a time (one flow pass serves many steps).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from nflows.flows import Flow
from nflows.transforms import ActNorm
from torch import nn

from .files import atomic_save
from .flow_fit import FlowFitError, as_statistics, fit_flow, flow_parameter, sample_flow, statistics_summary
from .flow_model import BASES, build_style_flow
from .flow_stack import fit_flows_jointly

__all__ = [
    "StyleFlowBank",
    "StylePool",
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
        if base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {base!r}")

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
                arr = as_statistics(entry[name], f"layer {layer} statistic '{name}'")
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
        :func:`msf_monai.flow_fit.fit_flow`.

        Statistics with non-finite values are rejected (``ValueError`` naming the layer); a
        diverging fit raises :class:`FlowFitError` naming the flow and its layer.

        Resumable (see :func:`msf_monai.flow_fit.fit_flow`): ``on_checkpoint(states)`` receives the fit state
        every ``checkpoint_every`` epochs and when the fit ends (joint: ``{"joint": state}``;
        one after another: ``{"<kind>_<layer>": state}`` of every flow started so far);
        ``resume_state`` (such a dict) continues the fit. A state of the other kind is
        continued the way it was saved.
        """
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
                kind: statistics_summary(values) for kind, values in (("mean", mean), ("spread", spread), ("sigma", var.clamp_min(0).sqrt()))
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
        is redrawn (:func:`msf_monai.flow_fit.sample_flow`). Replaced rows and clamped entries are recorded in
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
        device_type = flow_parameter(self.mean_flows[str(key)]).device.type
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
        ref = flow_parameter(self)
        m = as_statistics(mean, "mean", min_rows=1).to(ref.device)
        v = as_statistics(var, "var", min_rows=1).to(ref.device)
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
    ``pool(n) -> (mean [n, C], std [n, C])``; not an ``nn.Module``. Its ``state_dict`` (the
    styles not handed out yet) goes into Phase III's training state, so a resumed run hands out
    the same styles as an uninterrupted one."""

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

    def state_dict(self) -> dict:
        """The pool's samples (CPU copies; ``None`` before the first draw) and the next index."""
        if self._mean is None:
            return {"mean": None, "std": None, "next": 0}
        return {"mean": self._mean.detach().cpu(), "std": self._std.detach().cpu(), "next": self._next}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned, on the device of the pool's flows."""
        if state.get("mean") is None:
            self._mean = self._std = None
            self._next = 0
            return
        device = next(iter(self.bank.parameters()), torch.empty(0)).device
        self._mean, self._std = state["mean"].to(device), state["std"].to(device)
        self._next = int(state["next"])
