"""Model-zoo export with ``monai.bundle ckpt_export`` (TorchScript) and ``verify_net_in_out`` on both bundles' network."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bundle_utils import REPO
from msf_monai.networks import SegmentationOnlyNet, reference_unet

pytestmark = pytest.mark.slow


BUNDLES = {"prostate": (1, 1), "fundus": (3, 2)}


def _monai_bundle(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_ckpt_export_matches_the_eager_network(bundle, tmp_path):
    in_ch, out_ch = BUNDLES[bundle]
    torch.manual_seed(1)
    net = SegmentationOnlyNet(in_ch, out_ch)
    # perturb the BatchNorm statistics so that eval mode is not the identity
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    net.eval()
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)  # a plain state dict, as the trainers save
    configs = REPO / "bundles" / bundle / "configs"
    ts = tmp_path / "model.ts"
    _monai_bundle("ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(ckpt),
                  "--meta_file", str(configs / "metadata.json"), "--config_file", str(configs / "inference.json"))
    exported = torch.jit.load(str(ts), map_location="cpu").eval()
    x = torch.rand(2, in_ch, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net(x), rtol=1e-5, atol=1e-5)
    out = _monai_bundle("verify_net_in_out", "network_def", "--meta_file", str(configs / "metadata.json"),
                        "--config_file", str(configs / "inference.json"))
    assert "verified with no error" in out


@pytest.mark.slow
def test_ckpt_export_of_a_unet_checkpoint(tmp_path):
    """``unet``/``unet_mixstyleflow`` models export as the MONAI ``UNet`` when ``--checkpoint``
    names the file (``--ckpt_file`` is not a config id, so the network is chosen from
    ``--checkpoint``)."""
    torch.manual_seed(2)
    net = reference_unet().eval()
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    configs = REPO / "bundles" / "prostate" / "configs"
    ts = tmp_path / "model.ts"
    _monai_bundle("ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(ckpt), "--checkpoint", str(ckpt),
                  "--meta_file", str(configs / "metadata.json"), "--config_file", str(configs / "inference.json"))
    exported = torch.jit.load(str(ts), map_location="cpu").eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net(x), rtol=1e-5, atol=1e-5)
