"""Fit several RealNVP style flows at once, as one batched module.

Phase II fits two flows per style layer (six for the paper's three layers). Each is small (16 to
64 features, batch 20), so fitting them one after another spends its time on per-operation
overhead, not arithmetic. :class:`FlowStack` copies flows built by
:func:`msf_monai.flow_model.build_style_flow` into stacked tensors with a leading flow dimension
(features and hidden widths zero-padded to the widest flow) and evaluates all of them with
batched matrix products. The padding is exact: every entry of the stacked weights that belongs
to no flow weight is zero, so padded features stay zero, conditioning features reach a coupling
only through their own rows and a coupling's shift and scale are zero outside its transformed
features, without masking any activation; a gradient hook zeroes the padded entries' gradients,
so AdamW (an element-wise update) leaves them at zero. Per flow, the sum of the losses has the
flow's own gradient, so with the same batches the joint fit takes the same steps as separate
fits.

:func:`fit_flows_jointly` is :func:`msf_monai.flow_fit.fit_flow` for a list of flows: the same
shuffling (one generator per flow, seeded alike), ActNorm initialisation, per-flow gradient-norm
clipping, early stopping per flow and resumable state. When it ends the weights are copied back
into the nflows modules, so sampling, scores and the checkpoint format do not change.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from nflows.distributions import DiagonalNormal, StandardNormal
from nflows.flows import Flow
from nflows.transforms import ActNorm, CompositeTransform
from torch import nn
from torch.nn import functional as F

from .flow_fit import FlowFitError, check_fit_settings, initialise_actnorms
from .flow_model import ClampedAffineCoupling, CouplingMLP
from .saved_state import detached_cpu_copy

__all__ = ["FlowStack", "fit_flows_jointly"]

_LOGGER = logging.getLogger("msf_monai.flows")
_LOG_2PI = math.log(2 * math.pi)


def _steps(flow: Flow) -> list[nn.Module]:
    transform = flow._transform
    return list(transform._transforms) if isinstance(transform, CompositeTransform) else [transform]


class FlowStack(nn.Module):
    """``G`` style flows of the same structure as one module with stacked parameters.

    ``flows``: flows made by :func:`msf_monai.flow_model.build_style_flow` with the same number of
    blocks, the same input-ActNorm choice, scale clamp and base distribution; feature counts
    and hidden widths may differ. :meth:`log_prob` takes ``[G, B, C_max]`` (flow ``g``'s
    features first, zeros after) and returns ``[G, B]``. :meth:`write_back` copies the stacked
    weights into the original modules.
    """

    def __init__(self, flows: Sequence[Flow]):
        super().__init__()
        if not flows:
            raise ValueError("FlowStack needs at least one flow")
        self._flows = list(flows)  # a plain list: the stack owns copies, not these modules
        plans = [_steps(f) for f in self._flows]
        kinds = {tuple(type(s).__name__ for s in p) for p in plans}
        bases = {type(f._distribution) for f in self._flows}
        if len(kinds) != 1 or len(bases) != 1 or not bases <= {StandardNormal, DiagonalNormal}:
            raise ValueError("the flows of a FlowStack must share their structure (blocks, ActNorms, base distribution)")
        self.features = [int(f._distribution._shape[0]) for f in self._flows]
        groups, width = len(self._flows), max(self.features)
        self.width = width
        self.register_buffer("num_features", torch.tensor(self.features, dtype=torch.float32))
        self.diagonal_base = bases == {DiagonalNormal}

        self._kinds: list[str] = []
        tensors: dict[str, torch.Tensor] = {}  # name -> [G, ...] before flattening
        real: dict[str, torch.Tensor] = {}  # name -> 1 where the entry belongs to a flow weight, 0 for padding
        log_scales, shifts = [], []  # of the ActNorms: [G, C_max] each
        self._coupling_layers: list[list[int]] = []  # per coupling: ids of its linear layers
        self._index: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per linear: per flow (rows, cols)
        self.clamps: list[float | None] = []
        self.slopes: list[float] = []
        for position in range(len(plans[0])):
            steps = [p[position] for p in plans]
            if isinstance(steps[0], ActNorm):
                self._kinds.append("actnorm")
                log_scales.append(self._pad_vectors([s.log_scale for s in steps]))
                shifts.append(self._pad_vectors([s.shift for s in steps]))
                continue
            if not isinstance(steps[0], ClampedAffineCoupling) or not all(isinstance(s.transform_net, CouplingMLP) for s in steps):
                raise ValueError(f"unsupported flow step {type(steps[0]).__name__} (FlowStack takes build_style_flow's flows)")
            clamps = {s.scale_clamp for s in steps}
            if len(clamps) != 1:
                raise ValueError("the flows of a FlowStack must share their scale clamp")
            self._kinds.append("coupling")
            self.clamps.append(clamps.pop())
            linears = [[m for m in s.transform_net.net if isinstance(m, nn.Linear)] for s in steps]
            slopes = {m.negative_slope for s in steps for m in s.transform_net.net if isinstance(m, nn.LeakyReLU)}
            if len({len(ls) for ls in linears}) != 1 or len(slopes) > 1:
                raise ValueError("the coupling networks of a FlowStack must have the same depth and activation")
            self.slopes.append(slopes.pop() if slopes else 0.01)
            depth = len(linears[0])
            layer_ids = []
            n_in = width
            for k in range(depth):
                index = []
                for g, s in enumerate(steps):
                    lin = linears[g][k]
                    rows = torch.arange(lin.out_features)
                    cols = torch.arange(lin.in_features)
                    if k == 0:  # the conditioning features sit at their own positions of the full vector
                        cols = s.identity_features.cpu().long()
                    if k == depth - 1:  # [shift, log-scale] of each transformed feature at its position
                        t = s.transform_features.cpu().long()
                        rows = torch.cat([t, width + t])
                    index.append((rows, cols))
                n_out = 2 * width if k == depth - 1 else max(linears[g][k].out_features for g in range(groups))
                w = torch.zeros(groups, n_in, n_out)  # stored transposed: a @ w in the forward
                b = torch.zeros(groups, n_out)
                w_real, b_real = torch.zeros_like(w), torch.zeros_like(b)
                for g, (rows, cols) in enumerate(index):
                    w[g][cols[:, None], rows[None, :]] = linears[g][k].weight.detach().cpu().t()
                    b[g][rows] = linears[g][k].bias.detach().cpu()
                    w_real[g][cols[:, None], rows[None, :]] = 1.0
                    b_real[g][rows] = 1.0
                layer = len(self._index)
                tensors[f"weight{layer}"], tensors[f"bias{layer}"] = w, b
                real[f"weight{layer}"], real[f"bias{layer}"] = w_real, b_real
                self._index.append(index)
                layer_ids.append(layer)
                n_in = n_out
            self._coupling_layers.append(layer_ids)
        # all ActNorms in two tensors: their exp and log-determinant are one operation each
        tensors["actnorm_log_scale"] = torch.stack(log_scales, 1) if log_scales else torch.zeros(groups, 0, width)
        tensors["actnorm_shift"] = torch.stack(shifts, 1) if shifts else torch.zeros(groups, 0, width)
        real_vector = self._pad_vectors([torch.ones(c) for c in self.features])
        real["actnorm_log_scale"] = real["actnorm_shift"] = real_vector[:, None, :].expand_as(tensors["actnorm_shift"])
        if self.diagonal_base:
            tensors["base_mean"] = self._pad_vectors([f._distribution.mean_.reshape(-1) for f in self._flows])
            tensors["base_log_std"] = self._pad_vectors([f._distribution.log_std_.reshape(-1) for f in self._flows])
            real["base_mean"] = real["base_log_std"] = real_vector
        # one parameter [G, P], flow g's weights in row g: the optimiser, the per-flow gradient
        # clipping and the early-stopping copy are one operation each instead of one per tensor
        self._layout = [(name, tuple(t.shape[1:]), int(t[0].numel())) for name, t in tensors.items()]
        self.flat = nn.Parameter(torch.cat([t.reshape(groups, -1) for t in tensors.values()], 1))
        # padding entries get no gradient, whoever calls backward (not saved: it follows from the flows)
        self.register_buffer("real_entries", torch.cat([real[name].reshape(groups, -1) for name in tensors], 1), persistent=False)
        self.flat.register_hook(lambda grad: grad * self.real_entries)
        ref = next(self._flows[0].parameters())
        self.to(device=ref.device, dtype=ref.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Views ``[G, ...]`` of :attr:`flat` by name (``weight<i>`` ``[G, in, out]``,
        ``bias<i>``, ``actnorm_log_scale``/``actnorm_shift`` ``[G, A, C_max]``, ``base_*``)."""
        parts = self.flat.split([size for _, _, size in self._layout], 1)
        return {name: part.view(part.shape[0], *shape) for (name, shape, _), part in zip(self._layout, parts)}

    def _pad_vectors(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(len(vectors), self.width)
        for g, v in enumerate(vectors):
            out[g, : v.numel()] = v.detach().cpu().reshape(-1)
        return out

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density of every flow at its rows: ``x`` ``[G, B, C_max]`` -> ``[G, B]``."""
        # no activation is masked: the padded entries of the weights are zero (see the module doc)
        t = self.tensors()
        an_log_scale = t["actnorm_log_scale"].transpose(0, 1)  # [A, G, C]
        an_scale = torch.exp(an_log_scale)[:, :, None, :]
        an_shift = t["actnorm_shift"].transpose(0, 1)[:, :, None, :]
        logdet = an_log_scale.sum((0, 2))[:, None]
        h = x  # padded features are zero and stay zero
        n_actnorm = n_coupling = 0
        for kind in self._kinds:
            if kind == "actnorm":
                h = torch.addcmul(an_shift[n_actnorm], h, an_scale[n_actnorm])
                n_actnorm += 1
                continue
            layer_ids, clamp = self._coupling_layers[n_coupling], self.clamps[n_coupling]
            a = h  # the first layer's weights read only the conditioning features
            for depth, i in enumerate(layer_ids):
                a = torch.baddbmm(t[f"bias{i}"][:, None, :], a, t[f"weight{i}"])
                if depth < len(layer_ids) - 1:
                    a = F.leaky_relu(a, self.slopes[n_coupling])
            shift, raw = a[..., : self.width], a[..., self.width :]  # both zero outside the transformed features
            log_scale = raw if clamp is None else clamp * torch.tanh(raw / clamp)
            h = torch.addcmul(shift, h, torch.exp(log_scale))
            logdet = logdet + log_scale.sum(-1)
            n_coupling += 1
        if self.diagonal_base:
            log_std = t["base_log_std"]
            z = (h - t["base_mean"][:, None, :]) * torch.exp(-log_std)[:, None, :]
            base = -0.5 * (z * z).sum(-1) - log_std.sum(-1, keepdim=True)
        else:
            base = -0.5 * (h * h).sum(-1)
        return base - 0.5 * _LOG_2PI * self.num_features[:, None] + logdet

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the stacked weights into the flows they were made from (ActNorms marked initialised)."""
        t = self.tensors()
        n_actnorm = n_coupling = 0
        for position, kind in enumerate(self._kinds):
            steps = [_steps(f)[position] for f in self._flows]
            if kind == "actnorm":
                for g, s in enumerate(steps):
                    c = self.features[g]
                    s.log_scale.copy_(t["actnorm_log_scale"][g, n_actnorm, :c])
                    s.shift.copy_(t["actnorm_shift"][g, n_actnorm, :c])
                    s.initialized.fill_(True)
                n_actnorm += 1
                continue
            for depth, i in enumerate(self._coupling_layers[n_coupling]):
                for g, s in enumerate(steps):
                    lin = [m for m in s.transform_net.net if isinstance(m, nn.Linear)][depth]
                    rows, cols = self._index[i][g]
                    lin.weight.copy_(t[f"weight{i}"][g][cols[:, None], rows[None, :]].t())
                    lin.bias.copy_(t[f"bias{i}"][g][rows])
            n_coupling += 1
        if self.diagonal_base:
            for g, f in enumerate(self._flows):
                c = self.features[g]
                f._distribution.mean_.copy_(t["base_mean"][g, :c].reshape(f._distribution.mean_.shape))
                f._distribution.log_std_.copy_(t["base_log_std"][g, :c].reshape(f._distribution.log_std_.shape))

    def pad_rows(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[G, N, C_max]`` from one ``[N, C_g]`` table per flow (same ``N``)."""
        out = rows[0].new_zeros(len(rows), rows[0].shape[0], self.width)
        for g, r in enumerate(rows):
            out[g, :, : r.shape[1]] = r
        return out


# buffers in the joint-fit states that earlier versions saved: forward-pass masks, no longer used
_FORMER_BUFFERS = ("feature_mask", "identity_masks", "transform_masks")


def _load_stack_state(stack: FlowStack, state: Mapping[str, torch.Tensor]) -> None:
    stack.load_state_dict({k: v for k, v in state.items() if k not in _FORMER_BUFFERS})


def _clip_per_flow(flat: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """Each flow's gradient norm (``[G]``; flow ``g`` is row ``g`` of ``flat``), clipped per
    flow as ``clip_grad_norm_`` clips one flow."""
    norms = torch.linalg.vector_norm(flat.grad, dim=1)
    if max_norm is not None and bool((norms > max_norm).any()):
        flat.grad.mul_((float(max_norm) / (norms + 1e-6)).clamp(max=1.0)[:, None])
    return norms


def _diverged(name: str, detail: str):
    err = FlowFitError(f"{name}: flow fit diverged: {detail}")
    err.flow_name, err.detail = name, f"flow fit diverged: {detail}"
    return err


def fit_flows_jointly(
    flows: Sequence[Flow],
    data: Sequence[torch.Tensor],
    names: Sequence[str],
    seeds: Sequence[int],
    epochs: int = 100,
    lr: float = 1e-4,
    batch_size: int = 20,
    grad_clip: float | None = 5.0,
    weight_decay: float = 0.01,
    val_data: Sequence[torch.Tensor] | None = None,
    log_every: int = 10,
    logger: logging.Logger | None = None,
    init_samples: int = 2048,
    restore_best: bool = True,
    resume_state: Mapping[str, Any] | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[dict], None] | None = None,
) -> list[list[dict[str, float]]]:
    """Maximum-likelihood fit of every ``flows[g]`` on ``data[g]`` at once (see the module doc).

    ``data``: validated float32 ``[N, C_g]`` tables with the same ``N``; ``val_data`` likewise
    (or ``None``). ``seeds[g]`` seeds flow ``g``'s shuffling exactly as ``fit_flow(seed=...)``
    does; ``names`` label flows in logs and errors. Returns one history per flow in
    :func:`msf_monai.flow_fit.fit_flow`'s format. The state given to ``on_checkpoint`` (every
    ``checkpoint_every`` epochs and when the fit ends, ``"finished": True``) can be passed back
    as ``resume_state`` to continue with the same result as an uninterrupted fit.
    """
    check_fit_settings(epochs, batch_size, lr)
    log = logger or _LOGGER
    groups = len(flows)
    if not (len(data) == len(names) == len(seeds) == groups) or groups == 0:
        raise ValueError("flows, data, names and seeds must have the same, non-zero length")
    if len({int(x.shape[0]) for x in data}) != 1 or (val_data is not None and len({int(x.shape[0]) for x in val_data}) != 1):
        raise ValueError("a joint flow fit needs the same number of rows for every flow")
    n, bs, epochs = int(data[0].shape[0]), int(batch_size), int(epochs)
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    device = next(flows[0].parameters()).device
    data = [x.to(device) for x in data]
    if resume_state is None:
        for flow, x, gen in zip(flows, data, gens):
            init_idx = torch.randperm(n, generator=gen)[: max(2, min(n, int(init_samples)))]
            initialise_actnorms(flow, x[init_idx.to(device)], log)
    stack = FlowStack(flows)
    x_all = stack.pad_rows(data)
    xv_all = None if val_data is None else stack.pad_rows([x.to(device) for x in val_data])
    # fused where this torch has it (CPU and CUDA): the same update in one kernel
    try:
        optimiser = torch.optim.AdamW(stack.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        optimiser = torch.optim.AdamW(stack.parameters(), lr=lr, weight_decay=weight_decay)
    histories: list[list[dict[str, float]]] = [[] for _ in range(groups)]
    best_nll = torch.full((groups,), math.inf)
    best_state: dict[str, torch.Tensor] | None = None
    first_epoch = 1
    if resume_state is not None:
        _load_stack_state(stack, resume_state["stack"])
        histories = [[dict(r) for r in h] for h in resume_state["histories"]]
        if resume_state.get("finished"):
            stack.write_back()
            for f in flows:
                f.eval()
            log.info("the flow fit had finished (%d epochs): restored its final weights", int(resume_state["epoch"]))
            return histories
        optimiser.load_state_dict(detached_cpu_copy(resume_state["optimiser"]))  # a copy: the steps update it in place
        for gen, state in zip(gens, resume_state["generators"]):
            gen.set_state(state)
        best_nll = torch.tensor(resume_state["best_nll"], dtype=torch.float64).float()
        saved_best = resume_state.get("best_state")  # copied: the fit updates it in place
        best_state = None if saved_best is None else {k: v.detach().clone() for k, v in saved_best.items()}
        first_epoch = int(resume_state["epoch"]) + 1
        log.info("resuming the joint flow fit after epoch %d of %d", first_epoch - 1, epochs)

    def fit_state(epoch: int, finished: bool = False) -> dict:
        return {
            "epoch": int(epoch),
            "finished": bool(finished),
            "names": list(names),
            "stack": {k: v.detach().cpu().clone() for k, v in stack.state_dict().items()},
            "optimiser": detached_cpu_copy(optimiser.state_dict()),
            "generators": [g.get_state() for g in gens],
            "histories": [[dict(r) for r in h] for h in histories],
            "best_nll": [float(v) for v in best_nll],
            "best_state": None if best_state is None else {k: v.detach().cpu().clone() for k, v in best_state.items()},
        }

    rows = torch.arange(groups, device=device)[:, None]
    for epoch in range(first_epoch, epochs + 1):
        perms = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)
        shuffled = x_all[rows, perms]  # each flow's rows in its own order: the batches are slices
        total = torch.zeros(groups, dtype=torch.float64, device=device)
        for b, start in enumerate(range(0, n, bs)):
            batch = shuffled[:, start : start + bs]
            losses = -stack.log_prob(batch).mean(1)
            finite = torch.isfinite(losses)
            if not bool(finite.all()):
                g = int((~finite).nonzero()[0])
                raise _diverged(names[g], f"non-finite NLL ({float(losses[g].detach())}) at epoch {epoch}, batch {b} (lr={lr}); "
                                "try a lower learning rate or scale_clamp")
            optimiser.zero_grad(set_to_none=True)
            losses.sum().backward()
            norms = _clip_per_flow(stack.flat, grad_clip)
            if not bool(torch.isfinite(norms).all()):
                g = int((~torch.isfinite(norms)).nonzero()[0])
                raise _diverged(names[g], f"non-finite gradient norm at epoch {epoch}, batch {b} (lr={lr})")
            optimiser.step()
            total.add_(losses.detach(), alpha=batch.shape[1])
        train_nll = (total / n).tolist()
        val_nll = None
        if xv_all is not None:
            with torch.no_grad():
                val_nll = torch.cat([-stack.log_prob(xv_all[:, i : i + 4096]) for i in range(0, xv_all.shape[1], 4096)], 1).mean(1).cpu()
            if restore_best:
                better = val_nll < best_nll
                if bool(better.any()):
                    best_nll = torch.where(better, val_nll, best_nll)
                    if best_state is None:
                        best_state = {k: v.detach().clone() for k, v in stack.state_dict().items()}
                    else:  # only the improved flows' parameters (buffers never change)
                        index = better.to(device)
                        best_state["flat"][index] = stack.flat.detach()[index]
        for g in range(groups):
            record: dict[str, float] = {"epoch": epoch, "train_nll": float(train_nll[g])}
            if val_nll is not None:
                record["val_nll"] = float(val_nll[g])
            histories[g].append(record)
        if log_every and (epoch % int(log_every) == 0 or epoch == epochs):
            parts = [f"{name} {h[-1]['train_nll']:.3f}" + (f"/{h[-1]['val_nll']:.3f}" if "val_nll" in h[-1] else "")
                     for name, h in zip(names, histories)]
            log.info("flow epoch %d/%d, NLL (train%s): %s", epoch, epochs, "/val" if val_nll is not None else "", ", ".join(parts))
        if on_checkpoint is not None and checkpoint_every and epoch % int(checkpoint_every) == 0 and epoch < epochs:
            on_checkpoint(fit_state(epoch))
    if best_state is not None:
        _load_stack_state(stack, best_state)
        kept = [f"{name} {min(h, key=lambda r: r['val_nll'])['epoch']}" for name, h in zip(names, histories)]
        log.info("kept each flow's weights of its epoch of lowest validation NLL: %s", ", ".join(kept))
    stack.write_back()
    for f in flows:
        f.eval()
    if on_checkpoint is not None:
        on_checkpoint(fit_state(epochs, finished=True))
    return histories
