"""Paper-style Dice tables from evaluation summaries (the ``*_summary.json`` files that
``evaluate.json`` writes): one row per model or method, one column per domain, plus the mean
over the unseen domains. Several summaries per row (e.g. one per seed) give ``mean ± std``.
Cells hold one number per structure (fundus: "OD, OC"), Dice in %.

    python -m msf_monai.report bundles/prostate/eval/phase1_model_summary.json \
        bundles/prostate/eval/model_summary.json --source_site SiteA
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DGTable", "ablation_table", "case_table", "dg_table", "load_summary", "sign_test", "summary_table"]

UNSEEN_MEAN = "unseen mean"


def load_summary(path: str | Path) -> dict:
    """An evaluation summary; a clear error naming the file when it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation summary not found: {path} (run the bundle's evaluate.json first)")
    summary = json.loads(path.read_text())
    if not isinstance(summary, dict) or "sites" not in summary or "channels" not in summary:
        raise ValueError(f"{path} is not an evaluation summary (no 'sites'/'channels'); expected a *_summary.json of evaluate.json")
    return summary


def protocol_text(summaries) -> str:
    """One line saying how the Dice of these evaluation summaries was computed (their
    ``protocol``: where, per volume or per slice, which slices, which checkpoint), for every
    table; protocols that differ between summaries are all listed, so a table never mixes them
    silently. Summaries written before the protocol was recorded (bundles < 0.5.0) were
    computed per volume, on all slices, on the resized grid, with the best checkpoint."""
    seen: list[str] = []
    for summary in summaries:
        p = summary.get("protocol")
        if p is None:
            text = "per volume, all slices, resized grid, best checkpoint on source validation (recorded before 0.5.0)"
        else:
            where = "each scan's original geometry" if p.get("eval_space") == "original" else "the resized grid"
            chosen = (f"best checkpoint on {p.get('selected_on', 'source validation')}"
                      if p.get("checkpoint_policy", "best") == "best" else "the last epoch's checkpoint")
            text = f"per {p.get('dice', 'volume')}, {p.get('eval_slices', 'all')} slices, {where}, {chosen}"
        if text not in seen:
            seen.append(text)
    if not seen:
        return ""
    return "Protocol: Dice " + ("; MIXED: ".join(seen) if len(seen) > 1 else seen[0]) + "."


@dataclass
class DGTable:
    """Per-row, per-domain, per-structure Dice (fractions): ``mean[row][domain]`` is a list with
    one value per structure (``channels``), averaged over the row's summaries (seeds); ``std``
    the standard deviation over them (0 for one summary); ``n_runs[row]`` how many there were.
    ``domains`` ends with :data:`UNSEEN_MEAN`, the mean over every domain but ``source_site``
    (per summary, then over summaries)."""

    rows: list[str]
    domains: list[str]
    channels: list[str]
    source_site: str | None
    mean: dict[str, dict[str, list[float]]]
    std: dict[str, dict[str, list[float]]]
    n_runs: dict[str, int]

    def _label(self, domain: str) -> str:
        return f"{domain} (source)" if domain == self.source_site else domain

    def _cell(self, row: str, domain: str) -> str:
        if domain not in self.mean[row]:
            return "-"
        values = self.mean[row][domain]
        if self.n_runs[row] > 1:
            return ", ".join(f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in zip(values, self.std[row][domain]))
        return ", ".join(f"{100 * m:.1f}" for m in values)

    def markdown(self) -> str:
        """The table in markdown (Dice %, cells "a, b" for several structures)."""
        title = "model" if all(n == 1 for n in self.n_runs.values()) else "model (mean ± std over runs)"
        head = f"| {title} | " + " | ".join(self._label(d) for d in self.domains) + " |"
        lines = [head, "|---" * (len(self.domains) + 1) + "|"]
        lines += [f"| {r} | " + " | ".join(self._cell(r, d) for d in self.domains) + " |" for r in self.rows]
        if len(self.channels) > 1:
            lines.append(f"\nCells: Dice % of {', '.join(self.channels)}.")
        return "\n".join(lines)

    def write_csv(self, path: str | Path) -> Path:
        """Wide CSV: one row per model, columns ``<domain> <structure>`` (mean Dice %) and, with
        several runs, ``... std``; plus ``runs``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fields = ["model", "runs"]
        for d in self.domains:
            for c in self.channels:
                fields.append(f"{d} {c}")
                if any(n > 1 for n in self.n_runs.values()):
                    fields.append(f"{d} {c} std")
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in self.rows:
                rec: dict[str, object] = {"model": r, "runs": self.n_runs[r]}
                for d in self.domains:
                    for i, c in enumerate(self.channels):
                        if d in self.mean[r]:
                            rec[f"{d} {c}"] = round(100 * self.mean[r][d][i], 3)
                            if f"{d} {c} std" in fields:
                                rec[f"{d} {c} std"] = round(100 * self.std[r][d][i], 3)
                writer.writerow(rec)
        return path

    def plot(self, path: str | Path, title: str = "Dice per domain") -> Path:
        """Grouped bar chart (one panel per structure, one bar per model and domain, error bars
        = std over runs) as PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, axes = plt.subplots(1, len(self.channels), figsize=(1.2 + 1.1 * len(self.domains) * len(self.channels) + 2, 3.6), squeeze=False)
        width = 0.8 / max(1, len(self.rows))
        x = np.arange(len(self.domains))
        for i, (ax, channel) in enumerate(zip(axes[0], self.channels)):
            for j, r in enumerate(self.rows):
                means = [100 * self.mean[r][d][i] if d in self.mean[r] else np.nan for d in self.domains]
                errs = [100 * self.std[r][d][i] if d in self.mean[r] else 0 for d in self.domains]
                ax.bar(x + (j - (len(self.rows) - 1) / 2) * width, means, width, yerr=errs if self.n_runs[r] > 1 else None, label=r, capsize=2)
            ax.set_xticks(x, [self._label(d) for d in self.domains], rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(f"Dice % ({channel})")
            ax.set_ylim(0, 100)
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].legend(fontsize=7, loc="upper right")
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def dg_table(results: Mapping[str, Sequence[Mapping]], source_site: str | None = None, channel: str | None = None) -> DGTable:
    """Build a :class:`DGTable` from ``{row name: [summary, ...]}`` (one summary per run).

    ``source_site`` is shown first and excluded from the unseen mean (``None``: every domain
    counts as unseen). ``channel`` keeps one structure only."""
    if not results or any(len(v) == 0 for v in results.values()):
        raise ValueError("give at least one summary for every row")
    first = next(iter(results.values()))[0]
    channels = [channel] if channel else list(first["channels"])
    for name, runs in results.items():
        for s in runs:
            missing = [c for c in channels if c not in s["channels"]]
            if missing:
                raise ValueError(f"{name}: summary has structures {s['channels']}, not {missing}")
    sites = sorted({site for runs in results.values() for s in runs for site in s["sites"]})
    if source_site in sites:
        sites = [source_site] + [s for s in sites if s != source_site]
    unseen = [s for s in sites if s != source_site]
    mean: dict[str, dict[str, list[float]]] = {}
    std: dict[str, dict[str, list[float]]] = {}
    for name, runs in results.items():
        per_domain: dict[str, list[list[float]]] = {}
        for s in runs:
            for site in sites:
                if site in s["sites"]:
                    per_domain.setdefault(site, []).append([s["sites"][site][c]["mean"] for c in channels])
            seen = [site for site in unseen if site in s["sites"]]
            if seen:
                per_domain.setdefault(UNSEEN_MEAN, []).append(
                    [float(np.mean([s["sites"][site][c]["mean"] for site in seen])) for c in channels]
                )
        mean[name] = {d: np.mean(v, axis=0).tolist() for d, v in per_domain.items()}
        std[name] = {d: np.std(v, axis=0).tolist() for d, v in per_domain.items()}
    return DGTable(list(results), sites + [UNSEEN_MEAN], channels, source_site, mean, std, {k: len(v) for k, v in results.items()})


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value for ``wins`` vs ``losses`` paired comparisons (ties left
    out): the probability, under "no difference", of a split at least this uneven."""
    n = int(wins) + int(losses)
    if n == 0:
        return 1.0
    from math import comb

    k = min(int(wins), int(losses))
    return min(1.0, 2.0 * sum(comb(n, i) for i in range(k + 1)) / 2.0**n)


def _cases(summary: Mapping, sites: Sequence[str], channel: str) -> dict[tuple[str, str], float]:
    """Dice per (site, case) of the given sites in one summary (one seed)."""
    return {(c["site"], c["case"]): float(c[channel]) for c in summary.get("cases", [])
            if c["site"] in sites and c.get(channel) is not None}


def _per_case(summaries: Sequence[Mapping], sites: Sequence[str], channel: str) -> dict[tuple[str, str], float]:
    """Dice per (site, case) of the given sites, averaged over the summaries (seeds) that have it."""
    values: dict[tuple[str, str], list[float]] = {}
    for s in summaries:
        for key, value in _cases(s, sites, channel).items():
            values.setdefault(key, []).append(value)
    return {k: float(np.mean(v)) for k, v in values.items()}


def _better(values: Mapping, reference: Mapping) -> tuple[str, str]:
    """The wins as "WINS / COMPARED" over the keys both have (ties count as compared, not as
    wins) and the sign test's p-value (ties left out); "–" for both when no key is shared."""
    common = set(values) & set(reference)
    if not common:
        return "–", "–"
    wins = sum(values[k] > reference[k] for k in common)
    losses = sum(values[k] < reference[k] for k in common)
    p = sign_test(wins, losses)
    return f"{wins} / {len(common)}", f"{p:.3f}" if p >= 0.001 else "< 0.001"


_PERTURBATION_COLUMNS = ("image_change", "blur")


def ablation_table(
    results: Mapping[str, Sequence[str | Path | Mapping]], source_site: str | None = None, channel: str | None = None,
    perturbations: Mapping[str, Sequence[Mapping[str, float]]] | None = None,
    seeds: Mapping[str, Sequence[int]] | None = None,
) -> str:
    """Markdown ablation table, one row per arm, compared with the **first** row.

    Columns: the number of seeds; Dice % on the source validation cases; on the unseen domains
    as the mean of the per-domain means (the unseen mean of the other tables) and pooled over
    every unseen case (each seed's mean over the cases; the two differ when the unseen domains
    have different numbers of cases, e.g. one site split into groups), both mean ± std over
    seeds, and the pooled value of each seed in seed order; how many unseen cases are better than in the first row, each case's Dice averaged
    over the seeds both rows have, and how many case-seed pairs are better (the same case and
    seed in both rows), each with a two-sided sign-test p-value (ties left out); and how strong
    the arm's perturbation was (means of the Phase III perturbation logs over seeds: the
    stylized batch's relative distance from its un-stylized counterpart, the decoder's blur,
    and the mean statistics shift of the style layers in units of the real statistics' spread).
    ``seeds``: the seed of each summary of a row, so that the comparisons use the same seeds;
    without it the rows' summaries count as the same seeds in order. The header's case count
    is every unseen case of any row; a row pools the cases its own summaries have."""
    loaded = {k: [v if isinstance(v, Mapping) else load_summary(v) for v in runs] for k, runs in results.items()}
    table = dg_table(loaded, source_site=source_site, channel=channel)
    ch = table.channels[0]
    unseen = [d for d in table.domains if d not in (source_site, UNSEEN_MEAN)]
    rows = list(loaded)
    reference = rows[0]
    seed_of = {row: list(seeds[row]) if seeds and row in seeds else list(range(len(loaded[row]))) for row in rows}
    for row in rows:
        if len(seed_of[row]) != len(loaded[row]) or len(set(seed_of[row])) != len(seed_of[row]):
            raise ValueError(f"ablation row {row!r}: {len(loaded[row])} summaries but seeds {seed_of[row]} "
                             "(give one distinct seed per summary)")
    by_seed = {row: dict(zip(seed_of[row], loaded[row])) for row in rows}
    n_cases = len(_per_case([s for runs in loaded.values() for s in runs], unseen, ch))
    head = (f"| arm | seeds | {source_site} (source val.) | unseen ({', '.join(unseen)}): mean of sites | "
            f"unseen: pooled over {n_cases} cases | pooled, per seed | cases better than {reference} (same seeds) | "
            "sign test p | case-seed pairs better | sign test p | image change | blur | style shift |")
    lines = [head, "|" + "---|" * 13]

    def spread(values: Sequence[float]) -> str:
        if not values:
            return "-"
        return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}" if len(values) > 1 else f"{100 * values[0]:.1f}"

    for row in rows:
        n = table.n_runs[row]

        def cell(domain: str) -> str:
            if domain is None or domain not in table.mean[row]:
                return "-"
            m, sd = 100 * table.mean[row][domain][0], 100 * table.std[row][domain][0]
            return f"{m:.1f} ± {sd:.1f}" if n > 1 else f"{m:.1f}"

        per_seed = {k: float(np.mean(list(c.values()))) for k, c in
                    ((k, _cases(s, unseen, ch)) for k, s in by_seed[row].items()) if c}
        pooled = spread(list(per_seed.values()))
        seed_cell = " / ".join(f"{100 * per_seed[k]:.1f}" for k in sorted(per_seed)) if len(per_seed) > 1 else "-"
        if row == reference:
            better = ["–"] * 4
        else:
            shared = [k for k in by_seed[row] if k in by_seed[reference]]
            cases = _per_case([by_seed[row][k] for k in shared], unseen, ch)
            ref_cases = _per_case([by_seed[reference][k] for k in shared], unseen, ch)
            pairs = {(k, c): v for k in shared for c, v in _cases(by_seed[row][k], unseen, ch).items()}
            ref_pairs = {(k, c): v for k in shared for c, v in _cases(by_seed[reference][k], unseen, ch).items()}
            better = [*_better(cases, ref_cases), *_better(pairs, ref_pairs)]
        runs = [r for r in (perturbations or {}).get(row, []) if r]
        pert = []
        for key in _PERTURBATION_COLUMNS:
            vals = [r[key] for r in runs if key in r]
            pert.append(f"{np.mean(vals):.2f}" if vals else "-")
        shifts = [np.mean([v for k, v in r.items() if k.endswith(("_mean", "_std"))]) for r in runs
                  if any(k.endswith(("_mean", "_std")) for k in r)]
        pert.append(f"{np.mean(shifts):.2f}" if shifts else "-")
        cells = [row, str(n), cell(source_site), cell(UNSEEN_MEAN), pooled, seed_cell, *better, *pert]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def case_table(
    results: Mapping[str, Sequence[str | Path | Mapping]], source_site: str | None = None, channel: str | None = None,
) -> str:
    """Markdown table of each unseen case's Dice %, averaged over each row's summaries (seeds):
    one line per case, one column per row (arm), and the number of seeds that have the case
    when it is not the same for every arm and case. It shows which cases make a difference in
    the means."""
    loaded = {k: [v if isinstance(v, Mapping) else load_summary(v) for v in runs] for k, runs in results.items()}
    ch = dg_table(loaded, source_site=source_site, channel=channel).channels[0]
    sites = sorted({c["site"] for runs in loaded.values() for s in runs for c in s.get("cases", [])} - {source_site})
    counts = {row: {} for row in loaded}
    for row, runs in loaded.items():
        for s in runs:
            for key in _cases(s, sites, ch):
                counts[row][key] = counts[row].get(key, 0) + 1
    means = {row: _per_case(runs, sites, ch) for row, runs in loaded.items()}
    cases = sorted(set().union(*(set(m) for m in means.values())))
    uneven = len({counts[row].get(key, 0) for row in loaded for key in cases}) > 1
    lines = ["| site | case | " + " | ".join(loaded) + " |", "|" + "---|" * (len(loaded) + 2)]
    for key in cases:
        cells = []
        for row in loaded:
            value = f"{100 * means[row][key]:.1f}" if key in means[row] else "-"
            n = counts[row].get(key, 0)
            cells.append(f"{value} ({n} seed{'s' if n != 1 else ''})" if uneven and key in means[row] else value)
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(*summary_files: str, source_site: str | None = None, channel: str | None = None) -> str:
    """Markdown table of the per-site mean Dice of the summary files: one row per name
    ``<name>`` of ``<name>_summary.json``; files of the same name (the same model trained with
    several seeds, ``seed*/eval/model_summary.json``) make one row, mean ± std over them.
    ``source_site`` defaults to the one the summaries record (their ``split``)."""
    if not summary_files:
        raise ValueError("give at least one summary file")
    results: dict[str, list] = {}
    for f in summary_files:
        results.setdefault(Path(f).name.removesuffix("_summary.json"), []).append(load_summary(f))
    if source_site is None:
        recorded = {s[0].get("split", {}).get("source_site") for s in results.values()} - {None}
        source_site = recorded.pop() if len(recorded) == 1 else None
    table = dg_table(results, source_site=source_site, channel=channel).markdown()
    return table + "\n\n" + protocol_text([s for runs in results.values() for s in runs])


def main(*summary_files: str, source_site: str | None = None, channel: str | None = None) -> None:
    """Print the Dice table (%) of evaluation summaries (``eval/<name>_summary.json``).

    Args:
        summary_files: one or more ``*_summary.json`` files written by ``evaluate.json``; files
            of the same name (several seeds) are one row, mean ± std.
        source_site: the training site, shown first and left out of the unseen mean (default:
            the one the summaries record).
        channel: keep one structure only (fundus: ``disc`` or ``cup``).
    """
    if not summary_files:
        raise SystemExit("usage: python -m msf_monai.report EVAL/NAME_summary.json [...] [--source_site SITE] [--channel NAME]")
    try:
        print(summary_table(*summary_files, source_site=source_site, channel=channel))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    from msf_monai.cli import fire_main

    fire_main(main)
