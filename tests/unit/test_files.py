"""Writing files (msf_monai.files): training states, models and flows written through a temporary file."""

from __future__ import annotations

import os

import torch


def test_saved_files_get_the_usual_mode(tmp_path):
    """Files written through a private temporary file (training states, models, flows) get the
    mode a plain ``open()`` would give them, not mkstemp's owner-only 0600."""
    from msf_monai.flows import StyleFlowBank
    from msf_monai.files import atomic_save, new_file_mode

    old = os.umask(0o022)
    try:
        assert new_file_mode() == 0o644
        atomic_save({"x": torch.zeros(1)}, tmp_path / "state.pt")
        bank = StyleFlowBank({2: 4})
        bank.save(tmp_path / "style_flows.pt")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        for name in ("state.pt", "style_flows.pt"):
            assert (tmp_path / name).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o644, name
    finally:
        os.umask(old)
