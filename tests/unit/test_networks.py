"""The networks (msf_monai.networks): the dual-decoder network, its segmentation-only view and the reference UNet."""

import pytest
import torch
from torch import nn

from msf_monai.methods import get_method
from msf_monai.networks import (
    DualDecoderNet,
    SegmentationOnlyNet,
    SegmentationView,
    build_network,
    checkpoint_architecture,
    image_decoder_channels,
)
from msf_monai.styles import GIN
from training_utils import tiny_loader, tiny_trainer


@pytest.mark.slow
@pytest.mark.parametrize("in_ch,out_ch", [(1, 1), (3, 2)])
@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
def test_output_shapes(in_ch, out_ch, size):
    net = DualDecoderNet(in_channels=in_ch, out_channels=out_ch).eval()
    x = torch.rand(2, in_ch, *size)
    seg, rec = net(x)
    assert seg.shape == (2, out_ch, *size)
    assert rec.shape == x.shape
    assert rec.min() >= 0 and rec.max() <= 1
    z = net.encode(x)
    assert z.shape == (2, 128, size[0] // 16, size[1] // 16)
    _, feats = net.reconstruct(z, return_features=True)
    expected = {1: 64, 2: 32, 3: 16, 4: 16}
    assert {k: f.shape[1] for k, f in feats.items()} == expected == net.image_decoder_channels
    for k, f in feats.items():
        assert f.shape[-2:] == (size[0] * 2**k // 16, size[1] * 2**k // 16)


def test_custom_widths():
    net = DualDecoderNet(channels=(8, 16, 32, 64, 64))
    assert image_decoder_channels((8, 16, 32, 64, 64)) == {1: 32, 2: 16, 3: 8, 4: 8}
    seg, rec = net(torch.rand(1, 1, 32, 32))
    assert seg.shape == rec.shape == (1, 1, 32, 32)


@pytest.mark.slow
def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    net = DualDecoderNet(in_channels=3, out_channels=2).train()
    x = torch.rand(2, 3, 32, 32)
    seg, rec = net(x)
    loss = seg.square().mean() + (rec - x).square().mean()
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_segmentation_only_shares_weights_and_returns_one_tensor():
    torch.manual_seed(0)
    full = DualDecoderNet().eval()
    seg_only = SegmentationOnlyNet().eval()
    seg_only.load_state_dict(full.state_dict(), strict=True)
    x = torch.rand(2, 1, 32, 32)
    out = seg_only(x)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, full(x)[0])


class _AddOne(nn.Module):
    def forward(self, x):
        return x + 1.0


def test_style_layers_are_inserted_where_asked():
    torch.manual_seed(0)
    net = DualDecoderNet().eval()
    x = torch.rand(1, 1, 32, 32)
    z = net.encode(x)
    plain, plain_feats = net.reconstruct(z, return_features=True)
    net.set_style("image_decoder", 2, _AddOne())
    # the clean reconstruction is never stylized
    torch.testing.assert_close(net.reconstruct(z), plain)
    styled, feats = net.reconstruct(z, stylize=True, return_features=True)
    torch.testing.assert_close(feats[1], plain_feats[1])
    torch.testing.assert_close(feats[2], plain_feats[2] + 1.0)
    assert not torch.allclose(styled, plain)
    net.set_style("image_decoder", 2, None)
    torch.testing.assert_close(net.reconstruct(z, stylize=True), plain)

    net.set_style("encoder", 1, _AddOne())
    assert not torch.allclose(net.encode(x), z)
    with pytest.raises(ValueError, match="image_decoder style index"):
        net.set_style("image_decoder", 0, _AddOne())
    with pytest.raises(ValueError, match="where must be"):
        net.set_style("decoder", 1, _AddOne())


def test_bad_input_sizes_are_rejected():
    net = DualDecoderNet()
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(1, 1, 40, 32))
    with pytest.raises(ValueError, match="expected input"):
        net(torch.rand(1, 3, 32, 32))


@pytest.mark.slow
def test_reference_unet_trains_and_is_recognised(tmp_path):
    method = get_method("unet")
    net = build_network(method.architecture)
    assert 1.5e6 < sum(p.numel() for p in net.parameters()) < 1.8e6
    torch.manual_seed(0)
    trainer = tiny_trainer(net, method.iteration(), tiny_loader(n_batches=1))
    trainer.run()
    assert float(trainer.state.output[0]["rec_loss"]) == 0.0
    assert SegmentationView(net)(torch.rand(1, 1, 32, 32)).shape == (1, 1, 32, 32)
    torch.save(net.state_dict(), tmp_path / "unet.pt")
    torch.save(DualDecoderNet().state_dict(), tmp_path / "dual.pt")
    assert checkpoint_architecture(str(tmp_path / "unet.pt")) == "unet"
    assert checkpoint_architecture(str(tmp_path / "dual.pt")) == "dual_decoder"
    with pytest.raises(ValueError, match="no style layers"):
        build_network("unet", encoder_styles={1: GIN()})
