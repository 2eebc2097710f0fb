"""The shared data-list core: pairing images with labels by case."""

from __future__ import annotations

from pathlib import Path

from msf_monai.data.core import pair_by_case


def _pair(images, labels, **kw):
    problems: list[str] = []
    pairs = pair_by_case([(Path(p).name.split(".")[0], Path(p)) for p in images],
                         [(Path(p).name.split(".")[0], Path(p)) for p in labels], problems,
                         lambda case, _: f"no {case}.* in labels/", lambda case, _: f"no {case}.* in images/", **kw)
    return pairs, problems


def test_pairs_in_natural_order_and_every_problem_named():
    pairs, problems = _pair(["i/c10.nii", "i/c2.nii", "i/c3.nii", "i/c4.nii", "i/c4.nii.gz"],
                            ["l/c2.nii", "l/c10.nii", "l/c5.nii", "l/c4.nii"], label_word="mask")
    assert [(c, i.name, lab.name) for c, i, lab in pairs] == [("c2", "c2.nii", "c2.nii"), ("c10", "c10.nii", "c10.nii")]
    assert problems == [
        "image without mask: i/c3.nii (no c3.* in labels/)",
        "several images for case 'c4': i/c4.nii, i/c4.nii.gz",
        "mask without image: l/c5.nii (no c5.* in images/)",
    ]


def test_prefer_same_name_takes_the_file_whose_whole_name_has_a_partner():
    pairs, problems = _pair(["i/c4.nii", "i/c4.nii.gz"], ["l/c4.nii"], prefer_same_name=True)
    assert problems == [] and [(i.name, lab.name) for _, i, lab in pairs] == [("c4.nii", "c4.nii")]
    # no whole-name partner: still several images, reported, nothing paired
    pairs, problems = _pair(["i/c4.nii", "i/c4.nii.gz"], ["l/c4.mha"], prefer_same_name=True)
    assert pairs == [] and problems == ["several images for case 'c4': i/c4.nii, i/c4.nii.gz"]
