"""MixStyleFlow for MONAI: domain generalisation for segmentation with normalizing-flow styles.

Importing the package imports its modules, so bundle configs need only ``"$import msf_monai"``
to refer to e.g. ``msf_monai.networks.DualDecoderNet``.
"""

__version__ = "0.1.0"

from . import accelerator, bundle, cli, data, distributed, engines, files, flow_fit, flow_model, flow_stack, flows, fundus_transforms, handlers, locks, methods, networks, outputs, resume, style_shift, styles, transforms  # noqa: E402,F401
