"""Package a trained bundle as a MONAI model-zoo archive (a zip) that a colleague or a hospital
can unpack anywhere and run.

    python scripts/package_bundle.py prostate                     # -> ./prostate_v0.1.0.zip
    python scripts/package_bundle.py fundus --output_dir dist --image_size 512

The archive holds one folder named after the bundle with

* ``configs/``: every config (metadata, inference, evaluation, the training phases and the
  multi-GPU overlay) and ``logging.conf``;
* ``docs/`` and ``LICENSE``;
* ``models/model.pt``: the segmentation network (required), and what the style-shift score
  needs: ``phase1_model.pt``, ``style_flows.pt`` and ``style_shift.json`` (all three, or none
  with a warning: inference then writes masks without scores).

The archive's ``inference.json`` and ``evaluate.json`` get a fixed ``image_size``: the size the
model was trained at (``--image_size``, else the one recorded by Phase II in
``style_flows.pt``), because the configs' default depends on whether the demo data are used,
which says nothing about the model. After unpacking::

    python -m monai.bundle run --config_file prostate/configs/inference.json --input_dir <folder of images>

writes the masks (and ``style_shift.csv``) to ``prostate/inference/``. Nothing needs the demo
data or this repository's folder layout; the ``msf_monai`` package must be installed
(``required_packages_version`` in ``metadata.json``).
"""

from __future__ import annotations

import json
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIRED_MODELS = ("model.pt",)
STYLE_SHIFT_MODELS = ("phase1_model.pt", "style_flows.pt", "style_shift.json")
SIZED_CONFIGS = ("inference.json", "evaluate.json")


class PackagingError(SystemExit):
    """A clear message and exit status 1, no traceback."""


def _trained_image_size(models: Path) -> int | None:
    flows = models / "style_flows.pt"
    if flows.is_file():
        import torch

        payload = torch.load(flows, map_location="cpu", weights_only=True)
        size = (payload.get("metadata") or {}).get("image_size")
        if size is not None:
            return int(size)
    calibration = models / "style_shift.json"
    if calibration.is_file():
        size = json.loads(calibration.read_text()).get("image_size")
        if size is not None:
            return int(size)
    return None


def _check_model(path: Path, in_channels: int, out_channels: int) -> None:
    import torch

    from msf_monai.networks import build_network, checkpoint_architecture

    architecture = checkpoint_architecture(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        build_network(architecture, in_channels, out_channels, segmentation_only=True).load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - reported with the file name
        raise PackagingError(f"{path} is not a checkpoint of this bundle's network "
                             f"({architecture}, {in_channels} -> {out_channels} channels): {exc}") from exc


def package(
    bundle: str = "prostate",
    output_dir: str = ".",
    bundle_root: str | None = None,
    image_size: int | None = None,
    style_shift: bool = True,
) -> str:
    """Write ``<output_dir>/<bundle>_v<version>.zip`` from a trained bundle; returns its path.

    Args:
        bundle: bundle name (``prostate`` or ``fundus``), i.e. ``bundles/<bundle>``.
        output_dir: where to write the zip.
        bundle_root: the bundle folder, if not ``bundles/<bundle>`` of this repository.
        image_size: the in-plane size the model was trained at (default: read from
            ``models/style_flows.pt``); written into the archive's inference/evaluation configs.
        style_shift: include the style-shift files (Phase I network, flows, calibration).
    """
    from msf_monai.cli import as_bool
    from msf_monai.training_record import training_record_file

    style_shift = as_bool(style_shift, "--style_shift")
    root = Path(bundle_root) if bundle_root else REPO / "bundles" / bundle
    configs, models = root / "configs", root / "models"
    if not (configs / "metadata.json").is_file():
        raise PackagingError(f"{root} is not a bundle: {configs / 'metadata.json'} not found")
    meta = json.loads((configs / "metadata.json").read_text())
    inference = json.loads((configs / "inference.json").read_text())
    name = inference.get("bundle_name", root.name)
    missing = [str(models / m) for m in REQUIRED_MODELS if not (models / m).is_file()]
    if missing:
        raise PackagingError(
            "cannot package an untrained bundle, missing: " + ", ".join(missing) + "\nTrain it first, e.g.:\n"
            + "\n".join(f"  python -m monai.bundle run --config_file {configs / p}.json" for p in ("phase1", "phase2", "phase3"))
        )
    _check_model(models / "model.pt", int(inference["in_channels"]), int(inference["out_channels"]))
    model_files = list(REQUIRED_MODELS)
    if style_shift:
        absent = [m for m in STYLE_SHIFT_MODELS if not (models / m).is_file()]
        if absent:
            print(f"warning: no style-shift score in the archive, missing {', '.join(str(models / m) for m in absent)} "
                  f"(run Phase II: python -m monai.bundle run --config_file {configs / 'phase2.json'})", file=sys.stderr)
        else:
            model_files += list(STYLE_SHIFT_MODELS)
    size = int(image_size) if image_size is not None else _trained_image_size(models)
    if size is None:
        print("warning: the training image_size is unknown (no style_flows.pt): the archive keeps the configs' "
              "default; pass --image_size", file=sys.stderr)
    elif size % 16:
        raise PackagingError(f"image_size must be divisible by 16, got {size}")

    out = Path(output_dir) / f"{name}_v{meta.get('version', '0')}.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    files: list[tuple[str, Path | bytes]] = []
    for path in sorted(configs.iterdir()):
        if path.suffix not in (".json", ".conf", ".yaml", ".yml"):
            continue
        if path.name in SIZED_CONFIGS and size is not None:
            config = json.loads(path.read_text())
            config["image_size"] = size
            files.append((f"configs/{path.name}", (json.dumps(config, indent=4) + "\n").encode()))
        else:
            files.append((f"configs/{path.name}", path))
    for path in sorted((root / "docs").rglob("*")) if (root / "docs").is_dir() else []:
        if path.is_file():
            files.append((f"docs/{path.relative_to(root / 'docs').as_posix()}", path))
    if (root / "LICENSE").is_file():
        files.append(("LICENSE", root / "LICENSE"))
    else:
        print(f"warning: {root / 'LICENSE'} not found", file=sys.stderr)
    files += [(f"models/{m}", models / m) for m in model_files]
    # the training runs' split records: the archive's evaluate.json evaluates the same source
    # validation patients as the packager's (msf_monai.training_record)
    records = {training_record_file(models / m) for m in model_files if m.endswith(".pt")}
    files += [(f"models/{r.name}", r) for r in sorted(records) if r.is_file()]

    tmp = out.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for arcname, src in files:
            if isinstance(src, bytes):
                info = zipfile.ZipInfo(f"{name}/{arcname}", date_time=time.localtime()[:6])
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16  # writestr's default is owner-only (0600)
                zf.writestr(info, src)
            else:
                zf.write(src, f"{name}/{arcname}")
    tmp.replace(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {len(files)} files, models {', '.join(model_files)}"
          + (f", image_size {size}" if size is not None else ""))
    print(f"use: unzip {out.name} && python -m monai.bundle run --config_file {name}/configs/inference.json --input_dir <images>")
    return str(out)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from msf_monai.cli import fire_main

    fire_main(package)
