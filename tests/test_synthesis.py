"""Whole-slice synthesis: shapes of any size, value range, no seams, dropout, the Volume API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from emsynth.cli import app
from emsynth.data.phantom import generate_volume
from emsynth.data.readers import read_volume
from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.errors import EmsynthError
from emsynth.gan.data import Conditioning
from emsynth.gan.export import export_generator, load_generator
from emsynth.gan.inference import (
    add_pixel_noise,
    padding_for,
    synthesize_array,
    synthesize_volume,
)
from emsynth.gan.networks import UNetGenerator
from emsynth.synthesis.masks import phantom_masks

CONDITIONING = Conditioning((MITO, MEMBRANE))



@pytest.fixture(scope="module")
def generator() -> UNetGenerator:
    torch.manual_seed(0)
    return UNetGenerator(in_channels=2, ngf=8)


@pytest.fixture(scope="module")
def masks_1024() -> np.ndarray:
    volume = generate_volume("vnc", 1, (1024, 1024), seed=0)
    return CONDITIONING.encode_slice(volume, 0)[None]


def _seam_ratios(image: np.ndarray, period: int = 256, phase: int = 32) -> list[float]:
    """Mean |gradient| across the 256-tile borders over that at the same position modulo 32
    elsewhere (the transposed convolutions leave a periodic texture, so compare like with like):
    about 1 without seams."""
    ratios = []
    for axis in (1, 0):
        grad = np.abs(np.diff(image, axis=axis)).mean(axis=1 - axis)
        border = np.arange(period - 1, grad.size, period)
        same_phase = np.setdiff1d(np.arange((period - 1) % phase, grad.size, phase), border)
        ratios.append(float(grad[border].mean() / grad[same_phase].mean()))
    return ratios


def _tiled(generator, masks: np.ndarray) -> np.ndarray:
    out = np.zeros(masks.shape[-2:], np.float32)
    for y in range(0, masks.shape[-2], 256):
        for x in range(0, masks.shape[-1], 256):
            tile = masks[:, :, y:y + 256, x:x + 256]
            out[y:y + 256, x:x + 256] = synthesize_array(generator, tile, dropout=False)[0]
    return out


def test_whole_slice_has_no_seams_unlike_stitched_tiles(generator, masks_1024):
    whole = synthesize_array(generator, masks_1024, dropout=False)[0]
    # A multiple of 256 is not padded: one plain pass of G in eval mode (no dropout).
    generator.eval()
    with torch.no_grad():
        direct = generator(torch.from_numpy(masks_1024))[0, 0].numpy()
    generator.train()
    np.testing.assert_allclose(whole, direct, atol=1e-6)
    assert whole.std() > 0.01
    assert all(0.8 < r < 1.25 for r in _seam_ratios(whole)), _seam_ratios(whole)
    tiled = _tiled(generator, masks_1024)
    # The statistic does see seams: independently processed tiles break it ...
    assert any(not 0.8 < r < 1.25 for r in _seam_ratios(tiled)), _seam_ratios(tiled)
    # ... and the one-pass output is not such a concatenation.
    assert np.abs(whole - tiled).mean() > 0.1 * whole.std()


@pytest.mark.parametrize("shape", [(768, 1024), (1024, 1024), (300, 500)])
def test_volume_shapes_range_and_labels(generator, shape):
    masks = generate_volume("vnc", 2, shape, seed=1)
    out = synthesize_volume(generator, masks, CONDITIONING, dropout=False)
    assert out.shape == masks.shape and out.image.dtype == np.uint8
    assert out.image.std() > 0
    assert out.slice_names == masks.slice_names and out.pixel_size_nm == masks.pixel_size_nm
    for name in (MITO, MEMBRANE):
        assert np.array_equal(out.labels[name], masks.labels[name])
    assert "synthetic" in out.source


def test_padding_is_centred_reflection():
    assert padding_for(256) == (0, 0) and padding_for(768) == (0, 0)
    assert padding_for(300) == (106, 106) and padding_for(1000) == (12, 12)
    assert padding_for(257) == (127, 128)


class _Spy(nn.Module):
    """A stand-in generator: records each input it is given and returns its first channel."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # synthesize_array takes its device
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return x[:, :1] + self.anchor


def test_slices_are_reflect_padded_centred_and_cropped_back():
    """A 253x254 slice whose channels are its column and row numbers: G must see it mirrored
    about the edge pixel (not repeated, not zero) by 1 before and 2 after (rows) and 1 on
    each side (columns), and the output must be cropped back from exactly there."""
    rows, cols = np.meshgrid(np.arange(253), np.arange(254), indexing="ij")
    masks = np.stack([cols, rows]).astype(np.float32)[None]
    spy = _Spy()
    out = synthesize_array(spy, masks, dropout=False)
    (seen,) = spy.seen
    assert seen.shape == (1, 2, 256, 256)
    top_row = np.r_[1, np.arange(254), 252]  # columns: [1] 0 1 ... 253 [252]
    left_column = np.r_[1, np.arange(253), 251, 250]  # rows: [1] 0 1 ... 252 [251 250]
    np.testing.assert_array_equal(seen[0, 0, 0].numpy(), top_row)
    np.testing.assert_array_equal(seen[0, 1, :, 0].numpy(), left_column)
    np.testing.assert_array_equal(out, masks[:, 0])


def test_pads_wider_than_the_slice_reflect_again():
    """40 rows in 256: 108 rows before and after, more than the slice holds, so the reflection
    folds back (period 78 = 2 x 39): row -108 is row 30, row 147 is row 9."""
    rows = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None], (40, 256))
    spy = _Spy()
    out = synthesize_array(spy, np.ascontiguousarray(rows)[None, None], dropout=False)
    column = spy.seen[0][0, 0, :, 0].numpy()
    assert column.shape == (256,)
    np.testing.assert_array_equal(column[:6], [30, 29, 28, 27, 26, 25])
    np.testing.assert_array_equal(column[105:111], [3, 2, 1, 0, 1, 2])  # around row 0
    np.testing.assert_array_equal(column[-6:], [14, 13, 12, 11, 10, 9])
    np.testing.assert_array_equal(out[0], rows)


def test_dropout_flag_and_seed(generator):
    masks = CONDITIONING.encode_slice(generate_volume("vnc", 1, (256, 256), seed=2), 0)[None]
    off = [synthesize_array(generator, masks, dropout=False, seed=s) for s in (0, 1)]
    np.testing.assert_array_equal(off[0], off[1])
    on = [synthesize_array(generator, masks, dropout=True, seed=s) for s in (0, 0, 1)]
    np.testing.assert_array_equal(on[0], on[1])
    assert np.abs(on[0] - on[2]).max() > 1e-4 and np.abs(on[0] - off[0]).max() > 1e-4
    assert generator.training  # modes are put back
    assert all(m.training for m in generator.modules())


def test_pixel_noise_adds_seeded_white_noise_of_its_std(generator):
    """The added noise has the asked std (Immerkaer's estimate reads it back), is fixed by the
    seed, differs between slices and seeds, and 0 leaves the generator's image as it was."""
    from emsynth.gan.quality import estimate_pixel_noise

    flat = np.full((2, 128, 128), 120, np.uint8)
    noisy = add_pixel_noise(flat, 9.0, seed=3)
    assert (noisy.astype(float) - 120).std() == pytest.approx(9.0, rel=0.03)
    assert estimate_pixel_noise(noisy, np.ones(flat.shape, bool)) == pytest.approx(9.0, rel=0.05)
    assert not np.array_equal(noisy[0], noisy[1])
    np.testing.assert_array_equal(noisy, add_pixel_noise(flat, 9.0, seed=3))
    assert not np.array_equal(noisy, add_pixel_noise(flat, 9.0, seed=4))
    np.testing.assert_array_equal(add_pixel_noise(flat, 0.0, seed=3), flat)
    volume = generate_volume("vnc", 1, (256, 256), seed=2)
    clean = synthesize_volume(generator, volume, CONDITIONING, dropout=False).image
    both = synthesize_volume(generator, volume, CONDITIONING, dropout=False, pixel_noise=6.0)
    np.testing.assert_array_equal(both.image, add_pixel_noise(clean, 6.0, seed=0))
    assert "pixel noise 6" in both.source


def test_bf16_close_to_fp32(generator):
    masks = CONDITIONING.encode_slice(generate_volume("vnc", 1, (256, 512), seed=4), 0)[None]
    fp32 = synthesize_array(generator, masks, dropout=False, precision="fp32")
    bf16 = synthesize_array(generator, masks, dropout=False, precision="bf16")
    assert np.abs(fp32 - bf16).mean() < 0.02


def test_missing_label_and_channel_mismatch(generator):
    vol = generate_volume("vnc", 1, (256, 256), seed=0)
    only_mito = Volume(vol.image, {MITO: vol.labels[MITO]}, source="masks-without-membranes")
    with pytest.raises(EmsynthError, match="masks-without-membranes.*no 'membrane' label"):
        synthesize_volume(generator, only_mito)
    with pytest.raises(EmsynthError, match="1 conditioning channels for a generator with 2"):
        synthesize_volume(generator, vol, Conditioning((MITO,)))


def test_export_and_load_round_trip(tmp_path, generator):
    path = export_generator(tmp_path / "g.safetensors", generator, Conditioning((MITO, MEMBRANE),
                                                                               "0,1"))
    loaded, conditioning, meta = load_generator(path)
    assert conditioning == Conditioning((MITO, MEMBRANE), "0,1") and meta["ngf"] == 8
    for key, tensor in generator.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[key])
    with pytest.raises(EmsynthError, match="no generator.safetensors and no checkpoint"):
        load_generator(tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EmsynthError, match="junk.safetensors"):
        load_generator(tmp_path / "junk.safetensors")


def test_phantom_masks_feed_synthesis(generator):
    masks = phantom_masks("vnc", 2, (256, 384), seed=3)
    assert masks.shape == (2, 256, 384) and not masks.image.any()
    assert masks.labels[MITO].any() and masks.labels[MEMBRANE].any()
    out = synthesize_volume(generator, masks, CONDITIONING, dropout=False)
    assert out.image.std() > 0 and np.array_equal(out.labels[MITO], masks.labels[MITO])


def test_phantom_masks_fitted_to_a_mask_set():
    """Fitted to sparse-membrane (ca1-like) masks, vnc masks take on their membrane density."""
    like = generate_volume("ca1", 2, (256, 256), seed=1)
    target = like.labels[MEMBRANE].mean()
    plain = phantom_masks("vnc", 2, (256, 256), seed=0).labels[MEMBRANE].mean()
    fitted = phantom_masks("vnc", 2, (256, 256), seed=0, like=like)
    assert "fitted-to" in fitted.source
    assert abs(fitted.labels[MEMBRANE].mean() - target) < 0.5 * abs(plain - target)


def test_cli_synthesize_from_phantom_masks(tmp_path, generator):
    export_generator(tmp_path / "g.safetensors", generator, CONDITIONING)
    runner = CliRunner()
    base = ["gan", "synthesize", "-m", str(tmp_path / "g.safetensors"), "--device", "cpu"]
    res = runner.invoke(app, [*base, "--phantom", "vnc", "--count", "2", "--size", "256",
                              "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    written = read_volume(tmp_path / "out", "slices")
    assert written.shape == (2, 256, 256) and written.image.std() > 0
    res = runner.invoke(app, [*base, "-o", str(tmp_path / "o2")])
    assert isinstance(res.exception, EmsynthError) and "exactly one mask source" in str(
        res.exception)
    # --pixel-noise: the same images with seeded noise on top; not yet blockwise
    res = runner.invoke(app, [*base, "--phantom", "vnc", "--count", "2", "--size", "256",
                              "--pixel-noise", "8", "-o", str(tmp_path / "noisy")])
    assert res.exit_code == 0, res.output
    noisy = read_volume(tmp_path / "noisy", "slices")
    np.testing.assert_array_equal(noisy.image, add_pixel_noise(written.image, 8.0, seed=0))
    res = runner.invoke(app, [*base, "--phantom", "vnc", "--pixel-noise", "8",
                              "-o", str(tmp_path / "n.ome.zarr")])
    assert isinstance(res.exception, EmsynthError) and "--pixel-noise" in str(res.exception)
