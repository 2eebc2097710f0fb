"""Small helpers that the bundle configs call: where the bundle lives, checks that a previous
phase has run, and choosing the source site of a data list."""

from __future__ import annotations

import ast
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .cli import as_bool
from .data.core import split_by_patient
from .errors import CheckpointLockedError, ConfigValueError, MissingPhaseOutputError, PhaseError, UnfinishedPhaseError
from .networks import checkpoint_architecture as _architecture_of
from .tasks.prostate.transforms import GEOMETRY_DEFAULTS
from .training_record import read_training_record

__all__ = [
    "evaluation_split",
    "find_bundle_root",
    "find_checkpoint",
    "phase_command",
    "require_file",
    "select_sites",
    "training_subset",
    "CheckpointLockedError",
    "ConfigValueError",
    "MissingPhaseOutputError",
    "PhaseError",
    "UnfinishedPhaseError",
    "arguments_for",
    "check_geometry",
    "check_overrides",
    "check_settings",
    "config_ids",
    "deterministic_algorithms",
    "trained_geometry",
]

#: the networks halve the image four times (H/16 bottleneck): image sizes are multiples of this
SIZE_DIVISOR = 16


def _whole(low: int):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"a whole number >= {low}"


def _number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False):
    def ok(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            return False
        return (v > low if low_open else v >= low) and (high is None or (v < high if high_open else v <= high))

    text = f"a number {'>' if low_open else '>='} {low}" + ("" if high is None else f" and {'<' if high_open else '<='} {high}")
    return ok, text


def _choice(*values: str):
    return (lambda v: v in values), "one of " + ", ".join(repr(v) for v in values)


def _or_auto(check):
    ok, text = check
    return (lambda v: (isinstance(v, str) and v.strip().lower() == "auto") or ok(v)), text + " (or auto)"


def _boolean():
    def ok(v) -> bool:
        try:
            as_bool(v, "")
        except ValueError:
            return False
        return True

    return ok, "true or false"


def _optional(check):
    ok, text = check
    return (lambda v: v is None or ok(v)), text + " (or None)"


#: the documented settings that can be checked without reading data: id -> (test, what it must be)
SETTING_RULES = {
    "epochs": _whole(1),
    "batch_size": _whole(1),
    "val_interval": _whole(1),
    "checkpoint_interval": _whole(1),
    "num_workers": _or_auto(_whole(0)),
    "seed": _whole(0),
    "lr": _number(0, low_open=True),
    "val_fraction": _number(0, 1, low_open=True, high_open=True),
    "train_fraction": _number(0, 1, low_open=True),
    "rec_weight": _number(0),
    "noise_std": _number(0),
    "style_p": _number(0, 1),
    "bias_field_prob": _number(0, 1),
    "bias_field_coeff": _number(0),
    "resample": _choice("resize", "spacing"),
    "pixel_spacing": _number(0, low_open=True),
    "field_of_view": _number(0, low_open=True),
    "stylized_weight": _number(0),
    "style_guard_range": _optional(_number(0, low_open=True)),
    "maxstyle_steps": _whole(1),
    "maxstyle_lr": _number(0, low_open=True),
    "stylized_bn": _choice("frozen", "train"),
    "stylize_mode": _choice("decoded", "residual"),
    "eval_space": _choice("original", "resized"),
    "dice": _choice("volume", "slice"),
    "eval_slices": _choice("all", "foreground"),
    "checkpoint_policy": _choice("best", "last"),
    "stats_regime": _choice("train", "eval"),
    "style_source": _choice("image_decoder", "encoder"),
    "statistic": _choice("std", "variance"),
    "flow_base": _choice("standard", "diagonal"),
    "flow_batch_size": _whole(1),
    "flow_val_fraction": _number(0, 1, low_open=True, high_open=True),
    "grad_clip": _number(0, low_open=True),
    "style_shift_quantile": _number(0, 1),
    "amp": _or_auto(_boolean()),
    "resume": _boolean(),
    "deterministic": _boolean(),
    "compile": _boolean(),
    "init_from_phase1": _boolean(),
    "overwrite": _boolean(),
    "style_shift": _boolean(),
}


def _device_problem(device) -> str | None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return f"--device {device!r}: not a device (e.g. cpu, cuda, cuda:0)"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {device!r}: this machine has no CUDA device (torch.cuda.is_available() is False); use --device cpu"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def check_settings(image_size=None, style_layers=None, temperatures=None, style_source="image_decoder", device=None,
                   style_temperatures=None, **settings) -> bool:
    """Check the settings of a run before any work, all at once: one :class:`ConfigValueError`
    lists every bad one, so a typo never surfaces as a traceback deep inside training.

    ``image_size`` must be a positive multiple of 16 (the networks downsample by 16);
    ``style_layers`` are image-decoder layers 1..4 (or encoder stages 0..4 for
    ``style_source="encoder"``); ``temperatures`` needs one positive value per entry of
    ``style_layers`` (``style_temperatures``, Phase III's override of the flows' temperatures,
    too, when given); ``device`` must exist on this machine; every other keyword is checked
    against :data:`SETTING_RULES` (type and range)."""
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
    for key, value in settings.items():
        if key not in SETTING_RULES:
            raise TypeError(f"check_settings: no rule for {key!r}")
        ok, what = SETTING_RULES[key]
        if not ok(value):
            problems.append(f"--{key} {value!r}: must be {what}")
    if device is not None:
        problem = _device_problem(device)
        if problem:
            problems.append(problem)
    if style_source not in ("image_decoder", "encoder"):
        problems.append(f"--style_source {style_source!r}: must be one of 'image_decoder', 'encoder'")
        style_source = "image_decoder"
    if style_layers is not None:
        layers = list(style_layers) if isinstance(style_layers, (list, tuple)) else [style_layers]
        low, what, example = (0, "encoder stages", "[1, 2, 3]") if style_source == "encoder" else (1, "image-decoder layers", "[2, 3, 4]")
        bad = [k for k in layers if not (isinstance(k, int) and low <= k <= 4)]
        if bad or not layers or len(set(layers)) != len(layers):
            problems.append(f"--style_layers {style_layers!r}: must be distinct {what} from {low} to 4, e.g. {example}")
        if temperatures is not None:
            problems += _temperature_problems("temperatures", temperatures, style_layers, len(layers))
    if style_temperatures is not None:
        problems += _temperature_problems("style_temperatures", style_temperatures, None, None)
    if problems:
        raise ConfigValueError("invalid settings, nothing was run:\n  " + "\n  ".join(problems))
    return True


def _temperature_problems(name: str, temperatures, style_layers, n_layers: int | None) -> list[str]:
    temps = list(temperatures) if isinstance(temperatures, (list, tuple)) else [temperatures]
    if n_layers is not None and len(temps) != n_layers:
        return [f"--{name} {temperatures!r} has {len(temps)} value(s) but --style_layers {style_layers!r} has "
                f"{n_layers}: give one temperature per style layer"]
    ok, _ = _number(0, low_open=True)
    if not all(ok(t) for t in temps):
        return [f"--{name} {temperatures!r}: every temperature must be a positive number"]
    return []


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


#: arguments of ``python -m monai.bundle run`` itself, not config ids
RUN_ARGUMENTS = ("run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file")


def config_ids(config_files: str | os.PathLike | Sequence[str | os.PathLike]) -> set[str]:
    """Every id of the config files (merged as ``monai.bundle run`` merges them), nested ones
    written ``a#b#0``."""
    from monai.bundle import ConfigParser

    files = [config_files] if isinstance(config_files, (str, os.PathLike)) else list(config_files)
    ids: set[str] = set()

    def walk(value, prefix: str) -> None:
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, sub in items:
            name = f"{prefix}#{key}" if prefix else str(key)
            ids.add(name)
            walk(sub, name)

    walk(ConfigParser.load_config_files([os.fspath(f) for f in files]), "")
    return ids


def _overrides_from_argv(argv: Sequence[str]) -> list[str]:
    """The ``--key`` names given to ``python -m monai.bundle run`` (``--key value``,
    ``--key=value`` or a bare ``--flag``), and the keys of its ``--args_file``."""
    keys = []
    for arg in argv:
        if arg == "--":
            break
        if arg.startswith("--") and len(arg) > 2:
            keys.append(arg[2:].split("=", 1)[0])
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--args_file" and i + 1 < len(argv) else arg.split("=", 1)[1] if arg.startswith("--args_file=") else None
        if path:
            from monai.bundle import ConfigParser

            keys += [str(k) for k in ConfigParser.load_config_file(path)]
    return [k.replace("::", "#") for k in keys]


def unknown_text(unknown: dict[str, list[str]]) -> str:
    """``--epoch (did you mean --epochs?)``, one per unknown key, comma separated."""
    return ", ".join(f"--{k}" + (f" (did you mean {' or '.join('--' + m for m in near)}?)" if near else "")
                     for k, near in unknown.items())


def unknown_overrides(keys: Sequence[str], ids: set[str]) -> dict[str, list[str]]:
    """``{key: nearest known ids}`` for the override keys that name no id of the config. A new
    key under a component (a dict with ``_target_``) is a keyword argument, and allowed."""
    import difflib

    top = sorted(i for i in ids if "#" not in i)
    unknown = {}
    for key in dict.fromkeys(keys):
        if key in RUN_ARGUMENTS or key in ids:
            continue
        parent = key.rsplit("#", 1)[0] if "#" in key else None
        if parent is not None and f"{parent}#_target_" in ids:
            continue
        pool = sorted(ids) if "#" in key else top
        unknown[key] = difflib.get_close_matches(key, pool, n=3, cutoff=0.6)
    return unknown


def arguments_for(config_file: str | os.PathLike, args: Sequence[str], all_config_files: Sequence[str | os.PathLike] = ()) -> list[str]:
    """The ``--key value`` pairs of ``args`` that ``config_file`` has ids for, so that one set of
    settings can be passed to several configs (``scripts/demo.sh --epochs 2``: the phases get
    it, evaluation does not). A key that none of ``all_config_files`` (nor ``config_file``)
    has stops with :class:`ConfigValueError`, as :func:`check_overrides` would."""
    pairs: list[tuple[str, list[str]]] = []
    for arg in args:
        if arg.startswith("--") and len(arg) > 2:
            pairs.append((arg[2:].split("=", 1)[0].replace("::", "#"), [arg]))
        elif pairs:
            pairs[-1][1].append(arg)
        else:
            raise ConfigValueError(f"expected --key value settings, got {arg!r}")
    keys = [k for k, _ in pairs]
    every = set().union(*(config_ids(f) for f in [config_file, *all_config_files]))
    unknown = unknown_overrides(keys, every)
    if unknown:
        raise ConfigValueError("unknown setting(s): " + unknown_text(unknown))
    mine = unknown_overrides(keys, config_ids(config_file))
    return [token for key, tokens in pairs if key not in mine for token in tokens]


def check_overrides(argv: Sequence[str] | None = None) -> bool:
    """Stop a ``python -m monai.bundle run`` whose command line names a setting the config does
    not have (e.g. ``--epoch 1`` for ``--epochs``: MONAI would add it as a new id and ignore it),
    before any work, with the nearest known ids. Other callers (a Python program building the
    workflow itself) are not checked: their overrides are not on ``sys.argv``."""
    argv = list(sys.argv if argv is None else argv)
    files = _config_files_from_argv(argv)
    bundle_run = len(argv) > 1 and argv[1] == "run" and argv[0].replace(os.sep, "/").endswith("monai/bundle/__main__.py")
    if not files or not bundle_run:
        return True
    unknown = unknown_overrides(_overrides_from_argv(argv[1:]), config_ids(files))
    if unknown:
        names = ", ".join(Path(f).name for f in files)
        raise ConfigValueError(f"unknown setting(s) for {names}, nothing was run: " + unknown_text(unknown)
                               + "\nThe settings each config takes are listed in the bundle's docs/README.md.")
    return True


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


def find_checkpoint(checkpoint: str | os.PathLike, bundle_root: str | os.PathLike) -> str:
    """The absolute path of a ``--checkpoint``: as given (absolute, or relative to the current
    directory), else relative to the bundle folder (``--checkpoint models/phase1_model.pt``).
    A missing file stops with the command of the phase that writes it (Phase I for
    ``phase1_model*.pt``, else Phase III)."""
    path = Path(checkpoint)
    found = _existing_checkpoint(checkpoint, bundle_root)
    if found is not None:
        return str(found.resolve())
    candidates = _checkpoint_candidates(checkpoint, bundle_root)
    phase = "phase1" if path.name.startswith("phase1_model") else "phase3"
    where = " or ".join(str(c) for c in candidates)
    raise MissingPhaseOutputError(f"checkpoint not found: {where}\nCreate it first with:\n  {phase_command(bundle_root, phase)}")


def checkpoint_architecture(checkpoint: str | os.PathLike, bundle_root: str | os.PathLike | None = None) -> str:
    """The architecture of a ``--checkpoint`` (``unet`` or ``dual_decoder``, see
    :func:`msf_monai.networks.checkpoint_architecture`), found where :func:`find_checkpoint`
    looks. A missing file gives ``dual_decoder`` instead of an error, so that configs that only
    build the network (``ckpt_export``, ``verify_net_in_out``) work without a trained model."""
    found = _existing_checkpoint(checkpoint, bundle_root)
    return "dual_decoder" if found is None else _architecture_of(str(found))


def _existing_checkpoint(checkpoint: str | os.PathLike, bundle_root: str | os.PathLike | None) -> Path | None:
    """The first of :func:`_checkpoint_candidates` that is a file, else ``None``."""
    return next((c for c in _checkpoint_candidates(checkpoint, bundle_root) if c.is_file()), None)


def _checkpoint_candidates(checkpoint: str | os.PathLike, bundle_root: str | os.PathLike | None) -> list[Path]:
    """Where a ``--checkpoint`` may be: as given, else (when relative) inside the bundle folder."""
    path = Path(checkpoint)
    return [path] if path.is_absolute() or bundle_root is None else [Path.cwd() / path, Path(bundle_root) / path]


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
    test_list: Sequence[dict] | None = None,
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

    ``test_list`` (the cases of ``--test_dirs``, :func:`msf_monai.data.external_datalist`)
    replaces the other sites of ``datalist`` as the unseen part: the source validation patients
    are still evaluated (from ``datalist``), then every test case.

    Returns ``{"cases": [...], "info": {...}}``; ``info`` (written into the evaluation
    summary) names the source site, the split settings, how many source cases were evaluated
    out of how many, and where the split came from.
    """
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
    if test_list is not None:
        info["test_dirs"] = sorted({d["test_dir"] for d in test_list if "test_dir" in d})
    site = settings["source_site"]
    sites = sorted({d["site"] for d in datalist})
    if site is None and len(sites) == 1:  # a one-site data set is the source (as training takes it)
        site = settings["source_site"] = info["source_site"] = sites[0]
    if site is None:
        if test_list is not None:
            info.update(source_cases=0, source_total=0)
            return {"cases": list(test_list), "info": info}
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
        "evaluating the %d validation case(s) of source site %s (of %d; seed %s, val_fraction %s) and every case of %s",
        len(source_val), site, len(source), settings["seed"], settings["val_fraction"],
        "the other sites" if test_list is None else f"the test folders ({len(test_list)})")
    unseen = [d for d in datalist if d["site"] != site] if test_list is None else list(test_list)
    return {"cases": list(source_val) + unseen, "info": info}


def trained_geometry(checkpoint: str | os.PathLike | None, image_size: int | None = None,
                     bundle_root: str | os.PathLike | None = None) -> dict:
    """The in-plane geometry the run that wrote ``checkpoint`` preprocessed with, from its
    training record: ``resample``, ``pixel_spacing``, ``field_of_view`` (the defaults, i.e.
    ``resize``, when the record names none or there is no record) and ``image_size`` (the
    given ``image_size`` when the record has none). Later phases, evaluation and inference take
    their defaults from it, so ``--resample spacing`` and ``--image_size`` are given once, to
    the training run: a model applied at another size or geometry sees organs at another scale.
    A relative ``checkpoint`` is looked for as :func:`find_checkpoint` does when ``bundle_root``
    is given; a missing one gives the defaults without an error, so that the settings check runs
    first and the missing file is reported by ``find_checkpoint`` with the command that makes it."""

    found = [c for c in _checkpoint_candidates(checkpoint, bundle_root) if c.is_file()] if checkpoint is not None else []
    record = read_training_record(found[0]) if found else None
    settings = (record or {}).get("settings", {})
    stored = settings.get("geometry") or {}
    geometry = {key: stored.get(key, default) for key, default in GEOMETRY_DEFAULTS.items()}
    geometry["image_size"] = settings.get("image_size", image_size)
    return geometry


def check_geometry(checkpoint: str | os.PathLike, geometry: dict | None, what: str = "this run") -> bool:
    """Stop, before any work, a run whose in-plane geometry differs from the one ``checkpoint``
    was trained with (e.g. ``--resample resize`` on a model trained with ``spacing``): the
    network would see organs at another scale and fail silently. ``geometry`` is
    :func:`msf_monai.tasks.prostate.geometry_settings`'s value (``None`` for ``resize``)."""

    trained = trained_geometry(checkpoint)
    now = {**GEOMETRY_DEFAULTS, **(geometry or {})}
    keys = ["resample"] + (["pixel_spacing", "field_of_view"] if "spacing" in (now["resample"], trained["resample"]) else [])
    wrong = [f"--{key} {now[key]!r} (trained with {trained[key]!r})" for key in keys if _differs(now[key], trained[key])]
    if wrong:
        fix = " ".join(f"--{key} {trained[key]}" for key in keys)
        raise ConfigValueError(f"{checkpoint} was trained with another in-plane geometry than {what} would use: "
                               f"{', '.join(wrong)}. Leave these settings out to use the training run's ({fix}).")
    if now["resample"] == "spacing":
        logging.getLogger("msf_monai.bundle").info(
            "%s: slices resampled to %g mm and a %g mm field of view, as %s was trained", what, now["pixel_spacing"],
            now["field_of_view"], Path(checkpoint).name)
    return True


def _differs(given, trained) -> bool:
    try:
        return float(given) != float(trained)
    except (TypeError, ValueError):
        return str(given) != str(trained)


def training_subset(train_list: Sequence[dict], fraction: float = 1.0, seed: int = 0) -> list[dict]:
    """The first ``fraction`` of the training patients (at least one), drawn with ``seed``: the
    low-data regime of the papers (``--train_fraction 0.1`` / ``0.3``). ``1.0`` keeps all.
    Patients are kept whole (all slices of a volume), as in :func:`split_by_patient`."""

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
