"""pix2pix networks: the U-Net generator and the three-scale 70x70 PatchGAN discriminator.

Generator (Isola et al. 2017, appendix 6.1): encoder C64-C128-C256-C512-C512-C512-C512-C512,
decoder CD512-CD1024-CD1024-C1024-C1024-C512-C256-C128, where the decoder widths are the input
widths of each transposed convolution (its own features concatenated with the encoder skip).
All convolutions are 4x4 with stride 2, so 8 levels take a 256 input to a 1x1 bottleneck and
any input side must be a multiple of 256. Following the paper's notation, dropout 0.5 sits in
the first three decoder blocks (the reference code puts it in blocks 2-4; the difference is one
block at 2x2 resolution). Normalisation is InstanceNorm without affine parameters, absent on
the first encoder layer and on the innermost one (1x1 at 256 input, where it would zero the
features), as in the pix2pix code.

SPADE generator (`model.arch: spade`): see `SPADEGenerator`. Both generators can add Gaussian
noise to every decoder block's output (`DecoderNoise`, off by default). The U-Net's decoder can
upsample by nearest-neighbour (`model.upsample: resize`) or bilinear (`bilinear`) resizing and
a 3x3 convolution instead of the transposed convolution (Odena, Dumoulin & Olah 2016: a 4x4
stride-2 transposed convolution's uneven kernel overlap draws checkerboard patterns), a
departure from the paper that is off by default. Nearest resizing still renders every coarse
feature pixel as a block on a fixed grid, so a generator that varies its coarse features draws
a lattice with the period of that grid (visible inside CA1 mitochondria,
docs/gan_ca1_upsampling.png); bilinear resizing has no block edges.

Discriminator: three PatchGANs C64-C128-C256-C512 (pix2pix n_layers=3, receptive field 70x70)
that see the concatenated (masks, image) at full, 1/2 and 1/4 resolution, obtained by average
pooling (the pix2pixHD multi-scale design). MONAI's `PatchDiscriminator` has exactly that layer
layout (4x4 kernels, strides 2-2-2-1-1, no norm on the first layer) and returns every
intermediate feature map, which feature matching needs.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from monai.networks.nets import PatchDiscriminator
from torch import nn

from emsynth.errors import EmsynthError

#: Encoder widths in units of ngf (C64-C128-C256-C512-C512-C512-C512-C512 at ngf=64).
ENCODER_MULTIPLIERS = (1, 2, 4, 8, 8, 8, 8, 8)
#: Decoder transposed-convolution input widths in units of ngf (CD512-...-C128 at ngf=64).
DECODER_INPUT_MULTIPLIERS = (8, 16, 16, 16, 16, 8, 4, 2)
#: How many decoder blocks (from the innermost) carry dropout: the three CD blocks.
DROPOUT_BLOCKS = 3
#: The generator's input side must be a multiple of this (2 ** number of stride-2 levels).
SIDE_MULTIPLE = 2 ** len(ENCODER_MULTIPLIERS)
#: How the U-Net's decoder doubles the resolution: the spec's 4x4 stride-2 transposed
#: convolution, or a nearest-neighbour or bilinear 2x resize followed by a 3x3 convolution.
UPSAMPLERS = ("transpose", "resize", "bilinear")


#: On CPU, convolutions whose input map has at most this many pixels (16x16) run as one
#: explicit matrix product (see `conv4s2_as_matmul`); at 32x32 the library kernel wins.
SMALL_MAP_PIXELS = 256


def conv4s2_as_matmul(x: torch.Tensor, conv: nn.Conv2d | nn.ConvTranspose2d) -> torch.Tensor:
    """`conv(x)` for a 4x4, stride-2, padding-1 (transposed) convolution as im2col/col2im and
    one matrix product: the same operation and parameters, another kernel.

    Why: the inner U-Net levels (16x16 maps and below) hold the largest weights (up to
    1024x512x4x4) but little arithmetic, and on CPU oneDNN re-lays out the whole weight on
    every call, forward and backward: at ngf 64 the layers on maps of 8x8 and below took
    about 30% of a training step. A matrix product reads the weight as it is.
    """
    n, c_in, h, w = x.shape
    weight = conv.weight
    if isinstance(conv, nn.ConvTranspose2d):  # weight (c_in, c_out, 4, 4)
        # x^T W, not W^T x: a transposed weight view would make autocast's bf16 copy (and the
        # gradient's) strided and several times slower.
        cols = x.reshape(n, c_in, h * w).transpose(1, 2) @ weight.reshape(c_in, -1)
        out = F.fold(cols.transpose(1, 2), (2 * h, 2 * w), 4, padding=1, stride=2)
    else:  # weight (c_out, c_in, 4, 4)
        cols = F.unfold(x, 4, padding=1, stride=2)
        out = (weight.reshape(weight.shape[0], -1) @ cols).reshape(n, -1, h // 2, w // 2)
    if conv.bias is not None:
        out = out + conv.bias.reshape(1, -1, 1, 1).to(out.dtype)
    return out


class _Block(nn.Module):
    """What encoder and decoder blocks share: the choice of convolution kernel."""

    conv: nn.Conv2d | nn.ConvTranspose2d
    #: Set False to always use the library convolution (the benchmark's textbook reference).
    small_map_matmul = True

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        small = x.device.type == "cpu" and x.shape[-2] * x.shape[-1] <= SMALL_MAP_PIXELS
        return conv4s2_as_matmul(x, self.conv) if small and self.small_map_matmul else self.conv(x)


class _Down(_Block):
    """Encoder block: [LeakyReLU 0.2] -> 4x4 stride-2 conv -> [InstanceNorm]."""

    def __init__(self, c_in: int, c_out: int, *, act: bool, norm: bool) -> None:
        super().__init__()
        self.act = nn.LeakyReLU(0.2) if act else nn.Identity()
        # A bias in front of an affine-free InstanceNorm is cancelled by it: leave it out.
        self.conv = nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=not norm)
        self.norm = nn.InstanceNorm2d(c_out) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self._convolve(self.act(x)))


class DecoderNoise(nn.Module):
    """Adds N(0, sigma^2) to its input, in training and at inference alike (Han et al. 2018:
    pix2pix's U-Net ignores input noise, noise on every decoder block is not ignored). Draws
    from torch's global generator, so a seed fixes it; sigma 0 is the identity and draws
    nothing."""

    def __init__(self, sigma: float = 0.0) -> None:
        super().__init__()
        self.sigma = float(sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sigma <= 0:
            return x
        return x + self.sigma * torch.randn_like(x)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"


class _Up(_Block):
    """Decoder block: ReLU -> 4x4 stride-2 transposed conv (or 2x resize and 3x3 conv)
    -> [InstanceNorm] -> [Dropout 0.5] -> [+ Gaussian noise]."""

    def __init__(self, c_in: int, c_out: int, *, norm: bool, dropout: bool,
                 noise: float = 0.0, upsample: str = "transpose") -> None:
        super().__init__()
        if upsample not in UPSAMPLERS:
            raise ValueError(f"unknown upsample {upsample!r}; use {', '.join(UPSAMPLERS)}")
        # F.interpolate's mode, None for the transposed convolution
        self.resize_mode = {"resize": "nearest", "bilinear": "bilinear"}.get(upsample)
        self.act = nn.ReLU()
        if self.resize_mode:
            self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=not norm)
        else:
            self.conv = nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=not norm)
        self.norm = nn.InstanceNorm2d(c_out) if norm else nn.Identity()
        self.dropout = nn.Dropout(0.5) if dropout else nn.Identity()
        self.noise = DecoderNoise(noise)

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize_mode:
            return self.conv(F.interpolate(x, scale_factor=2, mode=self.resize_mode))
        return super()._convolve(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.noise(self.dropout(self.norm(self._convolve(self.act(x)))))


class _Generator(nn.Module):
    """What every generator shares: masks in, one image out, its width and decoder noise."""

    arch = ""

    def __init__(self, in_channels: int, ngf: int, noise: float) -> None:
        super().__init__()
        if in_channels < 1 or ngf < 1:
            raise ValueError(f"in_channels and ngf must be >= 1, got {in_channels}, {ngf}")
        self.in_channels = in_channels
        self.ngf = ngf
        self.noise = float(noise)


class UNetGenerator(_Generator):
    """Masks (N, in_channels, H, W) in [-1, 1] or [0, 1] -> EM image (N, 1, H, W) in [-1, 1].

    Fully convolutional: any H, W that are multiples of 256 work in one pass (whole slices).
    """

    arch = "unet"

    def __init__(self, in_channels: int = 2, out_channels: int = 1, ngf: int = 64,
                 noise: float = 0.0, upsample: str = "transpose") -> None:
        super().__init__(in_channels, ngf, noise)
        self.upsample = upsample
        enc_widths = [m * ngf for m in ENCODER_MULTIPLIERS]
        n = len(enc_widths)
        self.down = nn.ModuleList()
        c_prev = in_channels
        for i, c in enumerate(enc_widths):
            outermost, innermost = i == 0, i == n - 1
            self.down.append(_Down(c_prev, c, act=not outermost, norm=not (outermost or innermost)))
            c_prev = c
        # Decoder block j mirrors encoder level n-1-j and outputs that level's skip width,
        # except the last, which outputs the image.
        dec_in = [m * ngf for m in DECODER_INPUT_MULTIPLIERS]
        dec_out = [enc_widths[n - 2 - j] for j in range(n - 1)] + [out_channels]
        # Noise on every decoder block's output but the image's (that one is the tanh input).
        self.up = nn.ModuleList(
            _Up(ci, co, norm=j < n - 1, dropout=j < DROPOUT_BLOCKS,
                noise=noise if j < n - 1 else 0.0, upsample=upsample)
            for j, (ci, co) in enumerate(zip(dec_in, dec_out))
        )
        self.out_act = nn.Tanh()
        self.apply(_pix2pix_init)

    def set_small_map_matmul(self, enabled: bool) -> None:
        """Run small CPU maps as a matmul (default) or always through the library kernel."""
        for block in [*self.down, *self.up]:
            block.small_map_matmul = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_side(x.shape[-2:])
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck is the decoder's input, not a skip
        x = self.up[0](x)
        for block in self.up[1:]:
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.out_act(x)


class SPADE(nn.Module):
    """Spatially-adaptive normalisation (Park et al. 2019): affine-free InstanceNorm, then a
    per-pixel scale and shift computed from the masks (resized to the features, nearest)."""

    def __init__(self, channels: int, label_channels: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(label_channels, hidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        masks = F.interpolate(masks, size=x.shape[-2:], mode="nearest")
        h = self.shared(masks)
        return self.norm(x) * (1 + self.gamma(h)) + self.beta(h)


class SPADEResBlock(nn.Module):
    """SPADE ResNet block: [SPADE, LeakyReLU 0.2, 3x3 conv] x 2, plus a (learned) shortcut."""

    def __init__(self, c_in: int, c_out: int, label_channels: int, hidden: int) -> None:
        super().__init__()
        middle = min(c_in, c_out)
        self.norm_0 = SPADE(c_in, label_channels, hidden)
        self.conv_0 = nn.Conv2d(c_in, middle, 3, padding=1)
        self.norm_1 = SPADE(middle, label_channels, hidden)
        self.conv_1 = nn.Conv2d(middle, c_out, 3, padding=1)
        self.learned_shortcut = c_in != c_out
        if self.learned_shortcut:
            self.norm_s = SPADE(c_in, label_channels, hidden)
            self.conv_s = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, masks)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, masks), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, masks), 0.2))
        return shortcut + dx


#: SPADE generator block widths in units of ngf, from the coarsest level (side / 32) up.
SPADE_MULTIPLIERS = (8, 8, 8, 4, 2, 1)


class SPADEGenerator(_Generator):
    """Masks (N, in_channels, H, W) -> EM image (N, 1, H, W) in [-1, 1], SPADE-style.

    The masks, resized to 1/32, go through a 3x3 conv; then five SPADE ResNet blocks, each
    followed by [decoder noise] and a 2x nearest upsampling, bring the features back to full
    size, every block modulated by the masks at its own resolution; LeakyReLU, 3x3 conv, tanh.
    No encoder, no skips: all spatial detail comes through the masks' modulation, and
    stochastic texture through the decoder noise. Fully convolutional like the U-Net, and fed
    the same way (sides multiples of 256 at synthesis; inference pads).
    """

    arch = "spade"

    def __init__(self, in_channels: int = 2, out_channels: int = 1, ngf: int = 64,
                 noise: float = 0.0, upsample: str = "resize") -> None:
        super().__init__(in_channels, ngf, noise)
        # SPADE always resizes; `upsample` is taken so that every generator is built alike.
        self.upsample = "resize"
        hidden = min(128, 2 * ngf)
        widths = [m * ngf for m in SPADE_MULTIPLIERS]
        self.levels = len(widths) - 1
        self.head = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            SPADEResBlock(c_in, c_out, in_channels, hidden)
            for c_in, c_out in itertools.pairwise(widths)
        )
        self.noises = nn.ModuleList(DecoderNoise(noise) for _ in self.blocks)
        self.to_image = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        self.out_act = nn.Tanh()
        self.apply(_pix2pix_init)

    def set_small_map_matmul(self, enabled: bool) -> None:
        """No 4x4 stride-2 convolutions here: nothing to switch (the U-Net's interface)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_side(x.shape[-2:])
        masks = x
        h, w = x.shape[-2:]
        scale = 2 ** self.levels
        y = self.head(F.interpolate(masks, size=(h // scale, w // scale), mode="nearest"))
        for block, noise in zip(self.blocks, self.noises):
            y = F.interpolate(noise(block(y, masks)), scale_factor=2, mode="nearest")
        return self.out_act(self.to_image(F.leaky_relu(y, 0.2)))


#: Generator classes by `model.arch`.
GENERATORS: dict[str, type[nn.Module]] = {"unet": UNetGenerator, "spade": SPADEGenerator}


def build_generator(arch: str, in_channels: int, ngf: int, noise: float = 0.0,
                    upsample: str = "transpose") -> nn.Module:
    """The generator of `model.arch` (unet = the spec), 1 output channel; `upsample` is the
    U-Net decoder's (SPADE always resizes)."""
    try:
        cls = GENERATORS[arch]
    except KeyError:
        raise ValueError(f"unknown generator arch {arch!r}; use {', '.join(GENERATORS)}") from None
    return cls(in_channels, 1, ngf, noise=noise, upsample=upsample)


def check_side(hw: tuple[int, ...] | torch.Size) -> None:
    """Raise a user error unless both sides are positive multiples of 256."""
    if any(s < SIDE_MULTIPLE or s % SIDE_MULTIPLE for s in hw):
        raise EmsynthError(
            f"generator input is {tuple(hw)} pixels; both sides must be multiples of "
            f"{SIDE_MULTIPLE} (8 stride-2 levels). Fix: crop or pad to a multiple of "
            f"{SIDE_MULTIPLE} (emsynth.synthesis pads whole slices for you)"
        )


class MultiScaleDiscriminator(nn.Module):
    """Three 70x70 PatchGANs on (masks, image) at full, 1/2 and 1/4 resolution.

    forward returns, per scale, the list of feature maps of that PatchGAN (last = logits map).
    norm: InstanceNorm (pix2pixHD; batch 1 makes BatchNorm moot); None only to expose the
    convolutions' receptive field in tests (a norm couples every pixel through its statistics).
    """

    def __init__(self, in_channels: int, ndf: int = 64, n_scales: int = 3,
                 norm: str | None = "INSTANCE", *, downsample: bool = True,
                 spectral_norm: bool = False) -> None:
        super().__init__()
        self.downsample = downsample
        self.scales = nn.ModuleList(
            PatchDiscriminator(
                spatial_dims=2,
                channels=ndf,
                in_channels=in_channels,
                num_layers_d=3,
                kernel_size=4,
                norm=norm,
            )
            for _ in range(n_scales)
        )
        if spectral_norm:
            convs = [m for m in self.modules() if isinstance(m, nn.Conv2d)]
            for conv in convs:
                nn.utils.parametrizations.spectral_norm(conv)

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        feats = []
        for i, disc in enumerate(self.scales):
            if i and self.downsample:
                # pix2pixHD's downsampler: 3x3 average pool, stride 2, borders not counted.
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            feats.append(disc(x))
        return feats


Features = list[list[torch.Tensor]]  # per scale, the feature maps of one PatchGAN


def split_pairs(feats: Features, n: int) -> tuple[Features, Features]:
    """D's features on a batch of 2n pairs, fake then real, as (fake part, real part)."""
    return [[x[:n] for x in scale] for scale in feats], [[x[n:] for x in scale] for scale in feats]


def patch_logits(feats: Features) -> list[torch.Tensor]:
    """The logits map of each scale (its last feature map)."""
    return [scale[-1] for scale in feats]


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `module`'s parameters get no gradients (autograd still flows through
    it to its inputs); afterwards each parameter's `requires_grad` is what it was, even if the
    block raised."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for param, flag in zip(module.parameters(), flags):
            param.requires_grad_(flag)


def _pix2pix_init(m: nn.Module) -> None:
    """N(0, 0.02) weights and zero biases for convolutions, as in pix2pix."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
