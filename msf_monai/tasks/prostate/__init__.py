"""The prostate MRI task: data lists for the Decathlon, multi-site and image/label-folder
layouts (:mod:`.lists`), spacing- or resize-based preprocessing that inference can invert
(:mod:`.transforms`), the volume check run before any work (:mod:`.checks`) and the synthetic
multi-site demo (:mod:`.synthetic`). Label coding: one channel, the whole gland (every label
value >= 0.5; zonal labels are merged)."""

from .lists import (  # noqa: F401
    IMAGE_EXTENSIONS,
    LAYOUTS,
    build_datalist,
    detect_layout,
    image_files,
    layout_channel,
    list_decathlon,
    list_image_label_folder,
    list_multisite,
    prostate_datalist,
)
from .transforms import (  # noqa: F401
    GEOMETRY_DEFAULTS,
    OriginalLabeld,
    RESAMPLE_MODES,
    SelectChanneld,
    geometry_settings,
    prostate_preprocessing,
    spacing_canvas,
)
from .checks import (  # noqa: F401
    check_volumes,
)
from .synthetic import (  # noqa: F401
    DEMO_SITES,
    DEMO_SOURCE_SITE,
    GENERATOR_VERSION,
    SITE_STYLES,
    acquire,
    default_cases_per_site,
    ensure_demo_prostate,
    generate_demo_prostate,
    sample_anatomy,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "list_multisite",
    "list_decathlon",
    "list_image_label_folder",
    "layout_channel",
    "detect_layout",
    "build_datalist",
    "prostate_datalist",
    "image_files",
    "GEOMETRY_DEFAULTS",
    "OriginalLabeld",
    "RESAMPLE_MODES",
    "SelectChanneld",
    "geometry_settings",
    "prostate_preprocessing",
    "spacing_canvas",
    "check_volumes",
    "DEMO_SOURCE_SITE",
    "DEMO_SITES",
    "GENERATOR_VERSION",
    "SITE_STYLES",
    "default_cases_per_site",
    "generate_demo_prostate",
    "ensure_demo_prostate",
    "sample_anatomy",
    "acquire",
]
