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
    "evaluation_split",
    "find_bundle_root",
    "phase_command",
    "require_file",
    "select_sites",
    "training_subset",
    "ConfigValueError",
    "MissingPhaseOutputError",
    "PhaseError",
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


#: the split settings a training run records and an evaluation must share (with their defaults)
SPLIT_DEFAULTS = {"seed": 0, "val_fraction": 0.2}


def evaluation_split(
    datalist: Sequence[dict],
    checkpoint: str | os.PathLike | None = None,
    source_site: str | None = None,
    seed: int | None = None,
    val_fraction: float | None = None,
    dataset_dir: str | os.PathLike | None = None,
) -> dict:
    """The cases to evaluate a checkpoint on, and how they were chosen.

    Every case of the unseen sites, and of the source site only the validation patients of the
    split the checkpoint was trained with, so that training patients never count as source
    results. The split (``source_site``, ``seed``, ``val_fraction``) comes from the run's
    training record (:func:`msf_monai.training_record.read_training_record`); ``None`` means
    "as in training". A value that differs from the record would evaluate another split, and
    stops with a :class:`ConfigValueError` before any work. Without a record (a bare
    checkpoint) the given ``source_site`` is split with ``seed``/``val_fraction`` (defaults 0
    and 0.2); with no source site either, every case is evaluated and the summary says that
    none is known to be unseen by training.

    Returns ``{"cases": [...], "info": {...}}``; ``info`` (written into the evaluation
    summary) names the source site, the split settings, how many source cases were evaluated
    out of how many, and where the split came from.
    """
    from msf_monai.data import split_by_patient
    from msf_monai.training_record import read_training_record

    given = {"source_site": source_site, "seed": seed, "val_fraction": val_fraction}
    record = read_training_record(checkpoint) if checkpoint is not None else None
    info: dict = {"record": None if record is None else record["file"]}
    if record is not None:
        trained = record["settings"]
        wrong = [f"--{key} {value!r} (trained with {trained.get(key)!r})" for key, value in given.items()
                 if value is not None and key in trained and _differs(value, trained.get(key))]
        if wrong:
            raise ConfigValueError(
                f"{checkpoint} was trained with another split of the data than these settings give: {', '.join(wrong)}. "
                f"Evaluating with them would count training patients as validation ones. Leave them out to use the "
                f"training run's split (from {record['file']})."
            )
        settings = {key: trained.get(key, given[key]) for key in given}
        trained_dir = trained.get("dataset_dir")
        if dataset_dir is not None and trained_dir and os.path.abspath(dataset_dir) != os.path.abspath(trained_dir):
            logging.getLogger("msf_monai.bundle").warning(
                "evaluating %s on %s, but it was trained on %s: the source site's cases are split as in training",
                checkpoint, os.path.abspath(dataset_dir), trained_dir)
            info["trained_on"] = trained_dir
    else:
        settings = dict(given)
    for key, default in SPLIT_DEFAULTS.items():
        if settings.get(key) is None:
            settings[key] = default
    info.update(settings)
    site = settings["source_site"]
    if site is None:
        sites = sorted({d["site"] for d in datalist})
        if len(sites) > 1:
            logging.getLogger("msf_monai.bundle").warning(
                "no training record for %s and no --source_site: every case of %s is evaluated; if one of these sites "
                "trained the model, its training patients are among them (give --source_site)", checkpoint, sites)
        info.update(source_cases=0, source_total=0)
        return {"cases": list(datalist), "info": info}
    source = select_sites(datalist, site)
    _, source_val = split_by_patient(source, val_fraction=float(settings["val_fraction"]), seed=int(settings["seed"]))
    info.update(source_cases=len(source_val), source_total=len(source))
    logging.getLogger("msf_monai.bundle").info(
        "evaluating the %d validation case(s) of source site %s (of %d; seed %s, val_fraction %s) and every case of the other sites",
        len(source_val), site, len(source), settings["seed"], settings["val_fraction"])
    return {"cases": list(source_val) + [d for d in datalist if d["site"] != site], "info": info}


def _differs(given, trained) -> bool:
    try:
        return float(given) != float(trained)
    except (TypeError, ValueError):
        return str(given) != str(trained)


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
