"""Compare domain-generalisation methods under identical data, budget and seeds.

For every seed: trains each selected method from the bundle's configs (``none`` is Phase I
itself, the plain recipe; ``mixstyleflow`` runs Phase I, II and III; the others run
``phase3.json --style_method NAME``), each selecting its checkpoint on the source validation
split only; evaluates every checkpoint on every domain (``evaluate.json``); then writes the
table (``dg_table.md``/``.csv``/``.png``, mean ± std over seeds), a stylized-image gallery
(first seed) and ``benchmark.json`` (commands, timings) to ``--work_dir``.

    python scripts/benchmark_dg.py prostate --methods none,mixstyle,dsu,mixstyleflow \
        --seeds 0,1,2 --fraction 0.3 --dataset_dir /data/prostate --source_site SiteA

Every other ``--key value`` goes to all training and evaluation runs (e.g. ``--epochs 200
--image_size 384``); ``--flow_epochs`` sets Phase II's flow epochs. ``--reuse`` skips runs
whose outputs exist (continue an interrupted benchmark).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from evaluate import as_list, bundle_dir, config_value, evaluate_checkpoints, run_config, write_table  # noqa: E402

TRAINING_ONLY = ("epochs", "lr", "val_interval", "train_fraction", "style_p", "maxstyle_steps", "maxstyle_lr", "resume")


def main(bundle: str = "prostate", methods="none,mixstyle,dsu,mixstyleflow", seeds="0", fraction: float = 1.0,
         work_dir: str | None = None, source_site: str | None = None, flow_epochs: int | None = None,
         gallery: bool = True, reuse: bool = False, **overrides) -> None:
    """Train, evaluate and tabulate the selected methods.

    Args:
        bundle: ``prostate``, ``fundus`` or a bundle folder.
        methods: comma-separated ``style_method`` names (see ``msf_monai.methods.METHODS``).
        seeds: comma-separated seeds; each seed also fixes the patient split.
        fraction: share of the source training patients used (the papers' low-data regime: 0.1, 0.3).
        work_dir: output folder (default ``<bundle>/benchmark``).
        source_site: the training domain (default: the bundle's default for the dataset).
        flow_epochs: Phase II flow-fitting epochs (default: phase2.json's).
        gallery: write the stylized-image gallery for the first seed.
        reuse: continue an interrupted benchmark: skip runs whose outputs exist, resume unfinished
            training runs from their checkpoints (otherwise every run starts fresh).
        overrides: other config ids for every run (``--dataset_dir``, ``--epochs``, ``--image_size``, ...).
    """
    from msf_monai.methods import get_method

    root = bundle_dir(bundle)
    chosen = [get_method(m) for m in as_list(methods)]
    if not chosen:
        raise SystemExit("--methods is empty")
    seed_list = [int(s) for s in as_list(seeds)]
    work = Path(work_dir) if work_dir else root / "benchmark"
    common = {k: v for k, v in overrides.items() if v is not None}
    if source_site is not None:
        common["source_site"] = source_site
    source = config_value(root, "evaluate", "source_site", common)
    evaluation = {k: v for k, v in common.items() if k not in TRAINING_ONLY}
    record = {"bundle": str(root), "methods": [m.name for m in chosen], "seeds": seed_list, "fraction": fraction,
              "source_site": source, "overrides": common, "command": sys.argv, "runs": []}
    results: dict[str, list[Path]] = {m.title: [] for m in chosen}
    start = time.time()
    print(f"benchmark: {len(chosen)} method(s) x {len(seed_list)} seed(s), source domain {source}, output {work}", flush=True)

    def timed(label: str, config: str, args: dict, log: Path, done: Path) -> None:
        if reuse and done.is_file():
            print(f"  {label}: reusing {done}", flush=True)
            return
        t0 = time.time()
        run_config(root, config, args, log, f"{label} (benchmark at {t0 - start:.0f} s)")
        record["runs"].append({"run": label, "config": config, "seconds": round(time.time() - t0, 1)})

    for si, seed in enumerate(seed_list):
        run_dir = work / f"seed{seed}"
        models, logs = run_dir / "models", run_dir / "logs"
        # --reuse continues an interrupted benchmark (finished runs skipped, unfinished ones
        # resumed from their training checkpoints); otherwise every run starts fresh
        base = {**common, "seed": seed, "train_fraction": fraction, "ckpt_dir": str(models), "resume": bool(reuse)}
        tag = f"[seed {seed} ({si + 1}/{len(seed_list)})]"
        checkpoints: dict[str, Path] = {}
        needs_phase1 = any(m.name in ("none", "mixstyleflow") for m in chosen) or (gallery and si == 0)
        if needs_phase1:
            timed(f"{tag} Phase I", "phase1", {**base, "output_dir": str(logs / "phase1")}, logs / "phase1.log",
                  models / "phase1_model_final.pt")
        for m in chosen:
            if m.name == "none":
                checkpoints[m.title] = models / "phase1_model.pt"
                continue
            if m.needs_flows:
                phase2 = {k: v for k, v in base.items() if k not in ("epochs", "lr")}
                if flow_epochs is not None:
                    phase2["epochs"] = flow_epochs
                timed(f"{tag} Phase II", "phase2", {**phase2, "output_dir": str(logs / "phase2")}, logs / "phase2.log",
                      models / "style_flows.pt")
            name = m.checkpoint_name()
            timed(f"{tag} {m.title}", "phase3", {**base, "style_method": m.name, "output_dir": str(logs / m.log_folder())},
                  logs / f"{m.log_folder()}.log", models / name.replace(".pt", "_final.pt"))
            checkpoints[m.title] = models / name
        t0 = time.time()
        summaries = evaluate_checkpoints(str(root), [str(checkpoints[m.title]) for m in chosen], [m.title for m in chosen],
                                         run_dir / "eval", reuse=reuse, **{**evaluation, "seed": seed, "ckpt_dir": str(models)})
        record["runs"].append({"run": f"seed {seed} evaluation", "seconds": round(time.time() - t0, 1)})
        for title, path in summaries.items():
            results[title].append(path)
        if gallery and si == 0:
            from style_gallery import make_gallery

            try:
                make_gallery(str(root), output=str(work / "style_gallery.png"), ckpt_dir=str(models), seed=seed,
                             **{k: v for k, v in base.items() if k not in TRAINING_ONLY + ("ckpt_dir", "seed")})
            except SystemExit as err:  # a gallery problem must not lose the benchmark's results
                print(f"gallery skipped: {err}")
        print(write_table(results, work, source, f"{root.name}: Dice per domain ({si + 1} seed(s))"), flush=True)

    record["total_seconds"] = round(time.time() - start, 1)
    (work / "benchmark.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"benchmark finished in {record['total_seconds']:.0f} s; wrote {work / 'benchmark.json'}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
