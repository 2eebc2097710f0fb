"""What every task's data code shares: data-list errors and patient splits (:mod:`.core`), the
data-check result and its error (:mod:`.validation`), slice datasets (:mod:`.slices`), test
folders beside the training data (:mod:`.external_sites`), installing a generated demo folder
(:mod:`.demo_install`) and preparing the public archives (:mod:`.prepare`, imported on use). The
task-specific lists, transforms, checks and demo generators are in :mod:`msf_monai.tasks`."""

from .core import (  # noqa: F401
    DataListError,
    broken_link_problem,
    check_root,
    group_by_site,
    is_broken_link,
    is_visible,
    natural_key,
    patient_key,
    same_output_name_problems,
    split_by_patient,
)
from .validation import (  # noqa: F401
    DataCheck,
    DataValidationError,
    MIN_IMAGE_SIZE,
    constant_image_problem,
    exit_on_data_errors,
    finish_check,
    values_text,
)
from .slices import (  # noqa: F401
    SliceDataset,
    extract_slices,
)
from .external_sites import (  # noqa: F401
    external_datalist,
    parse_test_dirs,
)
from .demo_install import (  # noqa: F401
    DEMO_INFO_FILE,
    absolute_items,
    demo_info,
    install_generated,
    listed_files_exist,
    write_demo_info,
)

__all__ = [
    "DataListError",
    "broken_link_problem",
    "check_root",
    "group_by_site",
    "is_broken_link",
    "is_visible",
    "natural_key",
    "patient_key",
    "same_output_name_problems",
    "split_by_patient",
    "MIN_IMAGE_SIZE",
    "DataCheck",
    "DataValidationError",
    "constant_image_problem",
    "exit_on_data_errors",
    "finish_check",
    "values_text",
    "extract_slices",
    "SliceDataset",
    "external_datalist",
    "parse_test_dirs",
    "DEMO_INFO_FILE",
    "demo_info",
    "install_generated",
    "write_demo_info",
    "listed_files_exist",
    "absolute_items",
]
