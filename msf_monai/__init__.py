"""MixStyleFlow for MONAI: domain generalisation for segmentation with normalizing-flow styles.

Importing the package imports its modules, so bundle configs need only ``"$import msf_monai"``
to refer to e.g. ``msf_monai.networks.DualDecoderNet``. It also installs the error policy's
``sys.excepthook`` (:mod:`msf_monai.errors`): an uncaught user error prints its message alone.
"""

__version__ = "0.1.0"

from . import accelerator, bundle, cli, data, distributed, engines, errors, files, flow_fit, flow_model, flow_stack, flows, handlers, locks, methods, networks, outputs, resume, saved_state, style_shift, styles, tasks  # noqa: E402,F401

errors.install_excepthook()  # uncaught user errors: their message alone, exit status 1 (msf_monai.errors)
