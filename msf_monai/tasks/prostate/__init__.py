"""The prostate MRI task: data lists for the Decathlon, multi-site and image/label-folder layouts
(:mod:`.lists`), what the config's spacing- or resize-based preprocessing list needs beyond
MONAI (:mod:`.transforms`), the volume check run before any work (:mod:`.checks`) and the
synthetic multi-site demo (:mod:`.synthetic`). Label coding: one channel, the whole gland (every
label value >= 0.5; zonal labels are merged)."""

from . import checks, lists, synthetic, transforms
from .lists import *  # noqa: F401,F403  (each module lists its public names in __all__)
from .transforms import *  # noqa: F401,F403
from .checks import *  # noqa: F401,F403
from .synthetic import *  # noqa: F401,F403

__all__ = lists.__all__ + transforms.__all__ + checks.__all__ + synthetic.__all__
