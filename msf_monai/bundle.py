"""Small helpers that the bundle configs call: where the bundle lives, checks that a previous
phase has run, and choosing the source site of a data list."""

from __future__ import annotations

import ast
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "evaluation_list",
    "find_bundle_root",
    "phase_command",
    "require_file",
    "select_sites",
    "training_subset",
    "CheckpointLockedError",
    "ConfigValueError",
    "MissingPhaseOutputError",
    "PhaseError",
    "UnfinishedPhaseError",
    "check_settings",
    "deterministic_algorithms",
]

#: the networks halve the image four times (H/16 bottleneck): image sizes are multiples of this
SIZE_DIVISOR = 16


class MissingPhaseOutputError(SystemExit):
    """A phase needs a file that an earlier phase writes.

    A ``SystemExit`` on purpose: MONAI's config evaluation wraps ordinary exceptions in a long
    traceback, while this one reaches the user as its message alone, with exit status 1."""


class ConfigValueError(SystemExit):
    """A config value that cannot work (e.g. an unknown ``style_method``), found before any work.

    A ``SystemExit`` for the same reason as :class:`MissingPhaseOutputError`: the user sees the
    message, not a traceback from inside MONAI's config parser; exit status 1."""


class PhaseError(SystemExit):
    """A phase stopped on a problem it explains (e.g. a diverged flow fit); message only, exit 1."""


class CheckpointLockedError(PhaseError):
    """Another run holds the lock of the checkpoint this run would write (or read while it is
    being written); see :mod:`msf_monai.locks`. Message only, exit 1."""


class UnfinishedPhaseError(MissingPhaseOutputError):
    """A phase's input comes from an earlier phase's run that did not finish (or was replaced
    after it finished); see :func:`msf_monai.resume.require_finished_run`. Message only, exit 1."""


def check_settings(image_size=None, style_layers=None, temperatures=None, style_source="image_decoder") -> bool:
    """Check settings that would otherwise fail deep inside a run; one :class:`ConfigValueError`
    naming every bad one. ``image_size`` must be a positive multiple of 16 (the networks
    downsample by 16); ``style_layers`` are image-decoder layers 1..4 (or encoder stages 0..4
    for ``style_source="encoder"``); ``temperatures`` needs one value per entry of ``style_layers``."""
    problems = []
    if image_size is not None:
        try:
            size = int(image_size)
            ok = size == float(image_size) and size >= SIZE_DIVISOR and size % SIZE_DIVISOR == 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            problems.append(f"--image_size {image_size!r}: must be a positive multiple of {SIZE_DIVISOR} "
                            f"(the networks halve the image 4 times), e.g. 32, 96, 384")
    if style_layers is not None:
        layers = list(style_layers) if isinstance(style_layers, (list, tuple)) else [style_layers]
        low, what, example = (0, "encoder stages", "[1, 2, 3]") if style_source == "encoder" else (1, "image-decoder layers", "[2, 3, 4]")
        bad = [k for k in layers if not (isinstance(k, int) and low <= k <= 4)]
        if bad or not layers or len(set(layers)) != len(layers):
            problems.append(f"--style_layers {style_layers!r}: must be distinct {what} from {low} to 4, e.g. {example}")
        if temperatures is not None:
            temps = list(temperatures) if isinstance(temperatures, (list, tuple)) else [temperatures]
            if len(temps) != len(layers):
                problems.append(f"--temperatures {temperatures!r} has {len(temps)} value(s) but --style_layers "
                                f"{style_layers!r} has {len(layers)}: give one temperature per style layer")
            else:
                for t in temps:
                    try:
                        if not float(t) > 0:
                            raise ValueError
                    except (TypeError, ValueError):
                        problems.append(f"--temperatures {temperatures!r}: every temperature must be a positive number")
                        break
    if problems:
        raise ConfigValueError("invalid settings, nothing was run:\n  " + "\n  ".join(problems))
    return True


def deterministic_algorithms(enabled) -> bool:
    """``--deterministic true``: make PyTorch use deterministic kernels where it has them
    (``torch.use_deterministic_algorithms(True, warn_only=True)``: a warning, not an error, for
    an operation without one; sets ``CUBLAS_WORKSPACE_CONFIG`` for cuBLAS on CUDA). Slower on
    GPU. ``set_determinism(seed)`` (always called) already seeds every generator and makes
    cuDNN pick deterministic convolution algorithms."""
    import torch

    enabled = str(enabled).strip().lower() in ("true", "1", "yes") if isinstance(enabled, str) else bool(enabled)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return enabled


def _config_files_from_argv(argv: Sequence[str]) -> list[str]:
    for i, arg in enumerate(argv):
        value = None
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        if value is not None:
            if value.strip().startswith("["):
                return [str(v) for v in ast.literal_eval(value)]
            return [v for v in value.split(",") if v]
    return []


def find_bundle_root(name: str, argv: Sequence[str] | None = None) -> str:
    """The folder of bundle ``name``, whatever the current directory.

    MONAI's ``bundle_root`` would default to the current directory; our configs call this so
    that ``python -m monai.bundle run --config_file bundles/prostate/configs/phase1.json``
    reads and writes inside ``bundles/prostate`` when run from the repository root. Looks, in
    order, at: the ``--config_file`` argument (its ``configs/`` folder's parent), the current
    directory if it is the bundle, and ``./bundles/<name>``. Override with ``--bundle_root``.
    """
    argv = sys.argv if argv is None else argv
    for cfg in _config_files_from_argv(argv):
        path = Path(cfg).resolve()
        if path.parent.name == "configs":
            return str(path.parent.parent)
    cwd = Path.cwd()
    if (cwd / "configs" / "metadata.json").is_file() and (cwd.name == name or (cwd / "configs" / "phase1.json").is_file()):
        return str(cwd)
    candidate = cwd / "bundles" / name
    if (candidate / "configs").is_dir():
        return str(candidate)
    return str(cwd)


def require_file(path: str | os.PathLike, how_to_create: str) -> str:
    """Return ``path`` if it exists, else raise a clear error naming it and the command that
    creates it (e.g. Phase III before Phase II)."""
    if not Path(path).is_file():
        raise MissingPhaseOutputError(f"required file not found: {path}\nCreate it first with:\n  {how_to_create}")
    return str(path)


def select_sites(datalist: Sequence[dict], sites: str | Sequence[str] | None, role: str = "source") -> list[dict]:
    """Items of the data list whose ``site`` is one of ``sites``; a clear error listing the
    available sites when none match (:class:`ConfigValueError`). ``None`` takes the only site of a
    one-site dataset."""
    available = sorted({d["site"] for d in datalist})
    if sites is None:
        if len(available) != 1:
            raise ConfigValueError(f"the dataset has several sites {available}: choose the {role} site, e.g. --{role}_site {available[0]}")
        return list(datalist)
    wanted = [sites] if isinstance(sites, str) else list(sites)
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise ConfigValueError(f"{role} site(s) {unknown} not in the dataset; available sites: {available}")
    return [d for d in datalist if d["site"] in wanted]


def evaluation_list(
    datalist: Sequence[dict], source_site: str | None, val_fraction: float = 0.2, seed: int = 0
) -> list[dict]:
    """Cases to evaluate: every case of the unseen sites, and of the source site only the
    validation patients (the same split as training), so training cases never inflate the
    source site's Dice. With ``source_site=None`` every case is evaluated."""
    from msf_monai.data import split_by_patient

    if source_site is None:
        return list(datalist)
    source = select_sites(datalist, source_site)
    _, source_val = split_by_patient(source, val_fraction=val_fraction, seed=seed)
    return list(source_val) + [d for d in datalist if d["site"] != source_site]


def training_subset(train_list: Sequence[dict], fraction: float = 1.0, seed: int = 0) -> list[dict]:
    """The first ``fraction`` of the training patients (at least one), drawn with ``seed``: the
    low-data regime of the papers (``--train_fraction 0.1`` / ``0.3``). ``1.0`` keeps all.
    Patients are kept whole (all slices of a volume), as in :func:`split_by_patient`."""
    from msf_monai.data import split_by_patient

    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        fraction = float("nan")
    if not 0.0 < fraction <= 1.0:
        raise ConfigValueError(f"train_fraction must be in (0, 1], got {fraction!r}")
    if fraction == 1.0:
        return list(train_list)
    subset, _ = split_by_patient(train_list, val_fraction=1.0 - fraction, seed=seed)
    logging.getLogger(__name__).info("train_fraction %.2f: training on %d of %d items", fraction, len(subset), len(train_list))
    return subset


def phase_command(bundle_root: str | os.PathLike, config: str) -> str:
    """The command that runs config ``config`` (e.g. ``"phase2"``) of the bundle at
    ``bundle_root``, with the path as the user would type it from the current directory."""
    path = Path(bundle_root) / "configs" / f"{config}.json"
    try:
        shown = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        shown = str(path)
    return f"python -m monai.bundle run --config_file {shown}"
