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
    last = dict(original, checkpoint_policy="last", selected_on="none (the last epoch)")
    (tmp_path / "Z_summary.json").write_text(json.dumps(dict(base, protocol=last)))
    assert summary_table(str(tmp_path / "Z_summary.json")).endswith("each scan's original geometry, the last epoch's checkpoint.")


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

    base = [_summary([0.5, 0.6, 0.7]), _summary([0.7, 0.8, 0.5])]
    better = [_summary([0.6, 0.7, 0.6]), _summary([0.8, 0.9, 0.7])]
    text = ablation_table({"base": base, "new": better}, source_site="A",
                          perturbations={"new": [{"image_change": 0.2, "blur": 0.1, "dec2_mean": 1.0, "dec2_std": 3.0}]})
    assert "pooled over 3 cases" in text.splitlines()[0]
    cells = _row(text, "new")
    assert cells[1] == "2" and cells[3] == "71.7 ± 8.3" and cells[4] == "71.7 ± 8.3"  # one unseen site: both means agree
    assert cells[6] == "3 / 3" and cells[7] == f"{sign_test(3, 0):.3f}"  # cases, Dice averaged over the seeds
    assert cells[8] == "5 / 6" and cells[9] == f"{sign_test(5, 1):.3f}"  # case-seed pairs: seed 0's c2 is worse
    assert cells[5] == "63.3 / 80.0"  # the pooled value of each seed
    assert cells[10:] == ["0.20", "0.10", "2.00"]
    assert _row(text, "base")[6:10] == ["–"] * 4
    # with seeds, each summary is compared with the reference's summary of the same seed: "new"
    # seed 1 beats base seed 1 in 3 of 3 cases; paired with base seed 0 instead it would be 2 of 3
    text = ablation_table({"base": base, "new": better[1:]}, source_site="A", seeds={"base": [0, 1], "new": [1]})
    assert _row(text, "new")[6] == "3 / 3" and _row(text, "new")[8] == "3 / 3"
    worse = [_summary([0.6, 0.9, 0.4])]  # against base seed 1: 1 of 3 better (against seed 0: 2 of 3)
    text = ablation_table({"base": base, "new": worse}, source_site="A", seeds={"base": [0, 1], "new": [1]})
    assert _row(text, "new")[6] == "1 / 3" and _row(text, "new")[8] == "1 / 3"
    # no shared seed: nothing is compared, which is not a null result
    text = ablation_table({"base": base, "new": worse}, source_site="A", seeds={"base": [0, 1], "new": [2]})
    assert _row(text, "new")[6:10] == ["–"] * 4
    with pytest.raises(ValueError, match="one distinct seed per summary"):
        ablation_table({"base": base, "new": better}, source_site="A", seeds={"base": [0, 0], "new": [0, 1]})
    many = ablation_table({"base": [_summary([0.5] * 12)], "new": [_summary([0.6] * 12)]}, source_site="A")
    assert _row(many, "new")[5] == "-" and _row(many, "new")[6:8] == ["12 / 12", "< 0.001"]  # p = 2 / 4096


def test_ablation_table_pools_unseen_cases_of_unequal_sites():
    """Two unseen groups of 1 and 3 cases: the mean of sites weights the lone case by half, the
    pooled mean by a quarter; both are mean ± std over seeds."""
    runs = [_summary([0.4], [0.8, 0.8, 0.8]), _summary([0.6], [0.8, 0.8, 0.8])]
    text = ablation_table({"base": runs, "same": runs}, source_site="A")
    assert "unseen (B, C): mean of sites" in text and "pooled over 4 cases" in text
    cells = _row(text, "base")
    assert cells[3] == "65.0 ± 5.0"  # (0.4 + 0.8) / 2 and (0.6 + 0.8) / 2
    assert cells[4] == "72.5 ± 2.5"  # (0.4 + 2.4) / 4 and (0.6 + 2.4) / 4
    assert _row(text, "same")[6:10] == ["0 / 4", "1.000", "0 / 8", "1.000"]  # all ties
    # a case missing from one arm's seed is left out of that seed's pairs and its pooled mean
    gap = [_summary([0.5], [0.9, 0.9]), _summary([0.7], [0.9, 0.9, 0.9])]
    text = ablation_table({"base": runs, "gap": gap}, source_site="A")
    assert _row(text, "gap")[4:6] == ["80.8 ± 4.2", "76.7 / 85.0"]  # (0.5 + 1.8) / 3 and (0.7 + 2.7) / 4
    assert _row(text, "gap")[6] == "4 / 4" and _row(text, "gap")[8] == "7 / 7"  # 8 pairs less the missing one


def test_case_table_gives_each_unseen_case_per_arm():
    """One line per unseen case (the source site left out), its Dice averaged over each arm's
    seeds; the seed counts appear only when they differ."""
    from msf_monai.report import case_table

    base = [_summary([0.4, 0.6], [0.8]), _summary([0.6, 0.8], [0.8])]
    new = [_summary([0.5, 0.9], [0.7])]
    text = case_table({"base": base, "new": new}, source_site="A")
    lines = text.splitlines()
    assert lines[0] == "| site | case | base | new |" and len(lines) == 2 + 3
    assert "| B | c0 | 50.0 (2 seeds) | 50.0 (1 seed) |" in lines and "| C | d0 | 80.0 (2 seeds) | 70.0 (1 seed) |" in lines
    assert not any("| A |" in line for line in lines)
    even = case_table({"base": base, "new": base}, source_site="A")
    assert "| B | c1 | 70.0 | 70.0 |" in even.splitlines()
