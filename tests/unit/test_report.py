"""Result tables (msf_monai.report): one row per model over seeds, the Dice protocol, the sign test and ablation table."""

from __future__ import annotations

import numpy as np
import pytest

from msf_monai.report import ablation_table, sign_test


def test_report_makes_one_row_of_the_seeds_of_a_model(tmp_path):
    """``seed*/eval/model_summary.json``: one row per model name, mean ± std over the seeds."""
    import json

    from msf_monai.report import summary_table

    files = []
    for seed, (a, b) in enumerate([(0.8, 0.6), (0.9, 0.7)]):
        folder = tmp_path / f"seed{seed}" / "eval"
        folder.mkdir(parents=True)
        summary = {"channels": ["prostate"], "split": {"source_site": "A"},
                   "sites": {"A": {"n": 1, "prostate": {"mean": a, "std": 0}}, "B": {"n": 2, "prostate": {"mean": b, "std": 0}}}}
        (folder / "model_summary.json").write_text(json.dumps(summary))
        files.append(str(folder / "model_summary.json"))
    table = summary_table(*files)
    rows = [line for line in table.splitlines() if line.startswith("| model |")]
    assert len(rows) == 1 and "85.0" in rows[0] and "65.0" in rows[0] and "±" in rows[0], table


def test_every_table_states_its_dice_protocol(tmp_path):
    """The protocol of the summaries under the table; differing protocols are flagged, and
    summaries from before 0.5.0 (no protocol recorded) are named as such."""
    import json

    from msf_monai.report import summary_table

    base = {"channels": ["prostate"], "split": {"source_site": "A"},
            "sites": {"A": {"n": 1, "prostate": {"mean": 0.8, "std": 0}}, "B": {"n": 1, "prostate": {"mean": 0.6, "std": 0}}}}
    original = {"eval_space": "original", "dice": "volume", "eval_slices": "all", "checkpoint_policy": "best",
                "selected_on": "source validation"}
    (tmp_path / "X_summary.json").write_text(json.dumps(dict(base, protocol=original)))
    (tmp_path / "Y_summary.json").write_text(json.dumps(dict(base, protocol=dict(original, dice="slice", eval_space="resized"))))
    (tmp_path / "Old_summary.json").write_text(json.dumps(base))
    one = summary_table(str(tmp_path / "X_summary.json"))
    assert one.endswith("Protocol: Dice per volume, all slices, each scan's original geometry, best checkpoint on source validation.")
    mixed = summary_table(*(str(tmp_path / f"{n}_summary.json") for n in ("X", "Y", "Old")))
    assert "MIXED" in mixed and "per slice, all slices, the resized grid" in mixed and "recorded before 0.5.0" in mixed


def _summary(values, other=()):
    """A summary with Dice ``values`` for site B's cases, ``other`` for site C's, and 0.8 on site A."""
    cases = [{"site": "B", "case": f"c{i}", "p": v} for i, v in enumerate(values)]
    cases += [{"site": "C", "case": f"d{i}", "p": v} for i, v in enumerate(other)]
    cases.append({"site": "A", "case": "a0", "p": 0.8})
    sites = {"A": {"n": 1, "p": {"mean": 0.8}}, "B": {"n": len(values), "p": {"mean": float(np.mean(values))}}}
    if other:
        sites["C"] = {"n": len(other), "p": {"mean": float(np.mean(other))}}
    return {"channels": ["p"], "cases": cases, "sites": sites}


def _row(text, name):
    row = [line for line in text.splitlines() if line.startswith(f"| {name} ")][0]
    return [c.strip() for c in row.strip("|").split("|")]


def test_sign_test_and_ablation_table():
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    assert sign_test(5, 5) == 1.0
    assert sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)

    base = [_summary([0.5, 0.6, 0.7]), _summary([0.5, 0.6, 0.7])]
    better = [_summary([0.6, 0.7, 0.6]), _summary([0.6, 0.7, 0.9])]
    text = ablation_table({"base": base, "new": better}, source_site="A",
                          perturbations={"new": [{"image_change": 0.2, "blur": 0.1, "dec2_mean": 1.0, "dec2_std": 3.0}]})
    assert "pooled over 3 cases" in text.splitlines()[0]
    cells = _row(text, "new")
    assert cells[1] == "2" and cells[3] == "68.3 ± 5.0" and cells[4] == "68.3 ± 5.0"  # one unseen site: both means agree
    assert cells[5] == "3 / 3" and cells[6] == f"{sign_test(3, 0):.3f}"  # cases, Dice averaged over the seeds
    assert cells[7] == "5 / 6" and cells[8] == f"{sign_test(5, 1):.3f}"  # case-seed pairs: seed 0's c2 is worse
    assert cells[9:] == ["0.20", "0.10", "2.00"]
    assert _row(text, "base")[5:9] == ["–"] * 4
    # with seeds: only the seeds both rows have are compared (seed 1 of "new" alone: 3 of 3 better)
    text = ablation_table({"base": base, "new": better[1:]}, source_site="A", seeds={"base": [0, 1], "new": [1]})
    assert _row(text, "new")[5] == "3 / 3" and _row(text, "new")[7] == "3 / 3"
    worse = [_summary([0.4, 0.7, 0.6])]
    text = ablation_table({"base": base, "new": worse}, source_site="A", seeds={"base": [0, 1], "new": [1]})
    assert _row(text, "new")[5] == "1 / 3"
    many = ablation_table({"base": [_summary([0.5] * 12)], "new": [_summary([0.6] * 12)]}, source_site="A")
    assert _row(many, "new")[5:7] == ["12 / 12", "< 0.001"]  # p = 2 / 4096


def test_ablation_table_pools_unseen_cases_of_unequal_sites():
    """Two unseen groups of 1 and 3 cases: the mean of sites weights the lone case by half, the
    pooled mean by a quarter; both are mean ± std over seeds."""
    runs = [_summary([0.4], [0.8, 0.8, 0.8]), _summary([0.6], [0.8, 0.8, 0.8])]
    text = ablation_table({"base": runs, "same": runs}, source_site="A")
    assert "unseen (B, C): mean of sites" in text and "pooled over 4 cases" in text
    cells = _row(text, "base")
    assert cells[3] == "65.0 ± 5.0"  # (0.4 + 0.8) / 2 and (0.6 + 0.8) / 2
    assert cells[4] == "72.5 ± 2.5"  # (0.4 + 2.4) / 4 and (0.6 + 2.4) / 4
    assert _row(text, "same")[5:9] == ["0 / 4", "1.000", "0 / 8", "1.000"]  # all ties
