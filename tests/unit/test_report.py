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


def test_sign_test_and_ablation_table():
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    assert sign_test(5, 5) == 1.0
    assert sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)

    def summary(values):
        cases = [{"site": "B", "case": f"c{i}", "p": v} for i, v in enumerate(values)]
        cases.append({"site": "A", "case": "a0", "p": 0.8})
        return {"channels": ["p"], "cases": cases,
                "sites": {"A": {"n": 1, "p": {"mean": 0.8}}, "B": {"n": len(values), "p": {"mean": float(np.mean(values))}}}}

    base = [summary([0.5, 0.6, 0.7]), summary([0.5, 0.6, 0.7])]
    better = [summary([0.6, 0.7, 0.6]), summary([0.6, 0.7, 0.9])]
    text = ablation_table({"base": base, "new": better}, source_site="A",
                          perturbations={"new": [{"image_change": 0.2, "blur": 0.1, "dec2_mean": 1.0, "dec2_std": 3.0}]})
    row = [line for line in text.splitlines() if line.startswith("| new")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and cells[3] == "68.3 ± 5.0"  # unseen mean ± std over seeds
    assert cells[4] == "3 / 3" and cells[5] == f"{sign_test(3, 0):.3f}"
    assert cells[6:] == ["0.20", "0.10", "2.00"]
    # with seeds: only the seeds both rows have are compared (seed 1 of "new" alone: 1 of 3 better)
    text = ablation_table({"base": base, "new": better[1:]}, source_site="A", seeds={"base": [0, 1], "new": [0]})
    row = [line for line in text.splitlines() if line.startswith("| new")][0]
    assert [c.strip() for c in row.strip("|").split("|")][4] == "3 / 3"
    worse = [summary([0.4, 0.7, 0.6])]
    text = ablation_table({"base": base, "new": worse}, source_site="A", seeds={"base": [0, 1], "new": [1]})
    row = [line for line in text.splitlines() if line.startswith("| new")][0]
    assert [c.strip() for c in row.strip("|").split("|")][4] == "1 / 3"
