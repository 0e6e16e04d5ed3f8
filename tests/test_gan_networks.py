"""The pix2pix networks match the study's spec: widths, norms, dropout, receptive field, scales."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emsynth.errors import EmsynthError
from emsynth.gan.networks import (
    MultiScaleDiscriminator,
    UNetGenerator,
    conv4s2_as_matmul,
    frozen,
    patch_logits,
    split_pairs,
)

SPEC_ENCODER = [64, 128, 256, 512, 512, 512, 512, 512]  # C64-C128-C256-C512-C512-C512-C512-C512
SPEC_DECODER = [512, 1024, 1024, 1024, 1024, 512, 256, 128]  # CD512-CD1024-CD1024-C1024-...-C128
SPEC_DROPOUT = [True, True, True, False, False, False, False, False]



def _layout(generator: UNetGenerator):
    enc = [block.conv.out_channels for block in generator.down]
    dec = [block.conv.in_channels for block in generator.up]
    return enc, dec


@pytest.mark.parametrize("ngf", [64, 8])
def test_generator_widths_follow_the_spec(ngf):
    g = UNetGenerator(in_channels=2, out_channels=1, ngf=ngf)
    enc, dec = _layout(g)
    assert enc == [w * ngf // 64 for w in SPEC_ENCODER]
    assert dec == [w * ngf // 64 for w in SPEC_DECODER]
    assert g.down[0].conv.in_channels == 2 and g.up[-1].conv.out_channels == 1
    for block in [*g.down, *g.up]:
        assert block.conv.kernel_size == (4, 4) and block.conv.stride == (2, 2)
    assert all(isinstance(b.conv, nn.Conv2d) for b in g.down)
    assert all(isinstance(b.conv, nn.ConvTranspose2d) for b in g.up)


def test_generator_norms_activations_dropout():
    g = UNetGenerator(in_channels=3, ngf=8)
    has_norm = [isinstance(b.norm, nn.InstanceNorm2d) for b in g.down]
    assert has_norm == [False, True, True, True, True, True, True, False]  # first and innermost
    assert [isinstance(b.norm, nn.InstanceNorm2d) for b in g.up] == [True] * 7 + [False]
    assert isinstance(g.down[0].act, nn.Identity)
    assert all(isinstance(b.act, nn.LeakyReLU) and b.act.negative_slope == 0.2 for b in g.down[1:])
    assert all(isinstance(b.act, nn.ReLU) for b in g.up)
    dropout = [isinstance(b.dropout, nn.Dropout) and b.dropout.p == 0.5 for b in g.up]
    assert dropout == SPEC_DROPOUT
    assert isinstance(g.out_act, nn.Tanh)


def test_generator_output_shape_range_and_bottleneck():
    g = UNetGenerator(in_channels=2, ngf=8)
    sizes, last = [], []
    g.down[-1].register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:])))
    g.up[-1].register_forward_hook(lambda m, i, o: last.append(o))
    x = torch.randint(0, 2, (2, 2, 256, 256)).float() * 2 - 1
    y = g(x)
    assert y.shape == (2, 1, 256, 256)
    # The output is tanh of the outermost decoder layer, applied once, nothing else on top
    # (not a clamp, not 2 * sigmoid - 1, not a second tanh); and it is not constant.
    assert torch.equal(y, torch.tanh(last[0])) and y.std() > 0
    assert sizes == [(1, 1)]  # 8 stride-2 levels: 256 -> 1
    y = g(torch.zeros(1, 2, 256, 512))
    assert y.shape == (1, 1, 256, 512) and sizes[-1] == (1, 2)


@pytest.mark.parametrize("hw", [(250, 256), (256, 384), (128, 128)])
def test_generator_rejects_sides_not_multiple_of_256(hw):
    g = UNetGenerator(in_channels=2, ngf=4)
    with pytest.raises(EmsynthError, match="multiples of 256"):
        g(torch.zeros(1, 2, *hw))


def test_patchgan_layout_is_c64_c128_c256_c512():
    d = MultiScaleDiscriminator(in_channels=3, ndf=64)
    assert len(d.scales) == 3
    for patchgan in d.scales:
        convs = [m for m in patchgan.modules() if isinstance(m, nn.Conv2d)]
        assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
        assert [c.stride for c in convs] == [(2, 2)] * 3 + [(1, 1)] * 2
        assert all(c.kernel_size == (4, 4) for c in convs)
        norms = [m for m in patchgan.modules() if isinstance(m, nn.InstanceNorm2d)]
        assert len(norms) == 3  # not on the first layer, not on the logits


def _receptive_field_from_modules(patchgan: nn.Module) -> int:
    field = 1
    for conv in reversed([m for m in patchgan.modules() if isinstance(m, nn.Conv2d)]):
        field = (field - 1) * conv.stride[0] + conv.kernel_size[0]
    return field


def test_patchgan_receptive_field_is_70():
    torch.manual_seed(0)
    d = MultiScaleDiscriminator(in_channels=3, ndf=8, n_scales=1, norm=None)
    assert _receptive_field_from_modules(d.scales[0]) == 70
    x = torch.randn(1, 3, 256, 256, requires_grad=True)
    logits = d(x)[0][-1]
    assert logits.shape[-2:] == (30, 30)
    logits[0, 0, 15, 15].backward()
    support = x.grad.abs().sum(dim=(0, 1)) > 0
    rows = torch.nonzero(support.any(dim=1)).flatten()
    cols = torch.nonzero(support.any(dim=0)).flatten()
    assert rows.max() - rows.min() + 1 == 70
    assert cols.max() - cols.min() + 1 == 70
    assert support[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_three_scales_see_full_half_quarter_resolution():
    d = MultiScaleDiscriminator(in_channels=3, ndf=4)
    seen = []
    for patchgan in d.scales:
        patchgan.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    feats = d(torch.randn(1, 3, 256, 256))
    assert seen == [(256, 256), (128, 128), (64, 64)]
    assert [tuple(f[-1].shape[-2:]) for f in feats] == [(30, 30), (14, 14), (6, 6)]
    assert all(len(f) == 5 for f in feats)  # four feature maps + logits (feature matching)


def _half_scale_input(x: torch.Tensor) -> torch.Tensor:
    """What the second PatchGAN of a two-scale discriminator sees of `x`."""
    d = MultiScaleDiscriminator(in_channels=1, ndf=4, n_scales=2)
    seen = []
    d.scales[1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    d(x)
    return seen[0][0, 0]


def test_downsampling_is_pix2pixhd_3x3_average_pooling_without_padding():
    """pix2pixHD's downsampler: 3x3 mean, stride 2, zero padding left out of the mean. Output
    (i, j) averages input rows and columns 2i-1..2i+1 that exist."""
    # A checkerboard: every full 3x3 window centred on a 0 holds four 1s (4/9); at the top and
    # left borders only 2x3 or 2x2 pixels exist, half of them 1s (1/2). A 2x2 mean pool and
    # bilinear resizing give 1/2 everywhere, strided subsampling 0, a 3x3 pool that counts
    # the padding 1/3 on the borders and 2/9 in the corner.
    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    checker = ((rows + cols) % 2).float()[None, None]
    expected = torch.full((32, 32), 4 / 9)
    expected[0, :] = 1 / 2
    expected[:, 0] = 1 / 2
    torch.testing.assert_close(_half_scale_input(checker), expected)
    # A single bright pixel at (1, 1) lies in the windows of outputs (0, 0), (0, 1), (1, 0)
    # and (1, 1), of 4, 6, 6 and 9 existing pixels.
    impulse = torch.zeros(1, 1, 64, 64)
    impulse[0, 0, 1, 1] = 1.0
    expected = torch.zeros(32, 32)
    expected[:2, :2] = torch.tensor([[1 / 4, 1 / 6], [1 / 6, 1 / 9]])
    torch.testing.assert_close(_half_scale_input(impulse), expected)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_small_map_matmul_is_the_same_convolution(transposed, bias):
    torch.manual_seed(0)
    layer = (nn.ConvTranspose2d if transposed else nn.Conv2d)(6, 5, 4, stride=2, padding=1,
                                                                bias=bias)
    x = torch.randn(2, 6, 4, 8, requires_grad=True)
    expected = layer(x)
    got = conv4s2_as_matmul(x, layer)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    grads_expected = torch.autograd.grad(expected.square().sum(), [x, layer.weight])
    grads_got = torch.autograd.grad(got.square().sum(), [x, layer.weight])
    for a, b in zip(grads_got, grads_expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_generator_same_output_with_and_without_the_matmul_path():
    torch.manual_seed(0)
    g = UNetGenerator(in_channels=2, ngf=8).eval()
    x = torch.randint(0, 2, (1, 2, 256, 256)).float() * 2 - 1
    with torch.no_grad():
        fast = g(x)
        g.set_small_map_matmul(False)
        library = g(x)
    torch.testing.assert_close(fast, library, rtol=1e-4, atol=1e-5)


def test_frozen_blocks_weight_gradients_and_restores_flags_even_on_error():
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    net[1].bias.requires_grad_(False)
    flags = [p.requires_grad for p in net.parameters()]
    assert flags == [True, True, True, False]

    x = torch.ones(4, 2, requires_grad=True)
    with frozen(net) as inside:
        assert inside is net and not any(p.requires_grad for p in net.parameters())
        net(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients still flow to the input
    assert all(p.grad is None for p in net.parameters())
    assert [p.requires_grad for p in net.parameters()] == flags

    with pytest.raises(RuntimeError, match="boom"), frozen(net):
        raise RuntimeError("boom")
    assert [p.requires_grad for p in net.parameters()] == flags


def test_split_pairs_takes_fake_first_then_real():
    d = MultiScaleDiscriminator(in_channels=3, ndf=8, n_scales=2)
    fake, real = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    fake_feats, real_feats = split_pairs(d(torch.cat([fake, real])), 2)
    alone_fake, alone_real = d(fake), d(real)  # InstanceNorm is per sample: same features
    for joint, alone in ((fake_feats, alone_fake), (real_feats, alone_real)):
        for scale_joint, scale_alone in zip(joint, alone):
            assert len(scale_joint) == len(scale_alone)
            for a, b in zip(scale_joint, scale_alone):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert [x.shape for x in patch_logits(fake_feats)] == [f[-1].shape for f in alone_fake]
