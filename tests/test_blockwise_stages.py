"""Blockwise membranes prediction and tiled GAN synthesis into OME-Zarr: equal to the in-memory
result, resumable after an interrupted run, and two shards together equal one run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

zarr = pytest.importorskip("zarr", minversion="3")

from typer.testing import CliRunner

from emsynth.cli import app
from emsynth.data.blocks import DONE_DIR
from emsynth.data.omezarr import open_ome_zarr, write_volume
from emsynth.data.phantom.generate import generate_volume
from emsynth.data.volume import MEMBRANE, MITO
from emsynth.errors import EmsynthError
from emsynth.gan.data import Conditioning
from emsynth.gan.export import export_generator
from emsynth.gan.inference import Tiling, synthesize_to_ome_zarr, synthesize_volume, tile_seed
from emsynth.gan.networks import build_generator
from emsynth.membranes.normalize import Normalizer, reference_histogram
from emsynth.membranes.predict import (
    MembraneInputs,
    normalization_luts,
    predict_membranes_to_ome_zarr,
)
from emsynth.segment.blockwise import BlockwiseModel, predict_array
from emsynth.segment.config import InferConfig, ModelConfig
from emsynth.segment.infer import probability_to_uint8
from emsynth.segment.model import Segmenter, build_model

TINY = ModelConfig(channels=[4, 8, 16], strides=[2, 2], num_res_units=1)
CONDITIONING = Conditioning((MITO, MEMBRANE))


class Interrupt(Exception):
    """Stands in for a kill: raised by the progress bar after a few blocks."""


def _interrupt_after(blocks: int):
    import contextlib

    @contextlib.contextmanager
    def factory(total: int):
        seen = []

        def advance(n: int) -> None:
            seen.append(n)
            if len(seen) == blocks:
                raise Interrupt

        yield advance

    return factory


def _read(path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    out = open_ome_zarr(path)
    return out.array[:, :, :], {k: out.label(k).array[:, :, :] for k in out.labels}


# --- membranes ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def volume():
    return generate_volume("ca1", 2, (150, 130), 2)


def _save_membrane_model(folder, normalizer: Normalizer) -> Segmenter:
    torch.manual_seed(2)
    seg = Segmenter(build_model(TINY, 2).eval(), TINY, ["image", "mito"], MEMBRANE, 0.5,
                    InferConfig(window=64, tta=False),
                    meta={"membranes": {"normalizer": normalizer.as_dict()}})
    seg.save(folder / "model")
    return seg


@pytest.mark.parametrize("mito_from", ["labels", "model"])
def test_membranes_blockwise_equals_in_memory_and_resumes(tmp_path, volume, mito_from):
    normalizer = Normalizer("histmatch", reference=reference_histogram(
        generate_volume("vnc", 1, (64, 64), 0).image).tolist())
    net = _save_membrane_model(tmp_path, normalizer).net
    model = BlockwiseModel(net, (64, 64), 0.25)
    luts = normalization_luts(normalizer, volume.image)
    if mito_from == "labels":
        inputs = MembraneInputs(volume.image, luts, volume.labels[MITO])
        mito = volume.labels[MITO]
    else:
        torch.manual_seed(1)
        mito_model = BlockwiseModel(build_model(TINY, 1).eval(), (64, 64), 0.25)
        threshold = float(np.median(predict_array(mito_model, volume.image)))
        inputs = MembraneInputs(volume.image, luts, None, mito_model, threshold)
        mito = predict_array(mito_model, volume.image) >= threshold
        assert 0.2 < mito.mean() < 0.8
    # the in-memory reference: the whole volume in one block, image normalised whole
    normalised = MembraneInputs(normalizer(volume.image), None, mito.astype(np.uint8))
    reference = predict_array(model, normalised)
    np.testing.assert_array_equal(inputs[:, :, :, :], normalised[:, :, :, :])

    kw = {"threshold": 0.5, "block": (1, 64, 48), "scale_nm": (5.0, 5.0, 5.0)}
    out = tmp_path / "m.ome.zarr"
    with pytest.raises(Interrupt):
        predict_membranes_to_ome_zarr(model, inputs, out, progress_factory=_interrupt_after(4),
                                      **kw)
    resumed = predict_membranes_to_ome_zarr(model, inputs, out, **kw)
    assert resumed["skipped"] == 4 and resumed["predicted"] == 18 - 4 and resumed["complete"]
    image, labels = _read(out)
    np.testing.assert_array_equal(image, probability_to_uint8(reference))
    np.testing.assert_array_equal(labels[MEMBRANE], reference >= 0.5)
    np.testing.assert_array_equal(labels[MITO], mito)


def test_membranes_cli_shards_equal_one_run_and_refuse_whole_slice_options(tmp_path, volume):
    _save_membrane_model(tmp_path / "run", Normalizer("standardize"))
    src = write_volume(volume, tmp_path / "in.ome.zarr")
    base = ["membranes", "predict", "-m", str(tmp_path / "run"), "-d", str(src), "--block",
            "1,64,64", "--device", "cpu", "--precision", "fp32"]
    runner = CliRunner()
    one = runner.invoke(app, [*base, "-o", str(tmp_path / "one.ome.zarr")])
    assert one.exit_code == 0, one.output
    assert "18 blocks predicted, 0 already done" in " ".join(one.output.split())
    for shard in (0, 1):
        res = runner.invoke(app, [*base, "-o", str(tmp_path / "two.ome.zarr"), "--shard-id",
                                  str(shard), "--num-shards", "2"])
        assert res.exit_code == 0, res.output
    assert "complete" in res.output
    a, b = _read(tmp_path / "one.ome.zarr"), _read(tmp_path / "two.ome.zarr")
    np.testing.assert_array_equal(a[0], b[0])
    assert sorted(a[1]) == [MEMBRANE, MITO]
    for name in a[1]:
        np.testing.assert_array_equal(a[1][name], b[1][name])
    np.testing.assert_array_equal(a[1][MITO], volume.labels[MITO])
    bad = runner.invoke(app, [*base, "-o", str(tmp_path / "t.ome.zarr"), "--thin-width", "3"])
    assert isinstance(bad.exception, EmsynthError) and "--thin-width" in str(bad.exception)


# --- tiled GAN synthesis --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def masks():
    return generate_volume("vnc", 1, (260, 300), 4)


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    return build_generator("unet", 2, 8, noise=0.5)  # decoder noise on: seeding matters


@pytest.fixture(scope="module")
def tiled(generator, masks):
    """In memory, tiles of 256 (4 per slice), dropout and decoder noise on."""
    return synthesize_volume(generator, masks, CONDITIONING, dropout=True, seed=3,
                             precision="fp32", tiling=Tiling(256)).image


def test_tile_seeds_depend_on_the_global_position_only():
    assert tile_seed(3, 0, 1, 2) == tile_seed(3, 0, 1, 2)
    assert len({tile_seed(3, 0, 1, 2), tile_seed(3, 0, 2, 1), tile_seed(4, 0, 1, 2),
                tile_seed(3, 1, 1, 2)}) == 4


def test_tiled_synthesis_blockwise_equals_in_memory_and_resumes(tmp_path, generator, masks,
                                                                tiled):
    other_seed = synthesize_volume(generator, masks, CONDITIONING, seed=4, precision="fp32",
                                   tiling=Tiling(256)).image
    assert np.abs(other_seed.astype(int) - tiled).mean() > 1  # the noise is seeded, and used
    arrays = {c: masks.labels[c] for c in CONDITIONING.channels}
    kw = {"shape": masks.shape, "block": (1, 160, 160), "dropout": True, "seed": 3,
          "device": "cpu", "precision": "fp32"}
    out = tmp_path / "s.ome.zarr"
    with pytest.raises(Interrupt):
        synthesize_to_ome_zarr(generator, arrays, out, CONDITIONING, Tiling(256),
                               progress_factory=_interrupt_after(2), **kw)
    assert len(list((out / DONE_DIR).glob("*.done"))) == 2
    resumed = synthesize_to_ome_zarr(generator, arrays, out, CONDITIONING, Tiling(256), **kw)
    assert resumed["skipped"] == 2 and resumed["predicted"] == 2 and resumed["complete"]
    image, labels = _read(out)
    np.testing.assert_array_equal(image, tiled)
    for c in CONDITIONING.channels:
        np.testing.assert_array_equal(labels[c], masks.labels[c])
    with pytest.raises(EmsynthError, match="differs in: seed"):
        synthesize_to_ome_zarr(generator, arrays, out, CONDITIONING, Tiling(256),
                               **{**kw, "seed": 4})


def test_gan_cli_shards_from_ome_zarr_masks_equal_in_memory(tmp_path, generator, masks, tiled):
    export_generator(tmp_path / "g.safetensors", generator, CONDITIONING)
    src = write_volume(masks, tmp_path / "masks.ome.zarr")
    base = ["gan", "synthesize", "-m", str(tmp_path / "g.safetensors"), "--masks", str(src),
            "-o", str(tmp_path / "s.ome.zarr"), "--block", "1,160,160", "--tile", "256",
            "--seed", "3", "--device", "cpu", "--precision", "fp32", "--num-shards", "2"]
    runner = CliRunner()
    for shard in (0, 1):
        res = runner.invoke(app, [*base, "--shard-id", str(shard)])
        assert res.exit_code == 0, res.output
    assert "2 blocks synthesized" in " ".join(res.output.split()) and "complete" in res.output
    image, labels = _read(tmp_path / "s.ome.zarr")
    np.testing.assert_array_equal(image, tiled)
    np.testing.assert_array_equal(labels[MEMBRANE], masks.labels[MEMBRANE])
    bad = runner.invoke(app, [*base[:-2], "--whole-slice", "-o", str(tmp_path / "w.ome.zarr")])
    assert isinstance(bad.exception, EmsynthError) and "--whole-slice" in str(bad.exception)
