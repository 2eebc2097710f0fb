"""One package per segmentation task: everything that knows the task's data.

Each task package holds its data lists (``lists``: which public layouts it reads), the
transforms and settings its bundle config's ``preprocessing`` list needs beyond MONAI
(``transforms``), its data check (``checks``) and its synthetic demo generator (``synthetic``).
What the tasks share (the list errors, patient splits, the data-check result, demo-folder
installation) lives in :mod:`msf_monai.data`; nothing in one task imports the other.

* :mod:`msf_monai.tasks.prostate` -- prostate MRI volumes (NIfTI, MetaImage, NRRD), one label
  channel (whole gland).
* :mod:`msf_monai.tasks.fundus` -- colour fundus photographs, optic disc and cup.
"""

from . import fundus, prostate  # noqa: F401

__all__ = ["fundus", "prostate"]
