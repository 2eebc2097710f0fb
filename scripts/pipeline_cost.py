"""What each training recipe of a ``benchmark_dg.py`` run cost in wall time, next to its Dice.

A MixStyleFlow model costs a Phase I, a Phase II and a Phase III; the baseline only a Phase I.
This reads the runs' own logs in a benchmark folder (``<work_dir>/seed<k>/logs/<run>.log``; a
run's wall time is the span between its first and last time-stamped log line) and the
evaluation summaries (``<work_dir>/seed<k>/eval/per_case/<label>_summary.json``), and prints
per recipe: the unseen-site Dice (mean ± std over seeds; the population std, as
``benchmark_dg.py``'s tables; with several unseen sites, a seed's Dice is the mean of the sites'
means, the tables' "unseen mean"), the pipeline's total wall time (median over seeds) and its
ratio to the first recipe's.

    python scripts/pipeline_cost.py /work/runs/dg96 --recipes "{
        'Baseline': ['phase1'],
        'MixStyleFlow_stylize_mode_residual': ['phase1', 'style_flows', 'phase3_mixstyleflow_stylize_mode-residual']}"

A recipe is ``{evaluation label: [run logs, in the order they run]}``; the first is the
reference of the ratio column.
"""

from __future__ import annotations

import json
import re
import statistics
from datetime import datetime
from pathlib import Path

import fire

_STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}),(\d{3})")


def log_seconds(log: Path) -> float:
    """Seconds between the first and the last time-stamped line of ``log``."""
    stamps = []
    for line in log.read_text(errors="replace").splitlines():
        m = _STAMP.match(line)
        if m:
            stamps.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000)
    if len(stamps) < 2:
        raise ValueError(f"{log}: fewer than two time-stamped lines")
    return stamps[-1] - stamps[0]


def sites_of(summary: dict, site) -> list[str]:
    """The sites ``site`` names in an evaluation summary: ``"unseen"`` (every site but the
    summary's source site), one name, or several (a list or comma-separated)."""
    if site == "unseen":
        source = summary.get("split", {}).get("source_site")
        if source is None:
            raise ValueError("the summary does not name its source site: give the unseen sites with --site")
        return [s for s in summary["sites"] if s != source]
    names = [s.strip() for s in site.split(",")] if isinstance(site, str) else [str(s) for s in site]
    missing = [s for s in names if s not in summary["sites"]]
    if missing:
        raise ValueError(f"no site {missing} in the summary (it has {sorted(summary['sites'])})")
    return names


def main(work_dir: str, recipes: dict, site="unseen", channel: str | None = None, seeds=None) -> list[dict]:
    """Tabulate the recipes (see the module doc).

    Args:
        work_dir: the ``benchmark_dg.py`` output folder.
        recipes: ``{label: [log names]}``; ``label`` as in the evaluation summaries
            (``Baseline``, ``MixStyleFlow_encoder``, ...), log names without ``.log``.
        site: the sites whose Dice is reported: ``unseen`` (default; every site but the
            source), a site name, or several (comma-separated); several are averaged per seed.
        channel: the label channel (default: the summaries' first).
        seeds: seeds to read (default: every ``seed<k>`` folder).
    """
    root = Path(work_dir)
    if not root.is_dir():
        raise SystemExit(f"no benchmark folder {root}")
    folders = sorted(root.glob("seed*")) if seeds is None else [root / f"seed{s}" for s in (seeds if isinstance(seeds, (list, tuple)) else [seeds])]
    rows, reported = [], None
    for label, logs in recipes.items():
        dice, seconds, parts = [], [], {name: [] for name in logs}
        for folder in folders:
            summary = folder / "eval" / "per_case" / f"{label}_summary.json"
            files = [folder / "logs" / f"{name}.log" for name in logs]
            if not summary.is_file() or not all(f.is_file() for f in files):
                continue
            result = json.loads(summary.read_text())
            ch = channel or result["channels"][0]
            try:
                names = sites_of(result, site)
            except ValueError as err:
                raise SystemExit(f"{summary}: {err}") from None
            reported = reported or names
            dice.append(100 * statistics.mean(result["sites"][s][ch]["mean"] for s in names))
            times = [log_seconds(f) for f in files]
            for name, t in zip(logs, times):
                parts[name].append(t)
            seconds.append(sum(times))
        if not dice:
            print(f"{label}: no finished seed in {root}")
            continue
        rows.append({"recipe": label, "seeds": len(dice), "dice_mean": statistics.mean(dice),
                     "dice_std": statistics.pstdev(dice), "dice": dice,
                     "seconds": statistics.median(seconds), "parts": {k: statistics.median(v) for k, v in parts.items()}})
    if not rows:
        raise SystemExit("nothing to tabulate")
    ref = rows[0]["seconds"]
    print(f"| recipe | seeds | {', '.join(reported)} Dice | wall time (median) | × {rows[0]['recipe']} | parts (median s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        parts = ", ".join(f"{k} {v:.0f}" for k, v in r["parts"].items())
        print(f"| {r['recipe']} | {r['seeds']} | {r['dice_mean']:.1f} ± {r['dice_std']:.1f} | {r['seconds'] / 60:.1f} min | "
              f"{r['seconds'] / ref:.2f} | {parts} |")
    return rows


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda rows: None)  # the table is printed; the rows are for callers
