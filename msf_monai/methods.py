"""The domain-generalisation methods a bundle can train with, selected by one config id.

``style_method`` in ``phase3.json`` names one of :data:`METHODS`; everything else (where the
style layers go, which training step runs, whether fitted flows are needed, where the
checkpoint is written) follows from it, so every method trains from the same bundle, data,
network, losses and budget:

    python -m monai.bundle run --config_file bundles/prostate/configs/phase3.json --style_method dsu

Placement follows each method's paper, mapped onto the MaxStyle network (encoder stages 0..4:
stem then four down blocks; image-decoder layers 1..4, see :mod:`msf_monai.networks`):

* ``none``: no style augmentation (the Phase I recipe: segmentation + reconstruction).
* ``mixstyle``, ``efdm``: after encoder stages 1, 2, 3 (MixStyle: after the first three
  residual stages; EFDMix uses MixStyle's positions).
* ``dsu``: after every encoder stage 0..4 (DSU: after the stem and each residual stage).
* ``trid``: after encoder stages 1, 2 (TriD randomises shallow features only).
* ``randconv``, ``gin``: on the input image (image-level augmentation), reconstruction target
  clean.
* ``maxstyle``: image-decoder layers 2, 3, 4 (MaxStyle: the last three decoder blocks), style
  parameters optimised adversarially, stylized batch trained like MixStyleFlow's.
* ``mixstyleflow``: image-decoder layers of the fitted flow bank (2, 3, 4), Phase III.
* ``mixstyleflow_encoder`` (new, not in the paper): MixStyleFlow's flows fitted on encoder
  stages 1, 2, 3 of the Phase I network (Phase II with ``style_source encoder``), sampled styles
  mixed into those features in place during training, in one pass as MixStyle and DSU do (no
  stylized image, no image decoder needed).
* ``unet``: no style augmentation, and a plain MONAI ``UNet`` instead of the dual-decoder
  network (the reference a user would train instead; see
  :func:`msf_monai.networks.reference_unet`): no input noise, no reconstruction.
* ``unet_mixstyleflow`` (new, not in the paper): MixStyleFlow as an augmentation for that plain
  MONAI ``UNet``. The frozen Phase I network, with MixStyleFlow layers sampling from Phase II's
  flows, makes a stylized copy of every batch (:meth:`DGMethod.stylizer`,
  :class:`msf_monai.engines.StylizerIteration`); the UNet learns from the clean and the stylized
  batch. Needs Phase I and Phase II, as ``mixstyleflow``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .bundle import phase_command, require_file
from .errors import ConfigValueError
from .engines import DualDecoderIteration, MaxStyleIteration, MixStyleFlowIteration, StylizerIteration
from .flows import StyleFlowBank
from .networks import DualDecoderNet
from .resume import load_finished_weights
from .styles import build_style_layer, mixstyleflow_layers

__all__ = ["DGMethod", "METHODS", "flow_file_name", "get_method"]


@dataclass(frozen=True)
class DGMethod:
    """One domain-generalisation method: what it inserts where, and which training step it uses.

    Attributes:
        name: the ``style_method`` value.
        title: name used in tables and docs.
        where: ``"none"``, ``"encoder"``, ``"input"`` or ``"image_decoder"``.
        layers: encoder stages or image-decoder layers that get a style layer.
        layer: name in :data:`msf_monai.styles.STYLE_LAYERS` (``""`` for ``none``).
        reference: the paper.
    """

    name: str
    title: str
    where: str
    layers: tuple[int, ...] = ()
    layer: str = ""
    reference: str = ""
    architecture: str = "dual_decoder"

    @property
    def needs_flows(self) -> bool:
        """Whether the method samples from Phase II's fitted flows (Phase II must run first)."""
        return self.layer == "mixstyleflow"

    @property
    def uses_stylizer(self) -> bool:
        """Whether a frozen Phase I network makes the stylized batch (MixStyleFlow's styles for a
        network that has no style layers of its own, e.g. ``unet_mixstyleflow``)."""
        return self.needs_flows and self.architecture != "dual_decoder"

    @property
    def style_source(self) -> str:
        """Phase II's ``style_source`` whose flows the method samples (``image_decoder`` or ``encoder``)."""
        return "encoder" if self.where == "encoder" else "image_decoder"

    def phase2_command(self, bundle_root: str | None = None) -> str:
        """The Phase II command that fits the flows this method samples (for missing-file hints)."""
        base = phase_command(bundle_root, "phase2") if bundle_root else "the bundle's phase2.json (Phase II)"
        return base + ("" if self.style_source == "image_decoder" else " --style_source encoder")

    def flow_file(self) -> str:
        """Phase II's flow checkpoint name for :attr:`style_source` (see ``phase2.json``)."""
        return flow_file_name(self.style_source)

    def checkpoint_name(self) -> str:
        """``model.pt`` for MixStyleFlow (the bundle's model), ``model_<name>.pt`` for the others,
        so a comparison never overwrites one method's model with another's."""
        return "model.pt" if self.name == "mixstyleflow" else f"model_{self.name}.pt"

    def log_folder(self) -> str:
        """Folder under ``logs/`` for the training logs: ``phase3`` for MixStyleFlow,
        ``phase3_<name>`` for the others."""
        return "phase3" if self.name == "mixstyleflow" else f"phase3_{self.name}"

    def _layers(self, p: float) -> dict[int, nn.Module]:
        return {k: build_style_layer(self.layer, p=p) for k in self.layers}

    def _flow_layers(self, flow_checkpoint, device, p: float, bundle_root: str | None, **mixstyleflow_kwargs) -> dict[int, nn.Module]:
        return self._styles_and_regime(flow_checkpoint, device, p, bundle_root, **mixstyleflow_kwargs)[0]

    def _styles_and_regime(self, flow_checkpoint, device, p: float, bundle_root: str | None,
                           **mixstyleflow_kwargs) -> tuple[dict[int, nn.Module], str]:
        """The MixStyleFlow layers of the flow bank in ``flow_checkpoint``, and the Phase II
        ``stats_regime`` its statistics were recorded in."""
        if flow_checkpoint is None:
            raise ConfigValueError(f"style_method {self.name!r} needs flow_checkpoint (Phase II's {self.flow_file()})")
        hint = self.phase2_command(bundle_root)
        bank = StyleFlowBank.load(require_file(flow_checkpoint, hint), map_location=device)
        source = bank.metadata.get("style_source", "image_decoder")
        if source != self.style_source:
            raise ConfigValueError(
                f"{flow_checkpoint} holds flows of {source} statistics, but style_method {self.name!r} needs "
                f"{self.style_source} flows ({hint})"
            )
        layers = mixstyleflow_layers(bank, layers=self.layers or None, p=p, **mixstyleflow_kwargs)
        return layers, str(bank.metadata.get("stats_regime", "train"))

    def encoder_styles(
        self, p: float = 0.5, flow_checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu",
        bundle_root: str | None = None, **mixstyleflow_kwargs
    ) -> dict[int, nn.Module]:
        """``DualDecoderNet(encoder_styles=...)`` for the encoder-level methods (else empty);
        encoder-level MixStyleFlow samples from the encoder flow bank in ``flow_checkpoint``."""
        if self.where != "encoder" or self.architecture != "dual_decoder":
            return {}
        if self.needs_flows:
            return self._flow_layers(flow_checkpoint, device, p, bundle_root, **mixstyleflow_kwargs)
        return self._layers(p)

    def image_decoder_styles(
        self, flow_checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu",
        p: float = 0.5, bundle_root: str | None = None, **mixstyleflow_kwargs
    ) -> dict[int, nn.Module]:
        """``DualDecoderNet(image_decoder_styles=...)``: MaxStyle layers, or MixStyleFlow layers
        sampling from the flow bank in ``flow_checkpoint`` (loaded only for MixStyleFlow; a
        missing file stops with the Phase II command to run). ``mixstyleflow_kwargs`` go to
        :func:`msf_monai.styles.mixstyleflow_layers` (``lam``, ``sample_per``, ``pool_size``).
        Empty for a method whose styles come from a :meth:`stylizer` instead."""
        if self.where != "image_decoder" or self.uses_stylizer:
            return {}
        if not self.needs_flows:
            return self._layers(p)
        return self._flow_layers(flow_checkpoint, device, p, bundle_root, **mixstyleflow_kwargs)

    def stylizer(
        self, phase1_checkpoint: str | os.PathLike, phase1_command: str | None = None, in_channels: int = 1,
        out_channels: int = 1, p: float = 0.5, flow_style_kwargs: dict | None = None,
    ) -> nn.Module | None:
        """The frozen network that makes the stylized batch for :attr:`uses_stylizer` methods (else
        ``None``, nothing loaded): the Phase I dual-decoder network in ``phase1_checkpoint`` with
        MixStyleFlow layers after its image-decoder layers, sampling from Phase II's flow bank
        (fitted on that network's channels). ``flow_style_kwargs``: ``flow_checkpoint``,
        ``device``, ``bundle_root`` and the :func:`msf_monai.styles.mixstyleflow_layers` settings,
        as :meth:`image_decoder_styles` takes them. A missing or unfinished Phase I stops with
        ``phase1_command``; a missing Phase II with its command."""
        if not self.uses_stylizer:
            return None
        kwargs = dict(flow_style_kwargs or {})
        device = kwargs.pop("device", "cpu")
        styles, regime = self._styles_and_regime(kwargs.pop("flow_checkpoint", None), device, p,
                                                 kwargs.pop("bundle_root", None), **kwargs)
        net = DualDecoderNet(in_channels, out_channels, image_decoder_styles=styles)
        load_finished_weights(net, phase1_checkpoint, what="Phase I (the stylizer)", command=phase1_command, device=device)
        net.stats_regime = regime  # StylizerIteration runs the stylizer in the regime its flows were fitted in
        return net.to(device).requires_grad_(False)

    def check_init_from_phase1(self, init_from_phase1: bool) -> bool:
        """Refuse ``init_from_phase1`` for a method that trains another network than Phase I's
        (its weights would not load); returns whether to initialise from Phase I."""
        if init_from_phase1 and self.architecture != "dual_decoder":
            raise ConfigValueError(
                f"init_from_phase1 needs the dual-decoder network of Phase I, but style_method {self.name!r} trains a "
                f"{self.architecture!r} network; leave init_from_phase1 false"
            )
        return bool(init_from_phase1)

    def input_style(self, p: float = 0.5) -> nn.Module | None:
        """The image-level augmentation (RandConv) or ``None``."""
        return build_style_layer(self.layer, p=p) if self.where == "input" else None

    def iteration(
        self, rec_weight: float = 1.0, noise_std: float = 0.05, stylized_weight: float = 1.0, p: float = 0.5,
        maxstyle_steps: int = 5, maxstyle_lr: float = 0.1, stylized_bn: str = "frozen", stylize_mode: str = "decoded",
        stylizer: nn.Module | None = None,
    ):
        """The ``SupervisedTrainer`` ``iteration_update`` for this method (``stylized_bn`` and
        ``stylize_mode``: see :class:`msf_monai.engines.StylizedBatchIteration`; ``stylizer``:
        :meth:`stylizer`, for the methods that use one)."""
        if self.uses_stylizer:
            if stylizer is None:
                raise ConfigValueError(f"style_method {self.name!r} needs a stylizer (the frozen Phase I network)")
            regime = getattr(stylizer, "stats_regime", "train")
            return StylizerIteration(stylizer, stylizer_noise_std=noise_std, stylizer_regime=regime, rec_weight=0.0,
                                     noise_std=0.0, stylized_weight=stylized_weight, stylized_bn=stylized_bn,
                                     stylize_mode=stylize_mode)
        if self.architecture != "dual_decoder":  # a plain segmentation network: no noise, no reconstruction
            return DualDecoderIteration(rec_weight=0.0, noise_std=0.0)
        common = {"rec_weight": rec_weight, "noise_std": noise_std}
        stylized = {"stylized_weight": stylized_weight, "stylized_bn": stylized_bn, "stylize_mode": stylize_mode, **common}
        if self.name == "mixstyleflow":
            return MixStyleFlowIteration(**stylized)
        if self.name == "maxstyle":
            return MaxStyleIteration(steps=maxstyle_steps, lr=maxstyle_lr, **stylized)
        return DualDecoderIteration(input_style=self.input_style(p), **common)


METHODS: dict[str, DGMethod] = {
    m.name: m
    for m in (
        DGMethod("none", "Baseline", "none", reference="no style augmentation (Phase I recipe)"),
        DGMethod("mixstyle", "MixStyle", "encoder", (1, 2, 3), "mixstyle", "Zhou et al., ICLR 2021"),
        DGMethod("dsu", "DSU", "encoder", (0, 1, 2, 3, 4), "dsu", "Li et al., ICLR 2022"),
        DGMethod("trid", "TriD", "encoder", (1, 2), "trid", "Chen et al., MICCAI 2023"),
        DGMethod("efdm", "EFDMix", "encoder", (1, 2, 3), "efdm", "Zhang et al., CVPR 2022"),
        DGMethod("randconv", "RandConv", "input", (), "randconv", "Xu et al., ICLR 2021"),
        DGMethod("gin", "GIN", "input", (), "gin", "Ouyang et al., IEEE TMI 2022"),
        DGMethod("maxstyle", "MaxStyle", "image_decoder", (2, 3, 4), "maxstyle", "Chen et al., MICCAI 2022"),
        DGMethod("mixstyleflow", "MixStyleFlow", "image_decoder", (), "mixstyleflow", "Safdari et al."),
        DGMethod("mixstyleflow_encoder", "MixStyleFlow (encoder)", "encoder", (), "mixstyleflow",
                 "new: MixStyleFlow's flows on encoder statistics"),
        DGMethod("unet", "MONAI UNet", "none", reference="plain MONAI UNet, the reference users train instead",
                 architecture="unet"),
        DGMethod("unet_mixstyleflow", "MONAI UNet + MixStyleFlow", "image_decoder", (), "mixstyleflow",
                 "new: MixStyleFlow styles from the frozen Phase I network, for a plain MONAI UNet",
                 architecture="unet"),
    )
}


def flow_file_name(style_source: str = "image_decoder") -> str:
    """Phase II's flow checkpoint for a ``style_source``: ``style_flows.pt`` (image decoder, the
    paper's) or ``style_flows_encoder.pt``."""
    if style_source not in ("image_decoder", "encoder"):
        raise ConfigValueError(f"style_source must be 'image_decoder' or 'encoder', got {style_source!r}")
    return "style_flows.pt" if style_source == "image_decoder" else "style_flows_encoder.pt"


def get_method(name: str) -> DGMethod:
    """The method called ``name`` (case-insensitive); a clear error listing the valid names otherwise."""
    key = str(name).strip().lower()
    if key not in METHODS:
        raise ConfigValueError(f"unknown style_method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[key]
