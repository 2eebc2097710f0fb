"""Model-zoo export in process: metadata that matches the segmentation-only network of both bundles, and TorchScript."""

from __future__ import annotations

import json

import pytest
import torch

from bundle_utils import REPO
from msf_monai.networks import SegmentationOnlyNet


BUNDLES = {"prostate": (1, 1), "fundus": (3, 2)}


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_metadata_describes_the_segmentation_network(bundle):
    in_ch, out_ch = BUNDLES[bundle]
    meta = json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == in_ch
    assert fmt["outputs"]["pred"]["num_channels"] == out_ch
    assert len(fmt["outputs"]["pred"]["channel_def"]) == out_ch
    inference = json.loads((REPO / "bundles" / bundle / "configs" / "inference.json").read_text())
    assert (inference["in_channels"], inference["out_channels"]) == (in_ch, out_ch)


@pytest.mark.slow
def test_torchscript_is_scriptable_and_keeps_state_dict_keys():
    net = SegmentationOnlyNet(3, 2).eval()
    scripted = torch.jit.script(net)
    assert set(scripted.state_dict()) == set(net.state_dict())
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(scripted(x), net(x))
