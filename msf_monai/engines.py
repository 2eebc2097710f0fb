"""Training-step logic for MONAI's ``SupervisedTrainer`` (its ``iteration_update`` argument).

* :class:`DualDecoderIteration` - Phase I and the feature-level baselines: segmentation loss on
  the network's logits plus an L2 reconstruction of the clean image from a noised input
  (denoising image decoder); optionally an image-level augmentation (RandConv) of the input.
* :class:`StylizedBatchIteration` - the shared step of the image-decoder methods: a stylized
  copy of the batch is made by the image decoder's style layers and passed through the whole
  network again; four loss terms, one optimizer step. Two ways to stylize:
  :class:`MixStyleFlowIteration` (Phase III: styles sampled from the fitted flows, no gradient)
  and :class:`MaxStyleIteration` (MaxStyle: style parameters optimised adversarially).
* :class:`StylizerIteration` - MixStyleFlow as an augmentation for any network: a frozen
  Phase I network with its MixStyleFlow layers makes the stylized batch, and the trained
  network (e.g. a plain MONAI ``UNet``) learns from the clean and the stylized batch.

They follow ``SupervisedTrainer._iteration``: they honour ``engine.amp`` and ``engine.compile``
(the network MONAI compiled; MetaTensors become plain tensors first), refuse
``accumulation_steps`` > 1 and an inferer other than ``SimpleInferer``, fill
``engine.state.output`` (``image``, ``label``, ``pred``, ``loss`` and one entry per loss term)
and fire the iteration events, ``MODEL_COMPLETED`` included, so MONAI's decollation,
post-processing and metrics run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn

__all__ = [
    "add_image_noise",
    "rescale_to_reference",
    "frozen_batchnorm_statistics",
    "batchnorm_affine_frozen",
    "style_layer_shifts",
    "DualDecoderIteration",
    "StylizedBatchIteration",
    "MixStyleFlowIteration",
    "MaxStyleIteration",
    "StylizerIteration",
]


def add_image_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    """Denoising-autoencoder input: ``x + std * N(0, 1)`` clamped to the batch's intensity range
    (as the reference code)."""
    if std <= 0:
        return x
    return (x + std * torch.randn_like(x)).clamp(x.min().item(), x.max().item())


def rescale_to_reference(x: torch.Tensor, reference: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Min-max rescale each image of ``x`` to the intensity range of the same image in ``reference``."""
    dims = tuple(range(1, x.ndim))
    x_min, x_max = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    r_min, r_max = reference.amin(dims, keepdim=True), reference.amax(dims, keepdim=True)
    return (x - x_min) / (x_max - x_min).clamp_min(eps) * (r_max - r_min) + r_min


def _batchnorms(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def batchnorm_affine_frozen(net: nn.Module) -> Iterator[None]:
    """Within the block, batch-norm weights and biases get no gradient (``requires_grad`` off,
    restored afterwards): the reference code's stylized pass trains every other parameter but
    leaves the batch-norm affine parameters to the clean batch."""
    params = [t for m in _batchnorms(net) for t in (m.weight, m.bias) if t is not None and t.requires_grad]
    try:
        for t in params:
            t.requires_grad_(False)
        yield
    finally:
        for t in params:
            t.requires_grad_(True)


@contextlib.contextmanager
def frozen_batchnorm_statistics(net: nn.Module) -> Iterator[None]:
    """Within the block, batch-norm layers still normalise with batch statistics (training mode)
    but leave their running statistics unchanged: for extra forward passes that must not count
    as training data (the stylized pass, MaxStyle's adversarial steps, Phase II statistics)."""
    saved = [(m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in _batchnorms(net)]
    try:
        for m, _, _ in saved:
            m.momentum = 0.0
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def style_layer_shifts(net: nn.Module) -> dict[str, float]:
    """``{"<where><index>_<stat>": shift}`` of every style layer that measured its last
    perturbation (:attr:`msf_monai.styles.MixStyleFlow.last_shift`), e.g. ``"dec2_mean"``."""
    out = {}
    for where, tag in (("encoder_styles", "enc"), ("image_decoder_styles", "dec")):
        for index, layer in getattr(net, where, {}).items():
            shift = getattr(layer, "last_shift", None)
            if shift:
                out.update({f"{tag}{index}_{k}": v for k, v in shift.items()})
    return out


def _relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of ``||a - b|| / ||b - mean(b)||``: how far ``a`` is from ``b`` relative
    to ``b``'s own contrast (0 = identical)."""
    a, b = a.detach().float().flatten(1), b.detach().float().flatten(1)
    spread = (b - b.mean(1, keepdim=True)).norm(dim=1).clamp_min(1e-6)
    return float(((a - b).norm(dim=1) / spread).mean())


class DualDecoderIteration:
    """One training step of the dual-decoder network.

    ``loss = seg_weight * seg_loss(logits, label) + rec_weight * MSE(reconstruction, clean image)``,
    where the network sees ``image + noise_std * N(0, 1)``. ``engine.loss_function`` is the
    segmentation loss (e.g. MONAI ``DiceCELoss(sigmoid=True)``: BCE + Dice, the paper's eq. 5).

    Args:
        rec_weight: weight of the reconstruction loss. The paper's eq. 6 is a plain L2 (1.0);
            the reference code uses 0.5 * MSE.
        noise_std: std of the Gaussian noise added to the input (reference code: 0.05).
        seg_weight: weight of the segmentation loss.
        rec_loss: reconstruction loss, default ``nn.MSELoss()``.
        input_style: optional image-level augmentation applied to the input before the noise
            (e.g. :class:`msf_monai.styles.RandConv`; acts only in training mode). The
            reconstruction target stays the clean image. The augmented batch is kept in
            ``engine.state.output["stylized"]`` for image logging.
    """

    def __init__(
        self,
        rec_weight: float = 1.0,
        noise_std: float = 0.05,
        seg_weight: float = 1.0,
        rec_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        input_style: nn.Module | None = None,
    ):
        self.rec_weight, self.noise_std, self.seg_weight = float(rec_weight), float(noise_std), float(seg_weight)
        self.rec_loss = rec_loss if rec_loss is not None else nn.MSELoss()
        self.input_style = input_style

    def forward_backward(self, engine, inputs: torch.Tensor, targets: torch.Tensor, backward) -> dict[str, torch.Tensor]:
        """Forward pass, loss terms and ``backward(loss)``; returns the output entries (``loss``
        the total). Subclasses may call ``backward`` several times (gradients accumulate)."""
        net = engine.network
        x = inputs
        if self.input_style is not None:
            self.input_style.train()
            x = self.input_style(inputs)
            engine.state.output["stylized"] = x.detach()
        out = net(add_image_noise(x, self.noise_std))
        seg, rec = out if isinstance(out, (tuple, list)) else (out, None)  # a segmentation-only net has no image decoder
        engine.state.output[Keys.PRED] = seg
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        seg_loss = engine.loss_function(seg, targets).mean()
        rec_loss = self.rec_loss(rec, inputs) if rec is not None else seg_loss.new_zeros(())
        loss = self.seg_weight * seg_loss + self.rec_weight * rec_loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        backward(loss)
        shifts = style_layer_shifts(net)
        if shifts:
            engine.state.perturbation = shifts
        return {"seg_loss": seg_loss, "rec_loss": rec_loss, Keys.LOSS: loss}

    @staticmethod
    def check_trainer(engine) -> None:
        """Refuse trainer settings these steps do not implement, instead of ignoring them."""
        from monai.inferers import SimpleInferer

        if int(getattr(engine, "accumulation_steps", 1) or 1) != 1:
            raise ValueError(f"{type(engine).__name__}: the dual-decoder training steps do not accumulate gradients "
                             f"(accumulation_steps={engine.accumulation_steps}); use accumulation_steps 1 and a smaller batch")
        inferer = getattr(engine, "inferer", None)
        if inferer is not None and type(inferer) is not SimpleInferer:
            raise ValueError(f"the dual-decoder training steps call the network directly; a trainer inferer "
                             f"({type(inferer).__name__}) would be ignored, so it is refused")

    def __call__(self, engine, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if not getattr(engine, "_msf_trainer_checked", False):  # once per trainer, resumed runs included
            self.check_trainer(engine)
            engine._msf_trainer_checked = True
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        if getattr(engine, "compile", False):  # as SupervisedTrainer: torch.compile takes plain tensors
            inputs, targets = (t.as_tensor() if hasattr(t, "as_tensor") else t for t in (inputs, targets))
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_amp = engine.amp and engine.scaler is not None

        def backward(loss: torch.Tensor) -> None:
            (engine.scaler.scale(loss) if use_amp else loss).backward()

        if use_amp:
            with torch.autocast("cuda", **engine.amp_kwargs):
                terms = self.forward_backward(engine, inputs, targets, backward)
        else:
            terms = self.forward_backward(engine, inputs, targets, backward)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if use_amp:
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            engine.optimizer.step()
        # loss terms are logged as plain numbers; the graphs are gone after backward
        engine.state.output.update({k: v.detach() for k, v in terms.items()})
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class StylizedBatchIteration(DualDecoderIteration):
    """One step with a stylized copy of the batch (MixStyleFlow's Phase III, MaxStyle).

    1. As Phase I on the (noised) clean batch: ``seg(clean) + rec(clean)``.
    2. :meth:`stylize` makes the stylized batch from the detached latent code with the image
       decoder's style layers (a decoding ``D(z, styled)``), composed by :meth:`compose` and
       rescaled to each input image's intensity range, detached.
    3. The stylized batch goes through the whole network: ``seg(stylized)`` against the same
       label and ``rec(stylized -> clean image)``.

    ``loss = seg(clean) + rec(clean) + stylized_weight * (seg(stylized) + rec(stylized))``
    (the papers use weight 1 for all four terms). ``engine.state.output["stylized"]`` holds the
    stylized batch for image logging, ``engine.state.perturbation`` its size (see
    :meth:`measure`; on the state, not in the output, which MONAI decollates per image).
    Subclasses implement :meth:`stylize`.

    Args:
        stylized_weight: weight of the two stylized terms.
        stylized_bn: how batch norm treats the stylized batch. ``"frozen"`` (default, as the
            reference code): making the stylized image and the stylized pass leave every
            running mean/variance unchanged, and the stylized pass gives the batch-norm weights
            and biases no gradient, so evaluation normalises with statistics of real images
            only. ``"train"``: both update batch norm like a clean batch (this package before
            0.3).
        stylize_mode: ``"decoded"`` (paper): the stylized image is the styled decoding itself.
            ``"residual"`` (new, neither paper nor reference code): only what the style change
            does to the decoding is added to the sharp input, ``x + D(z, styled) - D(z)``, so
            the network sees the image's real detail in a new style instead of the decoder's
            blurred copy.
    """

    STYLIZED_BN = ("frozen", "train")
    STYLIZE_MODES = ("decoded", "residual")

    def __init__(self, stylized_weight: float = 1.0, stylized_bn: str = "frozen", stylize_mode: str = "decoded", **kwargs):
        super().__init__(**kwargs)
        self.stylized_weight = float(stylized_weight)
        if stylized_bn not in self.STYLIZED_BN:
            raise ValueError(f"stylized_bn must be one of {self.STYLIZED_BN}, got {stylized_bn!r}")
        if stylize_mode not in self.STYLIZE_MODES:
            raise ValueError(f"stylize_mode must be one of {self.STYLIZE_MODES}, got {stylize_mode!r}")
        self.stylized_bn, self.stylize_mode = stylized_bn, stylize_mode

    def stylize(self, engine, z: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, rec: torch.Tensor | None = None) -> torch.Tensor:
        """The stylized batch (same shape and intensity range as ``inputs``, no gradient);
        ``rec`` is the clean decoding ``D(z)`` (detached), for :meth:`compose`."""
        raise NotImplementedError

    def compose(self, decoding: torch.Tensor, inputs: torch.Tensor, rec: torch.Tensor | None) -> torch.Tensor:
        """The stylized image from a styled decoding (see ``stylize_mode``), rescaled to each input
        image's intensity range. ``rec`` (the clean decoding) is needed in residual mode only."""
        decoding = decoding.float()
        if self.stylize_mode == "residual":
            if rec is None:
                raise ValueError("stylize_mode 'residual' needs the clean decoding D(z) (rec)")
            decoding = inputs.float() + (decoding - rec.float())
        return rescale_to_reference(decoding, inputs)

    def _bn_context(self, net: nn.Module, affine: bool = False):
        """Batch-norm handling for passes over stylized images (see ``stylized_bn``)."""
        if self.stylized_bn == "train":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(frozen_batchnorm_statistics(net))
        if affine:
            stack.enter_context(batchnorm_affine_frozen(net))
        return stack

    def measure(self, net: nn.Module, stylized: torch.Tensor, inputs: torch.Tensor, rec: torch.Tensor) -> dict[str, float]:
        """How strong the perturbation is: ``image_change`` = relative distance of the stylized
        batch from its un-stylized counterpart (the same composition with no style applied: the
        rescaled reconstruction, or the input itself in residual mode); ``blur`` = relative
        distance of that counterpart from the input (0 in residual mode); plus each style
        layer's statistics shift (:func:`style_layer_shifts`)."""
        with torch.no_grad():
            unstyled = self.compose(rec, inputs, rec)
            out = {"image_change": _relative_distance(stylized, unstyled), "blur": _relative_distance(unstyled, inputs)}
        out.update(style_layer_shifts(net))
        return out

    def forward_backward(self, engine, inputs: torch.Tensor, targets: torch.Tensor, backward) -> dict[str, torch.Tensor]:
        net = engine.network
        if len(net.image_decoder_styles) == 0:
            raise RuntimeError(f"{type(self).__name__} needs style layers in network.image_decoder_styles")
        z = net.encode(add_image_noise(inputs, self.noise_std))
        seg, rec = net.segment(z), net.reconstruct(z)
        terms = {"seg_loss": engine.loss_function(seg, targets).mean(), "rec_loss": self.rec_loss(rec, inputs)}
        clean = self.seg_weight * terms["seg_loss"] + self.rec_weight * terms["rec_loss"]
        # back-propagate the clean terms before the stylized pass: the same summed gradient,
        # but the two passes' activations are never held at the same time (half the peak memory)
        backward(clean)
        with self._bn_context(net):
            stylized = self.stylize(engine, z.detach(), inputs, targets, rec.detach()).detach()
        engine.state.perturbation = self.measure(net, stylized, inputs, rec.detach())
        with self._bn_context(net, affine=True):
            seg_s, rec_s = net(stylized)
            engine.state.output[Keys.PRED] = seg
            engine.state.output["stylized"] = stylized
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            terms["seg_loss_stylized"] = engine.loss_function(seg_s, targets).mean()
            terms["rec_loss_stylized"] = self.rec_loss(rec_s, inputs)
            styled = self.seg_weight * terms["seg_loss_stylized"] + self.rec_weight * terms["rec_loss_stylized"]
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            backward(self.stylized_weight * styled)
        terms[Keys.LOSS] = clean.detach() + self.stylized_weight * styled.detach()
        return terms


class MixStyleFlowIteration(StylizedBatchIteration):
    """Phase III step (MixStyleFlow): the stylized image is the image decoder's
    output on the detached latent code with its MixStyleFlow layers active (styles sampled from
    the fitted flows, normally after layers 2, 3, 4), computed without gradient."""

    def stylize(self, engine, z: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, rec: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.compose(engine.network.reconstruct(z, stylize=True), inputs, rec)


class MaxStyleIteration(StylizedBatchIteration):
    """MaxStyle step (Chen et al., MICCAI 2022): the image decoder's :class:`msf_monai.styles.MaxStyle`
    layers draw a random style (MixStyle + noise), then ``steps`` Adam steps (``lr``) change the
    style parameters to *maximise* the segmentation loss of the re-encoded stylized image, with
    the network frozen (gradients go to the style parameters only, batch-norm running statistics
    are left unchanged). The final, hardest style makes the stylized batch. Paper: 5 steps, lr 0.1.
    """

    def __init__(self, steps: int = 5, lr: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        if int(steps) < 0 or float(lr) <= 0:
            raise ValueError(f"MaxStyle needs steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
        self.steps, self.lr = int(steps), float(lr)

    def _generate(self, net, z: torch.Tensor, inputs: torch.Tensor, rec: torch.Tensor | None) -> torch.Tensor:
        return self.compose(net.reconstruct(z, stylize=True), inputs, rec)

    def stylize(self, engine, z: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, rec: torch.Tensor | None = None) -> torch.Tensor:
        net = engine.network
        layers = [m for m in net.image_decoder_styles.values() if hasattr(m, "style_parameters")]
        for layer in layers:
            layer.reset()
        try:
            with frozen_batchnorm_statistics(net):
                stylized = self._generate(net, z, inputs, rec)
                params = [t for layer in layers for t in layer.style_parameters()]
                if not params or self.steps == 0:  # no layer active for this batch: nothing to search
                    return stylized.detach()
                optimizer = torch.optim.Adam(params, lr=self.lr, maximize=True)
                for step in range(self.steps):
                    loss = engine.loss_function(net.segment(net.encode(stylized)), targets).mean()
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    for t, g in zip(params, grads):
                        t.grad = torch.zeros_like(t) if g is None else g
                    optimizer.step()
                    with torch.set_grad_enabled(step < self.steps - 1):
                        stylized = self._generate(net, z, inputs, rec)
            return stylized.detach()
        finally:
            for layer in layers:
                layer.reset()


class StylizerIteration(StylizedBatchIteration):
    """MixStyleFlow as an augmentation for any segmentation network (new; neither the paper nor
    its code has it).

    A frozen *stylizer* -- the Phase I dual-decoder network with MixStyleFlow layers sampling
    from the flows Phase II fitted on that very network's channels -- makes the stylized batch
    (as :class:`MixStyleFlowIteration`, composed by ``stylize_mode``); the trained network,
    which may be a plain MONAI ``UNet`` without an image decoder, learns from both batches:
    ``seg(clean) [+ rec(clean)] + stylized_weight * (seg(stylized) [+ rec(stylized)])`` (the
    reconstruction terms only when the trained network returns a reconstruction).

    Why: the styles are made by a network whose decoder is sharp from the first step and whose
    channels are the ones the flows were fitted on, and the segmenter can be whatever
    network segments best. The stylizer is never trained: no parameter of it gets a gradient
    and its batch-norm running statistics stay as Phase I left them.

    Args:
        stylizer: the frozen network (``encode`` and ``reconstruct(z, stylize=True)``, with
            MixStyleFlow layers in ``image_decoder_styles``); see
            :meth:`msf_monai.methods.DGMethod.stylizer`.
        stylizer_noise_std: the input noise of the stylizer's encoding in the ``"train"`` regime:
            Phase I's denoising noise, as Phase II added it when it recorded the statistics.
        stylizer_regime: Phase II's ``stats_regime`` of the flows, the regime the stylizer runs
            in: ``"train"`` (batch statistics, running statistics unchanged, noised input) or
            ``"eval"`` (running statistics, clean input).
        noise_std, rec_weight: of the trained network's own input and reconstruction (0 for a
            segmentation-only network).
        stylized_weight, stylized_bn, stylize_mode, seg_weight, rec_loss: as
            :class:`StylizedBatchIteration`.
    """

    def __init__(self, stylizer: nn.Module, stylizer_noise_std: float = 0.05, stylizer_regime: str = "train", **kwargs):
        super().__init__(**kwargs)
        if not hasattr(stylizer, "image_decoder_styles") or len(stylizer.image_decoder_styles) == 0:
            raise ValueError("the stylizer needs MixStyleFlow layers in image_decoder_styles")
        if stylizer_regime not in ("train", "eval"):
            raise ValueError(f"stylizer_regime must be 'train' or 'eval', got {stylizer_regime!r}")
        self.stylizer = stylizer.requires_grad_(False)
        self.stylizer_noise_std, self.stylizer_regime = float(stylizer_noise_std), stylizer_regime

    def stylize(self, engine, z: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, rec: torch.Tensor | None = None) -> torch.Tensor:
        """The stylized batch from the stylizer's latent code ``z`` and clean decoding ``rec``."""
        with torch.no_grad():
            return self.compose(self.stylizer.reconstruct(z, stylize=True), inputs, rec)

    def _stylizer_mode(self) -> None:
        self.stylizer.train()  # the style layers act in training mode only
        if self.stylizer_regime == "eval":
            for m in _batchnorms(self.stylizer):
                m.eval()

    def forward_backward(self, engine, inputs: torch.Tensor, targets: torch.Tensor, backward) -> dict[str, torch.Tensor]:
        net = engine.network
        out = net(add_image_noise(inputs, self.noise_std))
        seg, rec = out if isinstance(out, (tuple, list)) else (out, None)
        terms = {"seg_loss": engine.loss_function(seg, targets).mean()}
        clean = self.seg_weight * terms["seg_loss"]
        if rec is not None:
            terms["rec_loss"] = self.rec_loss(rec, inputs)
            clean = clean + self.rec_weight * terms["rec_loss"]
        backward(clean)  # as StylizedBatchIteration: the two passes' activations never coexist
        self._stylizer_mode()
        with torch.no_grad(), frozen_batchnorm_statistics(self.stylizer):
            noise = self.stylizer_noise_std if self.stylizer_regime == "train" else 0.0
            z = self.stylizer.encode(add_image_noise(inputs, noise))
            plain = self.stylizer.reconstruct(z)
            stylized = self.stylize(engine, z, inputs, targets, plain).detach()
        engine.state.perturbation = self.measure(self.stylizer, stylized, inputs, plain)
        with self._bn_context(net, affine=True):
            out_s = net(stylized)
            seg_s, rec_s = out_s if isinstance(out_s, (tuple, list)) else (out_s, None)
            engine.state.output[Keys.PRED] = seg
            engine.state.output["stylized"] = stylized
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            terms["seg_loss_stylized"] = engine.loss_function(seg_s, targets).mean()
            styled = self.seg_weight * terms["seg_loss_stylized"]
            if rec_s is not None:
                terms["rec_loss_stylized"] = self.rec_loss(rec_s, inputs)
                styled = styled + self.rec_weight * terms["rec_loss_stylized"]
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            backward(self.stylized_weight * styled)
        terms[Keys.LOSS] = clean.detach() + self.stylized_weight * styled.detach()
        return terms
