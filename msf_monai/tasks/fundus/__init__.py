"""The fundus task (optic disc and cup in colour photographs): data lists for the 5-domain,
Drishti-GS and image/mask-folder layouts and the label formats ``grey``/``palette``/``mapping``
(:mod:`.lists`), preprocessing and the mask coding (two channels, disc including cup, and cup;
:mod:`.transforms`), the image check (:mod:`.checks`) and the synthetic multi-domain demo
(:mod:`.synthetic`)."""

from .lists import (  # noqa: F401
    FUNDUS_IMAGE_EXTENSIONS,
    FUNDUS_LAYOUTS,
    LABEL_FORMATS,
    build_fundus_datalist,
    detect_fundus_layout,
    fundus_datalist,
    fundus_image_files,
    list_drishti,
    list_fundus_domains,
    list_fundus_folder,
    parse_fundus_mapping,
)
from .transforms import (  # noqa: F401
    ChannelsToFundusMaskd,
    CupInsideDiscd,
    EnsureRGBd,
    FundusMaskToChannelsd,
    fundus_mask_to_channels,
    fundus_preprocessing,
)
from .checks import (  # noqa: F401
    check_fundus_images,
)
from .synthetic import (  # noqa: F401
    DEMO_FUNDUS_DOMAINS,
    DEMO_FUNDUS_SOURCE_DOMAIN,
    FUNDUS_DOMAIN_STYLES,
    FUNDUS_GENERATOR_VERSION,
    MASK_BACKGROUND,
    MASK_CUP,
    MASK_RIM,
    acquire_fundus,
    default_fundus_counts,
    ensure_demo_fundus,
    generate_demo_fundus,
    sample_fundus_anatomy,
)

__all__ = [
    "FUNDUS_IMAGE_EXTENSIONS",
    "FUNDUS_LAYOUTS",
    "LABEL_FORMATS",
    "parse_fundus_mapping",
    "list_fundus_domains",
    "list_drishti",
    "list_fundus_folder",
    "detect_fundus_layout",
    "build_fundus_datalist",
    "fundus_datalist",
    "fundus_image_files",
    "ChannelsToFundusMaskd",
    "FundusMaskToChannelsd",
    "CupInsideDiscd",
    "EnsureRGBd",
    "fundus_mask_to_channels",
    "fundus_preprocessing",
    "check_fundus_images",
    "DEMO_FUNDUS_SOURCE_DOMAIN",
    "DEMO_FUNDUS_DOMAINS",
    "FUNDUS_DOMAIN_STYLES",
    "FUNDUS_GENERATOR_VERSION",
    "MASK_BACKGROUND",
    "MASK_RIM",
    "MASK_CUP",
    "default_fundus_counts",
    "generate_demo_fundus",
    "ensure_demo_fundus",
    "sample_fundus_anatomy",
    "acquire_fundus",
]
