"""Evaluate one or more checkpoints on every domain of a dataset and write the paper-style table.

Runs the bundle's ``evaluate.json`` once per checkpoint (Dice per case and domain; the source
domain is its validation patients only), then writes, in ``--output_dir``:
``dg_table.md`` (rows = models, columns = domains + unseen mean; fundus cells "OD, OC"),
``dg_table.csv``, ``dg_table.png`` (bar chart) and ``per_case/<name>_per_case.csv``.

    python scripts/evaluate.py prostate bundles/prostate/models/phase1_model.pt \
        bundles/prostate/models/model.pt --names Baseline,MixStyleFlow
    python scripts/evaluate.py fundus bundles/fundus/models/model.pt --dataset_dir /data/fundus

Every other ``--key value`` is passed to ``evaluate.json`` (e.g. ``--image_size 384``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bundle_dir(bundle: str) -> Path:
    """``prostate``/``fundus`` (a bundle of this repository) or a path to a bundle folder."""
    path = Path(bundle)
    if not (path / "configs").is_dir():
        path = REPO / "bundles" / bundle
    if not (path / "configs" / "evaluate.json").is_file():
        raise SystemExit(f"no bundle at {bundle!r}: expected 'prostate', 'fundus' or a folder with configs/evaluate.json")
    return path


def as_list(value) -> list[str]:
    """fire gives a tuple/list for ``a,b`` and a string otherwise."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v for v in str(value).split(",") if v]


def overrides_args(overrides: Mapping[str, object]) -> list[str]:
    args = []
    for key, value in overrides.items():
        if value is None:
            continue
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def run_config(root: Path, config: str, overrides: Mapping[str, object], log_file: Path, label: str) -> None:
    """``python -m monai.bundle run`` of ``configs/<config>.json`` with the overrides; the full
    output goes to ``log_file``, progress to stdout; a failure stops with the log's tail."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(root / "configs" / f"{config}.json")]
    cmd += overrides_args(overrides)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    print(f"  {label}: {config}.json ... (log: {log_file})", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_file, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"{label}: {config}.json failed (exit {proc.returncode}); last lines of {log_file}:\n{tail}")
    print(f"  {label}: done in {time.time() - start:.0f} s", flush=True)


def known_to(root: Path, config: str, overrides: Mapping[str, object]) -> dict:
    """The overrides that ``configs/<config>.json`` has ids for (for scripts that pass one set of
    settings to several configs; :func:`check_known` first makes sure none is unknown to all)."""
    from msf_monai.bundle import config_ids, unknown_overrides

    unknown = unknown_overrides(list(overrides), config_ids(root / "configs" / f"{config}.json"))
    return {k: v for k, v in overrides.items() if k not in unknown}


def check_known(root: Path, configs: Sequence[str], overrides: Mapping[str, object]) -> None:
    """Stop, before any work, on a setting that none of ``configs`` has (a typo such as
    ``--epoch``), with the nearest known ids."""
    from msf_monai.bundle import config_ids, unknown_overrides, unknown_text

    ids = set().union(*(config_ids(root / "configs" / f"{c}.json") for c in configs))
    unknown = unknown_overrides(list(overrides), ids)
    if unknown:
        raise SystemExit(f"unknown setting(s), nothing was run: {unknown_text(unknown)}\n"
                         f"(settings of {', '.join(c + '.json' for c in configs)} in {root / 'configs'})")


def config_value(root: Path, config: str, key: str, overrides: Mapping[str, object]):
    """The value of config id ``key`` with the overrides applied (cheap ids only, e.g. ``source_site``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(root / "configs" / f"{config}.json"))
    parser.update({"bundle_root": str(root), **{k: v for k, v in overrides.items() if v is not None}})
    return parser.get_parsed_content(key)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def evaluate_checkpoints(
    bundle: str, checkpoints: Sequence[str], names: Sequence[str] | None = None, output_dir: str | Path | None = None,
    reuse: bool = False, **overrides,
) -> dict[str, Path]:
    """Run ``evaluate.json`` for each checkpoint; returns ``{name: summary.json path}``."""
    from msf_monai.cli import as_bool

    reuse = as_bool(reuse, "--reuse")
    root = bundle_dir(bundle)
    checkpoints = [str(Path(c).resolve()) for c in checkpoints]
    if not checkpoints:
        raise SystemExit("give at least one checkpoint")
    missing = [c for c in checkpoints if not Path(c).is_file()]
    if missing:
        raise SystemExit("checkpoint(s) not found: " + ", ".join(missing))
    names = list(names) if names else [Path(c).stem for c in checkpoints]
    if len(names) != len(checkpoints) or len(set(names)) != len(names):
        raise SystemExit(f"--names must give one distinct name per checkpoint; got {names} for {len(checkpoints)} checkpoint(s)")
    out = Path(output_dir) if output_dir else root / "eval" / "dg_table"
    per_case = out / "per_case"
    summaries = {}
    for i, (name, ckpt) in enumerate(zip(names, checkpoints), start=1):
        summary = per_case / f"{safe_name(name)}_summary.json"
        label = f"[{i}/{len(checkpoints)}] {name}"
        if reuse and summary.is_file() and summary.stat().st_mtime >= Path(ckpt).stat().st_mtime:
            print(f"  {label}: reusing {summary}", flush=True)
        else:
            run_config(root, "evaluate", {**overrides, "checkpoint": ckpt, "output_dir": str(per_case), "eval_name": safe_name(name)},
                       per_case / f"{safe_name(name)}_log.txt", label)
        summaries[name] = summary
    return summaries


def recorded_source_site(summaries: Iterable[Path]) -> str | None:
    """The source site that evaluate.json used for these summaries (from each training run's
    record); an error when the checkpoints were trained on different sites."""
    from msf_monai.report import load_summary

    sites = {load_summary(p).get("split", {}).get("source_site") for p in summaries}
    if len(sites) > 1:
        raise SystemExit(f"the checkpoints were trained on different source sites {sorted(map(str, sites))}: "
                         "tabulate them separately, or give --source_site")
    return next(iter(sites), None)


def write_table(results: Mapping[str, Sequence[Path]], output_dir: str | Path, source_site: str | None, title: str) -> str:
    """Write ``dg_table.{md,csv,png}`` for ``{row: [summary files]}``; returns the markdown."""
    from msf_monai.report import dg_table, load_summary, protocol_text
    from msf_monai.style_shift import flagged_shares

    summaries = {k: [load_summary(p) for p in v] for k, v in results.items()}
    table = dg_table(summaries, source_site=source_site)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = table.markdown() + "\n\n" + protocol_text([s for runs in summaries.values() for s in runs])
    flags = flagged_shares(out / "per_case" / "style_shift.csv")
    if flags:
        text += "\n\n" + flags
    (out / "dg_table.md").write_text(text + "\n")
    table.write_csv(out / "dg_table.csv")
    table.plot(out / "dg_table.png", title=title)
    print(f"wrote {out / 'dg_table.md'}, {out / 'dg_table.csv'}, {out / 'dg_table.png'}")
    return text


def main(bundle: str, *checkpoints: str, names=None, output_dir: str | None = None, source_site: str | None = None,
         reuse: bool = False, **overrides) -> None:
    """Evaluate checkpoints of a bundle on every domain and write the Dice table.

    Args:
        bundle: ``prostate``, ``fundus`` or the path of a bundle folder.
        checkpoints: model checkpoints (plain state dicts, e.g. ``models/model_dsu.pt``).
        names: row names, comma separated (default: the checkpoint file names).
        output_dir: where the table and per-case files go (default ``<bundle>/eval/dg_table``).
        source_site: the training domain: only its validation patients (the training run's
            split) are evaluated; shown first and left out of the unseen mean (default: the
            domain recorded with each checkpoint's training run, else the bundle's default).
        reuse: skip checkpoints whose summary is newer than the checkpoint.
        overrides: any other ``evaluate.json`` id, e.g. ``--dataset_dir``, ``--image_size``.
    """
    root = bundle_dir(bundle)
    out = Path(output_dir) if output_dir else root / "eval" / "dg_table"
    print(f"evaluating {len(checkpoints)} checkpoint(s) with {root / 'configs' / 'evaluate.json'}", flush=True)
    if source_site is not None:
        overrides["source_site"] = source_site
    summaries = evaluate_checkpoints(bundle, checkpoints, as_list(names), out, reuse=reuse, **overrides)
    if source_site is None:
        source_site = recorded_source_site(summaries.values())
    print(write_table({k: [v] for k, v in summaries.items()}, out, source_site, f"{root.name}: Dice per domain"))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from msf_monai.cli import fire_main

    fire_main(main)
