"""Package a trained model for the BioImage Model Zoo: a segmenter (mitochondria or
membranes) or a GAN generator (masks -> synthetic EM).

`export_bioimageio(run_dir, out_zip)` writes a bioimage.io v0.5 model package (a zip holding
rdf.yaml, the weights, a test input/output pair, a cover image and a README) that
`bioimageio.core` loads and tests. The weights are a `pytorch_state_dict` whose architecture
is `emsynth.export.modules.ExportedSegmenter` / `ExportedGenerator` (so loading it needs
emsynth installed): the network plus emsynth's own inference, so the package predicts what
`emsynth segment predict` (`emsynth membranes predict`, `emsynth gan synthesize`) gives on the
same input.

Segmenter: input `raw`, uint8 (batch, channel, y, x) with the model's input channels ("image",
plus "mito" 0/255 for the membrane model); preprocessing: float32, then x / 255 (the scale of
`emsynth.segment.model.to_float`); output `probability` (batch, 1, y, x), 0-1.
Generator: input `masks`, uint8 (batch, channel, y, x), one channel per conditioning label in
the generator's order, 0 = background and 255 = the label (any value > 0 counts, so 0/1 masks
work too); output `image` (batch, 1, y, x), float32 0-1 (x 255 = the grey levels of `emsynth
gan synthesize --precision fp32`). Dropout and decoder noise are re-seeded with a fixed seed at
every call: the package is deterministic (see `ExportedGenerator`).
Needs the `bioimageio` extra: `pip install -e '.[bioimageio]'`.
"""

from __future__ import annotations

import datetime
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from emsynth import __version__
from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.engine.checkpoint import unwrap
from emsynth.errors import EmsynthError, input_error
from emsynth.gan.data import Conditioning
from emsynth.gan.export import GENERATOR_FILE, load_generator
from emsynth.segment.model import WEIGHTS, Segmenter, model_folder, to_float

#: Citations every exported segmenter carries (the network and the library it comes from).
CITATIONS = (
    (("Ronneberger, Fischer and Brox (2015): U-Net: Convolutional Networks for Biomedical "
      "Image Segmentation. MICCAI."), "10.1007/978-3-319-24574-4_28"),
    ("Cardoso et al. (2022): MONAI: An open-source framework for deep learning in healthcare.",
     "10.48550/arXiv.2211.02701"),
)
#: Citations of an exported generator: pix2pix always; Han et al. when it has decoder noise
#: (their idea); SPADE for `model.arch: spade`.
PIX2PIX = (("Isola, Zhu, Zhou and Efros (2017): Image-to-Image Translation with Conditional "
            "Adversarial Networks. CVPR."), "10.1109/CVPR.2017.632")
HAN2018 = (("Han, Murphy and Ramanan (2018): Learning Generative Models of Tissue Organization "
            "with Supervised GANs. WACV."), "10.1109/WACV.2018.00080")
SPADE = (("Park, Liu, Wang and Zhu (2019): Semantic Image Synthesis with Spatially-Adaptive "
          "Normalization. CVPR."), "10.1109/CVPR.2019.00244")
INPUT_ID = "raw"
OUTPUT_ID = "probability"
GENERATOR_INPUT_ID = "masks"
GENERATOR_OUTPUT_ID = "image"
#: The smallest slice side a generator package declares (any side works; smaller is no tissue).
GENERATOR_MIN_SIDE = 32
#: Cover colours of the conditioning labels (others: white).
MASK_COLOURS = {MITO: (255, 0, 255), MEMBRANE: (0, 200, 255), "synapse": (255, 200, 0)}


@dataclass
class ExportInfo:
    """What goes into the description beyond the model itself."""

    name: str | None = None
    authors: list[str] = field(default_factory=lambda: ["emsynth"])
    license: str = "MIT"
    description: str | None = None
    tta: bool | None = None  # segmenters; None = the model's saved default
    dropout: bool | None = None  # generators; None = on (pix2pix at test time)
    seed: int | None = None  # generators: the seed of dropout and decoder noise; None = 0
    git_repo: str | None = None


@dataclass
class _Parts:
    """What a package holds, whichever model it is: the module and its test pair, the texts,
    and the two tensors' descriptions (the input scaled by `scale` before the module)."""

    module: torch.nn.Module
    callable: str
    kwargs: dict
    test_in: np.ndarray  # uint8 (b, c, y, x)
    test_out: np.ndarray  # float32 (b, 1, y, x)
    cover: np.ndarray  # RGB uint8
    readme: str
    sidecar: dict
    input_id: str
    input_channels: list[str]
    input_description: str
    min_side: int
    side_step: int
    scale: float | None
    output_id: str
    output_channel: str
    output_description: str
    name: str
    description: str
    tags: list[str]
    citations: tuple[tuple[str, str], ...]
    config: dict


def _require_spec():
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise EmsynthError(
            "bioimage.io export needs bioimageio.spec and bioimageio.core. "
            "Fix: pip install -e '.[bioimageio]'"
        ) from None


def load_exportable(run_dir: str | Path) -> tuple[Segmenter, dict | None, str]:
    """(segmenter, normaliser mapping or None, kind "mito" / "membrane") of a run folder."""
    folder = model_folder(run_dir)
    segmenter = Segmenter.load(folder)
    if segmenter.target_name == MEMBRANE:
        from emsynth.membranes.predict import MembraneModel

        membranes = MembraneModel.load(folder)
        return membranes.segmenter, membranes.normalizer.as_dict(), MEMBRANE
    if segmenter.channel_names != ["image"]:
        raise input_error(folder, f"takes inputs {segmenter.channel_names}",
                          "export a mitochondria model (input: image) or a membrane model")
    return segmenter, None, segmenter.target_name


def generator_file(path: str | Path) -> Path | None:
    """The exported generator of a GAN run folder (or that file itself); None otherwise."""
    path = Path(path)
    if path.is_dir():
        return path / GENERATOR_FILE if (path / GENERATOR_FILE).is_file() else None
    if path.is_file() and path.suffix == ".safetensors" and path.name != WEIGHTS:
        return path
    return None


def sample_input(channels: list[str], divisor: int = 1, volume: Volume | None = None,
                 side: int = 256, seed: int = 0) -> np.ndarray:
    """A (1, c, y, x) uint8 test input with these channels ("image": grey levels; a label:
    0 / 255): the centre crop of the first slice of `volume` (default: phantom CA1 tissue),
    `side` rounded down to a multiple of `divisor`."""
    if volume is None:
        from emsynth.data.phantom import generate_volume

        volume = generate_volume("ca1", n_slices=1, shape=(side, side), seed=seed)
    h, w = volume.shape[1:]
    sy, sx = (min(side, n) // divisor * divisor for n in (h, w))
    if sy == 0 or sx == 0:
        raise EmsynthError(f"sample slices ({h} x {w}) are smaller than the model's {divisor} px")
    y0, x0 = (h - sy) // 2, (w - sx) // 2
    crop = (slice(y0, y0 + sy), slice(x0, x0 + sx))
    planes = []
    for name in channels:
        if name == "image":
            planes.append(volume.image[0][crop])
        elif name in volume.labels:
            planes.append(volume.labels[name][0][crop].astype(np.uint8) * 255)
        else:
            raise input_error(volume.source or "sample volume",
                              f"has no {name!r} labels for the model's input",
                              f"pass --sample with {name} labels")
    return np.stack(planes)[None].astype(np.uint8)


def exported_module(segmenter: Segmenter, normalizer: dict | None, tta: bool | None):
    """(ExportedSegmenter holding the segmenter's weights, its JSON-plain kwargs)."""
    from emsynth.export.modules import ExportedSegmenter

    kwargs = {
        "model": segmenter.model.model_dump(mode="json"),
        "in_channels": len(segmenter.channel_names),
        "infer": segmenter.infer.model_dump(mode="json"),
        "tta": segmenter.infer.tta if tta is None else bool(tta),
        "normalizer": normalizer,
    }
    module = ExportedSegmenter(**kwargs)
    module.net.load_state_dict(segmenter.net.state_dict())
    return module.eval(), kwargs


def exported_generator(generator: torch.nn.Module, conditioning: Conditioning,
                       dropout: bool = True, seed: int = 0):
    """(ExportedGenerator holding the generator's weights, its JSON-plain kwargs)."""
    from emsynth.export.modules import ExportedGenerator

    net = unwrap(generator)
    kwargs = {
        "arch": getattr(net, "arch", "unet"), "in_channels": int(net.in_channels),
        "ngf": int(net.ngf), "channels": list(conditioning.channels),
        "mask_range": conditioning.mask_range, "decoder_noise": float(getattr(net, "noise", 0.0)),
        "dropout": bool(dropout), "seed": int(seed),
        "upsample": getattr(net, "upsample", "transpose"),
    }
    module = ExportedGenerator(**kwargs)
    module.net.load_state_dict(net.state_dict())
    return module.eval(), kwargs


def _grey(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=-1).astype(np.float32)


def _cover(image: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """A 2:1 RGB image: the input slice, and it with the probability in magenta."""
    grey = _grey(image)
    alpha = prob[..., None] * 0.6
    overlay = grey * (1 - alpha) + np.array([255.0, 0.0, 255.0]) * alpha
    return np.concatenate([grey, overlay], axis=1).clip(0, 255).astype(np.uint8)


def _generator_cover(masks: np.ndarray, channels: list[str], image: np.ndarray) -> np.ndarray:
    """A 2:1 RGB image: the masks in colour, and the synthetic image (0-1) they give."""
    painted = np.full((*masks.shape[1:], 3), 40.0, np.float32)
    for mask, name in zip(masks, channels):
        painted[mask > 0] = MASK_COLOURS.get(name, (255, 255, 255))
    synthetic = _grey(image * 255.0)
    return np.concatenate([painted, synthetic], axis=1).clip(0, 255).astype(np.uint8)


def _readme(kind: str, segmenter: Segmenter, kwargs: dict, threshold: float) -> str:
    channels = ", ".join(segmenter.channel_names)
    return f"""# emsynth {kind} segmenter

Predicts the probability of **{segmenter.target_name}** per pixel of 2D electron-microscopy
slices, with a MONAI U-Net trained by [emsynth](https://github.com/) (`emsynth segment train`
or `emsynth membranes train`).

- input `{INPUT_ID}`: uint8 (batch, channel, y, x), channels: {channels}
  {"(mito: 0 = background, 255 = mitochondrion)" if kind == MEMBRANE else ""}
- preprocessing: float32, then x / 255
- output `{OUTPUT_ID}`: float32 (batch, 1, y, x), probability 0-1
- binary mask: probability >= {threshold:.3f} (the threshold chosen on validation)
- inference: sliding windows of {kwargs["infer"]["window"]} px ({kwargs["infer"]["blend"]}
  blending), 8-way flip/rot90 averaging {"on" if kwargs["tta"] else "off"}
{"- the EM image is normalised per slice inside the model: " + kwargs["normalizer"]["method"]
 if kwargs["normalizer"] else ""}

The weights are a PyTorch state dict of `emsynth.export.modules.ExportedSegmenter`, so loading
them needs emsynth installed (`pip install emsynth` from its repository).

```python
from bioimageio.core import load_model_description, predict
model = load_model_description("this_package.zip")
sample = predict(model=model, inputs={{"{INPUT_ID}": image_uint8_bcyx}})
prob = sample.members["{OUTPUT_ID}"].data  # xarray (batch, channel, y, x)
```
"""


def _generator_readme(kwargs: dict, has_dropout: bool) -> str:
    channels = ", ".join(kwargs["channels"])
    noise = kwargs["decoder_noise"]
    dropout = kwargs["dropout"] and has_dropout
    random = [what for what, on in (("dropout", dropout),
                                    (f"decoder noise of sigma {noise:g}", noise > 0)) if on]
    determinism = (
        f"Its random parts ({' and '.join(random)}) are drawn from a random generator seeded "
        f"with {kwargs['seed']} at every call, so the same masks always give the same image "
        "(a batch is drawn as a whole, slice after slice, as `emsynth gan synthesize` draws a "
        "stack). Another seed: export again with `--seed N`."
        if random else "It has no random parts (no dropout, no decoder noise).")
    return f"""# emsynth EM generator

Turns masks of a 2D electron-microscopy slice into a synthetic EM image: a pix2pix conditional
GAN generator ({kwargs["arch"]}, ngf {kwargs["ngf"]}) trained by
[emsynth](https://github.com/) (`emsynth gan train`), applied as `emsynth gan synthesize`
applies it.

- input `{GENERATOR_INPUT_ID}`: uint8 (batch, channel, y, x), channels: {channels};
  0 = background, 255 = the label (any value > 0 counts as the label, so 0/1 masks work too)
- any y, x (from {GENERATOR_MIN_SIDE} px): each slice is reflect-padded (centred) to the next
  multiple of 256 inside the model, run through the generator once and cropped back (no tiles,
  no seams)
- output `{GENERATOR_OUTPUT_ID}`: float32 (batch, 1, y, x), grey level 0-1; round(255 x output)
  is the uint8 image that `emsynth gan synthesize --precision fp32` writes
- dropout at synthesis: {"on (as pix2pix at test time)" if dropout else
                          "off" if has_dropout else "none (this generator has no dropout)"}

{determinism}

The weights are a PyTorch state dict of `emsynth.export.modules.ExportedGenerator`, so loading
them needs emsynth installed (`pip install emsynth` from its repository).

```python
from bioimageio.core import Tensor, load_model_description, predict
model = load_model_description("this_package.zip")
masks = Tensor.from_numpy(masks_uint8_bcyx, dims=("batch", "channel", "y", "x"))
sample = predict(model=model, inputs={{"{GENERATOR_INPUT_ID}": masks}})
image = sample.members["{GENERATOR_OUTPUT_ID}"].data  # xarray (batch, 1, y, x), 0-1
```
"""


def _segmenter_parts(run_dir: str | Path, info: ExportInfo, sample: Volume | None) -> _Parts:
    if info.dropout is not None or info.seed is not None:
        raise input_error(run_dir, "--dropout and --seed are for GAN generators, this is a "
                          "segmenter", "leave them out")
    segmenter, normalizer, kind = load_exportable(run_dir)
    module, kwargs = exported_module(segmenter, normalizer, info.tta)
    test_in = sample_input(segmenter.channel_names, segmenter.model.divisor, sample)
    with torch.no_grad():
        test_out = module(to_float(torch.from_numpy(test_in))).numpy().astype(np.float32)
    what = "Mitochondria" if kind == MITO else kind.capitalize()
    return _Parts(
        module=module, callable="ExportedSegmenter", kwargs=kwargs,
        test_in=test_in, test_out=test_out, cover=_cover(test_in[0, 0], test_out[0, 0]),
        readme=_readme(kind, segmenter, kwargs, segmenter.threshold),
        sidecar={"target": segmenter.target_name, "channel_names": segmenter.channel_names,
                 "threshold": segmenter.threshold, "emsynth_version": __version__,
                 "meta": segmenter.meta},
        input_id=INPUT_ID, input_channels=segmenter.channel_names,
        input_description="EM slice(s), uint8 grey levels" + (
            "; channel mito: mitochondria mask (0 / 255)" if kind == MEMBRANE else ""),
        min_side=segmenter.model.divisor, side_step=segmenter.model.divisor, scale=1.0 / 255.0,
        output_id=OUTPUT_ID, output_channel=segmenter.target_name,
        output_description=f"{segmenter.target_name} probability; mask = probability >= "
                           f"{segmenter.threshold:.3f}",
        name=f"emsynth {kind} segmenter",
        description=(f"{what} segmentation of 2D electron-microscopy slices: a MONAI U-Net "
                     f"({segmenter.model.arch}, channels {segmenter.model.channels}) trained "
                     "with emsynth, applied with its sliding-window inference."),
        tags=["electron-microscopy", "segmentation", kind, "2d", "unet", "emsynth"],
        citations=CITATIONS,
        config={"threshold": segmenter.threshold, "emsynth_version": __version__},
    )


def _generator_parts(path: Path, info: ExportInfo, sample: Volume | None) -> _Parts:
    if info.tta is not None:
        raise input_error(path, "--tta/--no-tta is for segmenters, this is a GAN generator",
                          "leave it out")
    generator, conditioning, metadata = load_generator(path)
    dropout = True if info.dropout is None else info.dropout
    module, kwargs = exported_generator(generator, conditioning, dropout, info.seed or 0)
    channels = list(conditioning.channels)
    test_in = sample_input(channels, 1, sample)
    with torch.no_grad():
        test_out = module(torch.from_numpy(test_in).float()).numpy().astype(np.float32)
    citations = (PIX2PIX, *((HAN2018,) if kwargs["decoder_noise"] > 0 else ()),
                 *((SPADE,) if kwargs["arch"] == "spade" else ()))
    return _Parts(
        module=module, callable="ExportedGenerator", kwargs=kwargs,
        test_in=test_in, test_out=test_out,
        cover=_generator_cover(test_in[0], channels, test_out[0, 0]),
        readme=_generator_readme(kwargs, any(isinstance(m, torch.nn.Dropout)
                                             for m in module.net.modules())),
        sidecar={"conditioning": channels, "mask_range": conditioning.mask_range,
                 "emsynth_version": __version__, "generator": metadata},
        input_id=GENERATOR_INPUT_ID, input_channels=channels,
        input_description=f"masks ({', '.join(channels)}), uint8: 0 = background, 255 (any "
                          "value > 0) = the label",
        min_side=GENERATOR_MIN_SIDE, side_step=1, scale=None,
        output_id=GENERATOR_OUTPUT_ID, output_channel="em",
        output_description="synthetic EM slice, grey level 0-1 (x 255 = emsynth gan "
                           "synthesize's uint8 image)",
        name="emsynth EM generator",
        description=(f"Synthetic 2D electron-microscopy slices from {' + '.join(channels)} "
                     f"masks: a pix2pix conditional GAN generator ({kwargs['arch']}, ngf "
                     f"{kwargs['ngf']}) trained with emsynth, applied to whole slices of any "
                     "size; deterministic (dropout and decoder noise seeded at every call)."),
        tags=["electron-microscopy", "image-synthesis", "image-to-image", "gan", "pix2pix",
              kwargs["arch"], "2d", "emsynth"],
        citations=citations,
        config={"conditioning": channels, "mask_range": conditioning.mask_range,
                "dropout": kwargs["dropout"], "seed": kwargs["seed"],
                "decoder_noise": kwargs["decoder_noise"], "emsynth_version": __version__},
    )


def export_bioimageio(run_dir: str | Path, out_zip: str | Path, info: ExportInfo | None = None,
                      sample: Volume | None = None) -> Path:
    """Write the bioimage.io package of the model in `run_dir` to `out_zip`; returns it.

    `run_dir`: a segmenter run folder (or its model/), or a GAN run folder holding
    generator.safetensors (or that file). `sample`: a volume whose first slice (centre crop)
    becomes the test input (default: phantom CA1 tissue; the membrane model also takes its
    mito labels, a generator only its conditioning labels)."""
    _require_spec()
    info = info or ExportInfo()
    generator = generator_file(run_dir)
    parts = (_generator_parts(generator, info, sample) if generator is not None
             else _segmenter_parts(run_dir, info, sample))
    return _write_package(parts, info, Path(out_zip))


def _write_package(parts: _Parts, info: ExportInfo, out_zip: Path) -> Path:
    import imageio.v3 as iio
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as spec

    with tempfile.TemporaryDirectory(prefix="emsynth-bioimageio-") as tmp:
        tmp = Path(tmp)
        torch.save(parts.module.state_dict(), tmp / "weights.pt")
        np.save(tmp / "test_input.npy", parts.test_in)
        np.save(tmp / "test_output.npy", parts.test_out)
        iio.imwrite(tmp / "cover.png", parts.cover)
        (tmp / "README.md").write_text(parts.readme)
        (tmp / "emsynth_model.json").write_text(json.dumps(parts.sidecar, indent=2, default=str))

        space_in = [
            spec.SpaceInputAxis(id=spec.AxisId(a), size=spec.ParameterizedSize(
                min=parts.min_side, step=parts.side_step))
            for a in ("y", "x")
        ]
        space_out = [
            spec.SpaceOutputAxis(id=spec.AxisId(a), size=spec.SizeReference(
                tensor_id=spec.TensorId(parts.input_id), axis_id=spec.AxisId(a)))
            for a in ("y", "x")
        ]
        preprocessing = [spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32"))]
        if parts.scale is not None:
            preprocessing += [
                spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=parts.scale,
                                                                    offset=0.0)),
                # the last step fixes what the network gets (else: the input's uint8)
                spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32")),
            ]
        inputs = spec.InputTensorDescr(
            id=spec.TensorId(parts.input_id),
            description=parts.input_description,
            axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=[
                spec.Identifier(n) for n in parts.input_channels]), *space_in],
            test_tensor=spec.FileDescr(source=tmp / "test_input.npy"),
            data=spec.IntervalOrRatioDataDescr(type="uint8"),
            preprocessing=preprocessing,
        )
        outputs = spec.OutputTensorDescr(
            id=spec.TensorId(parts.output_id),
            description=parts.output_description,
            axes=[spec.BatchAxis(), spec.ChannelAxis(
                channel_names=[spec.Identifier(parts.output_channel)]), *space_out],
            test_tensor=spec.FileDescr(source=tmp / "test_output.npy"),
            data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        )
        weights = spec.WeightsDescr(pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
            source=tmp / "weights.pt",
            architecture=spec.ArchitectureFromLibraryDescr(
                import_from="emsynth.export.modules", callable=spec.Identifier(parts.callable),
                kwargs=parts.kwargs),
            pytorch_version=spec.Version(torch.__version__.split("+")[0]),
        ))
        descr = spec.ModelDescr(
            name=info.name or parts.name,
            description=info.description or parts.description,
            authors=[spec.Author(name=a) for a in info.authors],
            cite=[spec.CiteEntry(text=text, doi=spec.Doi(doi)) for text, doi in parts.citations],
            license=spec.LicenseId(info.license),
            documentation=spec.FileDescr(source=tmp / "README.md"),
            covers=[spec.FileDescr(source=tmp / "cover.png")],
            attachments=[spec.FileDescr(source=tmp / "emsynth_model.json")],
            tags=parts.tags,
            git_repo=info.git_repo,
            inputs=[inputs],
            outputs=[outputs],
            weights=weights,
            timestamp=datetime.datetime.now(datetime.timezone.utc),
            version="0.1.0",
            config={"emsynth": parts.config},
        )
        out_zip.parent.mkdir(parents=True, exist_ok=True)
        tmp_zip = tmp / "package.zip"
        save_bioimageio_package(descr, output_path=tmp_zip)
        shutil.move(str(tmp_zip), out_zip)
    return out_zip


def check_package(path: str | Path) -> tuple[bool, str]:
    """(passed, a readable summary) of bioimageio.core's model test on a package."""
    _require_spec()
    from bioimageio.core import test_model

    summary = test_model(str(path))
    return summary.status == "passed", summary.format() if hasattr(summary, "format") else str(
        summary)
