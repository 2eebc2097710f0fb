"""Compare domain-generalisation methods (and variants of them) under identical data, budget and seeds.

For every seed: trains each selected arm from the bundle's configs (``none`` is Phase I itself,
the plain recipe; ``unet`` a plain MONAI UNet with the same data, loss, budget and selection;
MixStyleFlow arms run Phase II once per seed for each kind of flows they need, then Phase III;
the others run ``phase3.json --style_method NAME``), each selecting its checkpoint on the source
validation split only; evaluates every checkpoint on every domain (``evaluate.json``); then
writes the table (``dg_table.md``/``.csv``/``.png``, mean ± std over seeds), the ablation table
(``ablation.md``: unseen Dice over seeds, per site and pooled over the cases, the cases and the
case-seed pairs better than the first arm with paired sign tests, how strong each arm's
perturbation was, and each unseen case's Dice per arm), a stylized-image gallery (first seed) and
``benchmark.json`` (commands, timings) to ``--work_dir``. ``--checkpoint_policy last`` evaluates
each run's last-epoch weights instead (``*_final.pt``; the tables go to ``<work_dir>/last``), e.g.
with ``--train false`` over finished runs, to see how much the choice on a small source
validation split moves the result.

    python scripts/benchmark_dg.py prostate --methods none,mixstyle,dsu,mixstyleflow \\
        --seeds 0,1,2 --fraction 0.3 --dataset_dir /data/prostate --source_site SiteA

An arm is a ``style_method`` name, optionally with Phase II/III settings in parentheses, e.g.
``"none,unet,gin,mixstyleflow,mixstyleflow(stylize_mode=residual, init_from_phase1=true)"``
(quote it for the shell). Phase II settings (``stats_regime``, ``statistic``) select which
flows the arm samples from; every other setting goes to its Phase III run. ``label=...`` names
the row. Arms with the same Phase II settings share one Phase II per seed; all arms of a seed
share its Phase I.

Every other ``--key value`` goes to all training and evaluation runs (e.g. ``--epochs 200
--image_size 384``); ``--flow_epochs`` sets Phase II's flow epochs. ``--reuse`` skips runs
that finished (their saved training state says so) and resumes unfinished ones.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from evaluate import (  # noqa: E402
    as_list, bundle_dir, check_known, config_value, evaluate_checkpoints, known_to, run_config, safe_name, write_table,
)

from msf_monai.errors import MsfError  # noqa: E402

TRAINING_ONLY = ("epochs", "lr", "val_interval", "train_fraction", "style_p", "maxstyle_steps", "maxstyle_lr", "resume")
#: arm settings that change Phase II (which flows are fitted), not Phase III
PHASE2_SETTINGS = ("stats_regime", "statistic")
#: settings an arm may not change: they need another Phase I (run a separate benchmark)
SHARED_SETTINGS = ("image_size", "dataset_dir", "source_site", "seed", "batch_size", "val_fraction", "train_fraction")
#: ``--checkpoint_policy``: evaluate the checkpoint chosen on source validation, or the last epoch's
CHECKPOINT_POLICIES = ("best", "last")


@dataclass
class Arm:
    """One row of the comparison: a method and its own settings."""

    method: object  # msf_monai.methods.DGMethod
    settings: dict = field(default_factory=dict)
    label: str = ""

    @property
    def phase2(self) -> dict:
        return {k: v for k, v in self.settings.items() if k in PHASE2_SETTINGS}

    @property
    def phase3(self) -> dict:
        return {k: v for k, v in self.settings.items() if k not in PHASE2_SETTINGS}

    @property
    def tag(self) -> str:
        """File-name part: the method name, plus the settings when there are any."""
        if not self.settings:
            return self.method.name
        return safe_name(self.method.name + "_" + "_".join(f"{k}-{_text(v)}" for k, v in self.settings.items()))

    def checkpoint_name(self) -> str:
        return self.method.checkpoint_name() if not self.settings else f"model_{self.tag}.pt"

    def log_folder(self) -> str:
        return self.method.log_folder() if not self.settings else f"phase3_{self.tag}"

    def flow_file(self) -> str:
        """Phase II's flow file for this arm: the method's default name, with the Phase II
        settings appended when there are any."""
        name = self.method.flow_file()
        if self.phase2:
            name = name.replace(".pt", "_" + safe_name("_".join(f"{k}-{_text(v)}" for k, v in self.phase2.items())) + ".pt")
        return name


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) or value is None else str(value).replace(" ", "")


def _value(text: str):
    """``true``/``false``/``none`` (any case), numbers, lists; anything else stays a string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets and parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_arms(methods) -> list[Arm]:
    """``"none,mixstyleflow(stylize_mode=residual)"`` (or fire's tuple of such) -> arms."""
    from msf_monai.methods import get_method

    text = ",".join(methods) if isinstance(methods, (list, tuple)) else str(methods)
    arms = []
    for item in _split_top(text):
        m = re.fullmatch(r"([A-Za-z0-9_]+)\s*(?:\((.*)\))?", item, flags=re.S)
        if not m:
            raise SystemExit(f"bad arm {item!r}: expected NAME or NAME(key=value, ...)")
        settings = {}
        for pair in _split_top(m.group(2) or ""):
            if "=" not in pair:
                raise SystemExit(f"bad setting {pair!r} in arm {item!r}: expected key=value")
            key, value = (s.strip() for s in pair.split("=", 1))
            settings[key] = _value(value)
        label = settings.pop("label", None)
        shared = [k for k in settings if k in SHARED_SETTINGS]
        if shared:
            raise SystemExit(f"arm {item!r} changes {shared}: those need their own Phase I; run a separate benchmark")
        method = get_method(m.group(1))
        if not method.needs_flows and any(k in PHASE2_SETTINGS for k in settings):
            raise SystemExit(f"arm {item!r}: {PHASE2_SETTINGS} only apply to MixStyleFlow arms")
        if settings.get("init_from_phase1") and method.architecture != "dual_decoder":
            raise SystemExit(f"arm {item!r}: init_from_phase1 needs Phase I's dual-decoder network; "
                             f"{method.name!r} trains a {method.architecture!r} network")
        if method.name == "none" and settings:
            raise SystemExit(f"arm {item!r}: 'none' is Phase I itself and takes no settings")
        title = method.title + (" (" + ", ".join(f"{k}={_text(v)}" for k, v in settings.items()) + ")" if settings else "")
        arms.append(Arm(method, settings, str(label) if label else title))
    if not arms:
        raise SystemExit("--methods is empty")
    labels = [a.label for a in arms]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"two arms have the same name: {labels}")
    return arms


def run_finished(resume_file: Path) -> bool:
    """Whether the training state saved next to a checkpoint says its run completed (a
    ``*_final.pt`` is also written when a run is interrupted, so it proves nothing)."""
    import torch

    if not resume_file.is_file():
        return False
    try:
        state = torch.load(resume_file, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable state is an unfinished run
        return False
    return bool(state.get("finished")) if isinstance(state, dict) else False


class _NotTrained(Exception):
    """``--train false`` and this run has not finished."""


def _train_arm(arm: Arm, base: dict, models: Path, logs: Path, tag: str, timed, flow_epochs: int | None) -> Path:
    """Train one arm for one seed (its Phase II first where it needs flows); returns its checkpoint."""
    if arm.method.name == "none":
        return models / "phase1_model.pt"
    # None must reach the config as None (run_config leaves None-valued ids out)
    run = {**base, "style_method": arm.method.name, "output_dir": str(logs / arm.log_folder()),
           **{k: "None" if v is None else v for k, v in arm.phase3.items()}}
    if arm.settings:
        run["checkpoint_name"] = arm.checkpoint_name()
    if arm.method.needs_flows:
        flows = models / arm.flow_file()
        phase2 = {k: v for k, v in base.items() if k not in ("epochs", "lr")}
        phase2.update(arm.phase2, flow_checkpoint=str(flows), style_source=arm.method.style_source,
                      output_dir=str(logs / flows.stem))
        if flow_epochs is not None:
            phase2["epochs"] = flow_epochs
        timed(f"{tag} Phase II ({flows.name})", "phase2", phase2, logs / f"{flows.stem}.log",
              flows.with_name(flows.stem + "_resume.pt"))
        run["flow_checkpoint"] = str(flows)
    checkpoint = models / arm.checkpoint_name()
    timed(f"{tag} {arm.label}", "phase3", run, logs / f"{arm.log_folder()}.log", checkpoint.with_name(checkpoint.stem + "_resume.pt"))
    return checkpoint


def main(bundle: str = "prostate", methods="none,mixstyle,dsu,mixstyleflow", seeds="0", fraction: float = 1.0,
         work_dir: str | None = None, source_site: str | None = None, flow_epochs: int | None = None,
         gallery: bool = True, reuse: bool = False, train: bool = True, checkpoint_policy: str = "best",
         **overrides) -> None:
    """Train, evaluate and tabulate the selected arms.

    Args:
        bundle: ``prostate``, ``fundus`` or a bundle folder.
        methods: comma-separated arms: ``style_method`` names (see ``msf_monai.methods.METHODS``),
            each optionally with settings, ``NAME(key=value, ...)``. The first arm is the one
            the ablation table compares every other arm with.
        seeds: comma-separated seeds; each seed also fixes the patient split.
        fraction: share of the source training patients used (the papers' low-data regime: 0.1, 0.3).
        work_dir: output folder (default ``<bundle>/benchmark``).
        source_site: the training domain (default: the bundle's default for the dataset).
        flow_epochs: Phase II flow-fitting epochs (default: phase2.json's).
        gallery: write the stylized-image gallery for the first seed.
        reuse: continue an interrupted benchmark: skip runs that finished, resume unfinished
            training runs from their checkpoints (otherwise every run starts fresh).
        train: ``false``: train nothing, tabulate the runs that finished (e.g. the arms of several
            earlier calls with the same ``--work_dir``, or of a benchmark still running); arms and
            seeds without a finished run are left out. Implies ``--reuse``.
        checkpoint_policy: which weights of each run are evaluated: ``best`` (the checkpoint chosen
            on the source validation split) or ``last`` (the last epoch's, ``*_final.pt``; its
            evaluations go to ``seed*/eval_last`` and its tables to ``<work_dir>/last``).
        overrides: other config ids for every run (``--dataset_dir``, ``--epochs``, ``--image_size``, ...).
    """
    from msf_monai.cli import as_bool
    from msf_monai.report import ablation_table, case_table, load_summary, protocol_text

    gallery, reuse, train = as_bool(gallery, "--gallery"), as_bool(reuse, "--reuse"), as_bool(train, "--train")
    if checkpoint_policy not in CHECKPOINT_POLICIES:
        raise SystemExit(f"--checkpoint_policy must be one of {', '.join(CHECKPOINT_POLICIES)}, not {checkpoint_policy!r}")
    last = checkpoint_policy == "last"
    reuse = reuse or not train
    root = bundle_dir(bundle)
    arms = parse_arms(methods)
    seed_list = [int(s) for s in as_list(seeds)]
    work = Path(work_dir) if work_dir else root / "benchmark"
    common = {k: v for k, v in overrides.items() if v is not None}
    if source_site is not None:
        common["source_site"] = source_site
    check_known(root, ("phase1", "phase2", "phase3", "evaluate"), common)
    for arm in arms:  # an arm's own settings must reach its runs: none may be dropped
        check_known(root, ("phase3",), arm.phase3)
        check_known(root, ("phase2",), arm.phase2)
    source = config_value(root, "evaluate", "source_site", common)
    evaluation = {k: v for k, v in common.items() if k not in TRAINING_ONLY}
    record_file = work / "benchmark.json"
    tables_dir = work / "last" if last else work
    record = {"bundle": str(root), "arms": [a.label for a in arms], "seeds": seed_list, "fraction": fraction,
              "source_site": source, "overrides": common, "command": sys.argv, "runs": []}
    if reuse and record_file.is_file():  # keep the timings of the runs an earlier call finished
        record["runs"] = json.loads(record_file.read_text()).get("runs", [])
    results: dict[str, list[Path]] = {a.label: [] for a in arms}
    seeds_of: dict[str, list[int]] = {a.label: [] for a in arms}
    perturbations: dict[str, list[dict]] = {a.label: [] for a in arms}
    start = time.time()
    print(f"benchmark: {len(arms)} arm(s) x {len(seed_list)} seed(s), source domain {source}, output {work}", flush=True)

    def timed(label: str, config: str, args: dict, log: Path, done: Path) -> None:
        if reuse and run_finished(done):
            print(f"  {label}: finished before ({done}), reusing it", flush=True)
            return
        if not train:
            print(f"  {label}: not finished, left out (--train false)", flush=True)
            raise _NotTrained(label)
        t0 = time.time()
        # the settings for every run go to the configs that have them (e.g. --val_interval not to Phase II)
        run_config(root, config, known_to(root, config, args), log, f"{label} (benchmark at {t0 - start:.0f} s)")
        record["runs"].append({"run": label, "config": config, "seconds": round(time.time() - t0, 1)})
        work.mkdir(parents=True, exist_ok=True)
        record_file.write_text(json.dumps(record, indent=1, default=str) + "\n")

    def tables(n_seeds: int) -> None:
        done = {k: v for k, v in results.items() if v}
        if not done:
            return
        print(write_table(done, tables_dir, source, f"{root.name}: Dice per domain ({n_seeds} seed(s))"), flush=True)
        table = ablation_table(done, source_site=source, perturbations=perturbations, seeds=seeds_of)
        table += "\n\nUnseen Dice per case, mean over each arm's seeds:\n\n" + case_table(done, source_site=source)
        table += "\n\n" + protocol_text([load_summary(p) for v in done.values() for p in v])
        (tables_dir / "ablation.md").write_text(table + "\n")
        print(table, flush=True)

    for si, seed in enumerate(seed_list):
        run_dir = work / f"seed{seed}"
        models, logs = run_dir / "models", run_dir / "logs"
        # --reuse continues an interrupted benchmark (finished runs skipped, unfinished ones
        # resumed from their training checkpoints); otherwise every run starts fresh
        base = {**common, "seed": seed, "train_fraction": fraction, "ckpt_dir": str(models), "resume": bool(reuse)}
        tag = f"[seed {seed} ({si + 1}/{len(seed_list)})]"
        needs_phase1 = any(a.method.name == "none" or a.method.needs_flows or a.settings.get("init_from_phase1") for a in arms)
        try:
            if needs_phase1 or (gallery and si == 0):
                timed(f"{tag} Phase I", "phase1", {**base, "output_dir": str(logs / "phase1")}, logs / "phase1.log",
                      models / "phase1_model_resume.pt")
        except _NotTrained:
            continue
        for arm in arms:
            try:
                checkpoint = _train_arm(arm, base, models, logs, tag, timed, flow_epochs)
            except _NotTrained:
                continue
            perturbation = logs / arm.log_folder() / "perturbation.json"
            if arm.method.name != "none" and perturbation.is_file():
                perturbations[arm.label].append(json.loads(perturbation.read_text())["mean"])
            if last:
                checkpoint = checkpoint.with_name(checkpoint.stem + "_final.pt")
            # evaluate each arm as soon as it is trained, so partial tables exist while the rest runs
            t0 = time.time()
            summary = evaluate_checkpoints(str(root), [str(checkpoint)], [arm.label], run_dir / ("eval_last" if last else "eval"), reuse=reuse,
                                           **known_to(root, "evaluate", {**evaluation, "seed": seed, "ckpt_dir": str(models)}))
            record["runs"].append({"run": f"{tag} {arm.label} evaluation", "seconds": round(time.time() - t0, 1)})
            results[arm.label].append(summary[arm.label])
            seeds_of[arm.label].append(seed)
            tables(si + 1)
        if gallery and si == 0:
            from style_gallery import make_gallery

            try:
                make_gallery(str(root), output=str(work / "style_gallery.png"), ckpt_dir=str(models), seed=seed,
                             **known_to(root, "phase2", {k: v for k, v in base.items() if k not in TRAINING_ONLY + ("ckpt_dir", "seed")}))
            except (SystemExit, MsfError) as err:  # a gallery problem must not lose the benchmark's results
                print(f"gallery skipped: {err}")

    if not train:  # the tables only: benchmark.json keeps the training record
        print(f"tables of the finished runs written to {work}")
        return
    record["total_seconds"] = round(time.time() - start, 1)
    record_file.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"benchmark finished in {record['total_seconds']:.0f} s; wrote {record_file}")


if __name__ == "__main__":
    from msf_monai.cli import fire_main

    fire_main(main)
