"""bioimage.io export: a tiny trained segmenter (a membrane model, a GAN generator) packaged,
tested by bioimageio.core's own model test with the network cut off, and predicting what
`emsynth segment predict` / `predict_membranes` / `emsynth gan synthesize` give on the same
input."""

from __future__ import annotations

import socket
import zipfile

import numpy as np
import pytest
import tifffile
import torch
from tiny import SEGMENT_TINY, unet_micro
from typer.testing import CliRunner

from emsynth.cli import app
from emsynth.config import load_config
from emsynth.data.phantom import generate_volume
from emsynth.export.modules import ExportedGenerator, ExportedSegmenter, normalize_levels
from emsynth.gan.data import Conditioning
from emsynth.gan.export import GENERATOR_FILE, export_generator, load_generator
from emsynth.gan.inference import synthesize_array, synthesize_volume
from emsynth.gan.networks import build_generator
from emsynth.membranes.normalize import Normalizer, reference_histogram
from emsynth.segment.config import InferConfig, ModelConfig, SegmentConfig
from emsynth.segment.model import Segmenter, build_model

pytest.importorskip("bioimageio.core", reason="the bioimageio extra is not installed "
                    "(pip install -e '.[bioimageio]')")

runner = CliRunner()


@pytest.fixture()
def offline(monkeypatch):
    """No network: any connection attempt fails at once (so a test that needs one fails)."""

    def refuse(self, *args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("BIOIMAGEIO_PERFORM_IO_CHECKS", "false")


@pytest.fixture(scope="module")
def mito_run(tmp_path_factory):
    """A segmenter trained for 20 steps on 4 slices of 128 px phantom CA1 tissue."""
    from emsynth.segment.train import train_segmenter

    run = tmp_path_factory.mktemp("mito") / "run"
    volume = generate_volume("ca1", n_slices=4, shape=(128, 128), seed=0)
    cfg = load_config(SegmentConfig, None, [
        *SEGMENT_TINY, "engine.steps=20", "engine.val_every=0", "engine.log_every=10",
        "engine.image_every=0", "engine.num_threads=1", "data.val_block=1",
    ])
    train_segmenter(cfg, volume, run, resume=False)
    return run


def _predict_with_bioimageio(package, inputs: np.ndarray, input_id: str = "raw",
                             output_id: str = "probability") -> np.ndarray:
    """The output (z, y, x) of a package for uint8 inputs (z, c, y, x), via bioimageio.core
    (default: a segmenter's probabilities)."""
    from bioimageio.core import Tensor, load_model_description, predict

    model = load_model_description(package)
    tensor = Tensor.from_numpy(inputs, dims=("batch", "channel", "y", "x"))
    sample = predict(model=model, inputs={input_id: tensor})
    return np.asarray(sample.members[output_id].data)[:, 0]


def test_mito_package_passes_bioimageio_test_offline_and_matches_segment_predict(
    mito_run, tmp_path, offline
):
    package = tmp_path / "mito.zip"
    result = runner.invoke(app, ["export", "bioimageio", str(mito_run), str(package),
                                 "--tta", "--author", "A. Tester"])
    assert result.exit_code == 0, result.output
    assert "model test: passed" in result.output
    # the same input through `emsynth segment predict` (fp32, TTA) and through bioimageio.core
    stack = generate_volume("ca1", n_slices=2, shape=(96, 136), seed=5).image
    tifffile.imwrite(tmp_path / "in.tif", stack)
    result = runner.invoke(app, ["segment", "predict", str(tmp_path / "in.tif"), "-m",
                                 str(mito_run), "-o", str(tmp_path / "pred"), "--float-prob",
                                 "--tta", "--precision", "fp32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    expected = tifffile.imread(tmp_path / "pred" / "prob.tif")
    got = _predict_with_bioimageio(package, stack[:, None])
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert 0.01 < expected.mean() < 0.99  # not a trivially constant model


def _membrane_model(folder, normalizer: Normalizer) -> Segmenter:
    """An untrained membrane model (random micro U-Net) with `normalizer`, saved in `folder`."""
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(unet_micro())
    seg = Segmenter(net=build_model(cfg, 2).eval(), model=cfg, channel_names=["image", "mito"],
                    target_name="membrane", threshold=0.4,
                    infer=InferConfig(window=64, tta=False),
                    meta={"membranes": {"normalizer": normalizer.as_dict()}})
    seg.save(folder / "model")
    return seg


@pytest.mark.parametrize("method", ["standardize", "histmatch"])
def test_membrane_package_normalises_inside_and_matches_predict_membranes(
    method, tmp_path, offline
):
    from emsynth.export.bioimageio import check_package, export_bioimageio
    from emsynth.membranes.predict import MembraneModel, predict_membranes

    train = generate_volume("vnc", n_slices=2, shape=(96, 96), seed=1).image
    normalizer = Normalizer(method, 128.0, 48.0,
                            reference_histogram(train).tolist() if method == "histmatch" else None)
    _membrane_model(tmp_path / "run", normalizer)
    package = export_bioimageio(tmp_path / "run", tmp_path / "membranes.zip")
    passed, summary = check_package(package)
    assert passed, summary
    volume = generate_volume("ca1", n_slices=2, shape=(80, 112), seed=3)
    model = MembraneModel.load(tmp_path / "run")
    expected = predict_membranes(model, volume, volume.labels["mito"], precision="fp32")
    inputs = np.stack([volume.image, volume.labels["mito"].astype(np.uint8) * 255], axis=1)
    got = _predict_with_bioimageio(package, inputs)
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("method", ["none", "standardize", "histmatch"])
def test_torch_normalisation_equals_numpy(method):
    image = generate_volume("ca1", n_slices=3, shape=(64, 80), seed=2).image
    image[2] = 77  # a constant slice
    ref = reference_histogram(generate_volume("vnc", n_slices=1, shape=(64, 64)).image)
    normalizer = Normalizer(method, 120.0, 40.0, ref.tolist())
    expected = normalizer(image)
    for z in range(len(image)):
        got = normalize_levels(torch.from_numpy(image[z]).float(), normalizer.as_dict())
        assert np.abs(got.numpy() - expected[z]).max() <= 1  # rounding ties may differ by 1


def test_exported_module_rebuilds_from_plain_kwargs():
    kwargs = {"model": unet_micro(), "in_channels": 1, "infer": {"window": 32}, "tta": True}
    module = ExportedSegmenter(**kwargs)
    assert module.tta and not module.training
    out = module(torch.rand(2, 1, 40, 52))
    assert out.shape == (2, 1, 40, 52) and float(out.min()) >= 0 and float(out.max()) <= 1


@pytest.fixture(scope="module")
def gan_runs(tmp_path_factory):
    """Tiny untrained generators saved as `emsynth gan train` saves them: the spec U-Net with
    decoder noise (and dropout), and SPADE without noise."""
    root = tmp_path_factory.mktemp("gan")
    runs = {}
    for arch, noise in (("unet", 0.1), ("spade", 0.0)):
        torch.manual_seed(0)
        (root / arch).mkdir()
        export_generator(root / arch / GENERATOR_FILE, build_generator(arch, 2, 8, noise),
                         Conditioning(("mito", "membrane"), "-1,1"))
        runs[arch] = root / arch
    return runs


GAN_CITATIONS = {"unet": {"10.1109/CVPR.2017.632", "10.1109/WACV.2018.00080"},  # + Han (noise)
                 "spade": {"10.1109/CVPR.2017.632", "10.1109/CVPR.2019.00244"}}  # + SPADE


@pytest.mark.parametrize("arch", ["unet", "spade"])
def test_generator_package_passes_bioimageio_test_offline_and_matches_gan_synthesize(
    arch, gan_runs, tmp_path, offline
):
    from bioimageio.core import load_model_description

    package = tmp_path / "generator.zip"
    result = runner.invoke(app, ["export", "bioimageio", str(gan_runs[arch]), str(package),
                                 "--seed", "3", "--license", "CC-BY-4.0"])
    assert result.exit_code == 0, result.output
    assert "model test: passed" in result.output
    descr = load_model_description(package)
    assert {str(c.doi) for c in descr.cite} == GAN_CITATIONS[arch]
    assert str(descr.license) == "CC-BY-4.0" and len(descr.covers) == 1
    assert [str(n) for n in descr.inputs[0].axes[1].channel_names] == ["mito", "membrane"]
    assert descr.weights.pytorch_state_dict.architecture.kwargs["seed"] == 3
    with zipfile.ZipFile(package) as z:
        readme = z.read("README.md").decode()
    assert ("seeded with 3 at every call" in readme) == (arch == "unet")  # dropout + noise
    assert ("no random parts" in readme) == (arch == "spade")

    # phantom masks of a size the generator pads (96 x 136 -> 256 x 256), as 0/255 and as 0/1
    volume = generate_volume("ca1", n_slices=2, shape=(96, 136), seed=4)
    masks01 = np.stack([volume.labels["mito"], volume.labels["membrane"]], axis=1)
    got = _predict_with_bioimageio(package, masks01.astype(np.uint8) * 255, "masks", "image")
    got01 = _predict_with_bioimageio(package, masks01.astype(np.uint8), "masks", "image")
    np.testing.assert_array_equal(got, got01)

    generator, conditioning, _ = load_generator(gan_runs[arch])
    encoded = np.stack([conditioning.encode_slice(volume, z) for z in range(len(volume))])
    expected = (synthesize_array(generator, encoded, dropout=True, seed=3) + 1.0) / 2.0
    assert got.shape == expected.shape == (2, 96, 136)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.std() > 1e-3  # not a constant image
    # and `emsynth gan synthesize`'s uint8 slices are round(255 x output)
    images = synthesize_volume(generator, volume, conditioning, dropout=True, seed=3).image
    assert np.abs(np.rint(got * 255.0) - images).max() <= 1
    if arch == "unet":  # dropout + decoder noise: the package fixed seed 3, another seed differs
        other = (synthesize_array(generator, encoded, dropout=True, seed=4) + 1.0) / 2.0
        assert np.abs(got - other).max() > 1e-3


def test_exported_generator_rebuilds_from_plain_kwargs_and_is_deterministic():
    kwargs = {"arch": "unet", "in_channels": 2, "ngf": 8, "channels": ["mito", "membrane"],
              "mask_range": "0,1", "decoder_noise": 0.2, "dropout": True, "seed": 5}
    module = ExportedGenerator(**kwargs)
    assert not module.training
    masks = (torch.rand(2, 2, 40, 52) > 0.7).float()
    out = module(masks)
    assert out.shape == (2, 1, 40, 52) and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(out, module(masks * 255.0))  # the same call, the same noise
    expected = synthesize_array(module.net, masks.numpy(), dropout=True, seed=5)
    np.testing.assert_allclose(out[:, 0].numpy(), (expected + 1) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="3 conditioning channels for 2 inputs"):
        ExportedGenerator(**{**kwargs, "channels": ["mito", "membrane", "synapse"]})


def test_model_options_of_the_other_kind_are_one_line_errors(gan_runs, tmp_path):
    result = runner.invoke(app, ["export", "bioimageio", str(gan_runs["unet"]),
                                 str(tmp_path / "g.zip"), "--no-tta"])
    assert result.exit_code != 0 and not (tmp_path / "g.zip").exists()
    assert "--tta/--no-tta is for segmenters" in str(result.exception)
    _membrane_model(tmp_path / "run", Normalizer("standardize"))
    result = runner.invoke(app, ["export", "bioimageio", str(tmp_path / "run"),
                                 str(tmp_path / "m.zip"), "--seed", "2"])
    assert result.exit_code != 0
    assert "--dropout and --seed are for GAN generators" in str(result.exception)


def test_export_of_a_folder_without_a_model_is_a_one_line_error(tmp_path):
    result = runner.invoke(app, ["export", "bioimageio", str(tmp_path), str(tmp_path / "x.zip")])
    assert result.exit_code != 0
    assert "no trained segmenter" in str(result.exception)
