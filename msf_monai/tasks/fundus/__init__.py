"""The fundus task (optic disc and cup in colour photographs): data lists for the 5-domain,
Drishti-GS and image/mask-folder layouts and the label formats ``grey``/``palette``/``mapping``
(:mod:`.lists`), the transforms the config's preprocessing list needs beyond MONAI and the mask
coding (two channels, disc including cup, and cup; :mod:`.transforms`), the image check
(:mod:`.checks`) and the synthetic multi-domain demo (:mod:`.synthetic`)."""

from . import checks, lists, synthetic, transforms
from .lists import *  # noqa: F401,F403  (each module lists its public names in __all__)
from .transforms import *  # noqa: F401,F403
from .checks import *  # noqa: F401,F403
from .synthetic import *  # noqa: F401,F403

__all__ = lists.__all__ + transforms.__all__ + checks.__all__ + synthetic.__all__
