"""What every task's data code shares: data-list errors, patient splits and image/label pairing
(:mod:`.core`), the data-check result and its error (:mod:`.validation`), slice datasets
(:mod:`.slices`), test folders beside the training data (:mod:`.external_sites`), installing a
generated demo folder (:mod:`.demo_install`), the label as stored for original-geometry Dice
(:mod:`.original_label`) and preparing the public archives (:mod:`.prepare`, imported on use).
The task-specific lists, transforms, checks and demo generators are in :mod:`msf_monai.tasks`."""

from . import core, demo_install, external_sites, original_label, slices, validation
from .core import *  # noqa: F401,F403  (each module lists its public names in __all__)
from .validation import *  # noqa: F401,F403
from .slices import *  # noqa: F401,F403
from .external_sites import *  # noqa: F401,F403
from .demo_install import *  # noqa: F401,F403
from .original_label import *  # noqa: F401,F403

__all__ = core.__all__ + validation.__all__ + slices.__all__ + external_sites.__all__ + demo_install.__all__ + original_label.__all__
