"""Side-by-side table of evaluation summaries (the ``*_summary.json`` files that
``evaluate.json`` writes): one row per model, one column per site, plus the mean over the
unseen sites.

    python -m msf_monai.report bundles/prostate/eval/phase1_model_summary.json \
        bundles/prostate/eval/model_summary.json --source_site SiteA
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["summary_table"]


def _load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation summary not found: {path} (run the bundle's evaluate.json first)")
    return json.loads(path.read_text())


def summary_table(*summary_files: str, source_site: str | None = "SiteA", channel: str | None = None) -> str:
    """Markdown table of the per-site mean Dice of each summary file.

    Args:
        summary_files: ``<name>_summary.json`` files; the row name is ``<name>``.
        source_site: excluded from the "unseen mean" column (``None``: every site counts).
        channel: which structure to report (default: every channel, as "a, b").
    """
    if not summary_files:
        raise ValueError("give at least one summary file")
    summaries = {Path(f).name.removesuffix("_summary.json"): _load(f) for f in summary_files}
    sites = sorted({s for summary in summaries.values() for s in summary["sites"]})
    unseen = [s for s in sites if s != source_site]
    lines = ["| model | " + " | ".join(sites) + " | unseen mean |", "|---" * (len(sites) + 2) + "|"]
    for name, summary in summaries.items():
        channels = [channel] if channel else summary["channels"]

        def cell(values):
            return ", ".join(f"{100 * v:.1f}" for v in values)

        row = []
        for s in sites:
            site = summary["sites"].get(s)
            row.append(cell(site[c]["mean"] for c in channels) if site else "-")
        means = [np.mean([summary["sites"][s][c]["mean"] for s in unseen if s in summary["sites"]]) for c in channels]
        lines.append(f"| {name} | " + " | ".join(row) + f" | {cell(means)} |")
    return "\n".join(lines)


def main(*summary_files: str, source_site: str | None = "SiteA", channel: str | None = None) -> None:
    """Print the table (Dice in %)."""
    print(summary_table(*summary_files, source_site=source_site, channel=channel))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
