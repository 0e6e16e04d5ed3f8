"""Package a trained segmenter (mitochondria or membranes) for the BioImage Model Zoo.

`export_bioimageio(run_dir, out_zip)` writes a bioimage.io v0.5 model package (a zip holding
rdf.yaml, the weights, a test input/output pair, a cover image and a README) that
`bioimageio.core` loads and tests. The weights are a `pytorch_state_dict` whose architecture
is `emsynth.export.modules.ExportedSegmenter` (so loading it needs emsynth installed): the
network plus emsynth's own inference, so the package predicts what `emsynth segment predict`
(or `emsynth membranes predict`) predicts on the same input.

Input: one uint8 tensor (batch, channel, y, x) with the model's input channels ("image", plus
"mito" 0/255 for the membrane model); preprocessing: float32, then x / 255 (the scale of
`emsynth.segment.model.to_float`). Output: the foreground probability (batch, 1, y, x), 0-1.
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
from emsynth.errors import EmsynthError, input_error
from emsynth.segment.model import Segmenter, model_folder, to_float

#: Citations every exported segmenter carries (the network and the library it comes from).
CITATIONS = (
    (("Ronneberger, Fischer and Brox (2015): U-Net: Convolutional Networks for Biomedical "
      "Image Segmentation. MICCAI."), "10.1007/978-3-319-24574-4_28"),
    ("Cardoso et al. (2022): MONAI: An open-source framework for deep learning in healthcare.",
     "10.48550/arXiv.2211.02701"),
)
INPUT_ID = "raw"
OUTPUT_ID = "probability"


@dataclass
class ExportInfo:
    """What goes into the description beyond the model itself."""

    name: str | None = None
    authors: list[str] = field(default_factory=lambda: ["emsynth"])
    license: str = "MIT"
    description: str | None = None
    tta: bool | None = None  # None = the model's saved default
    git_repo: str | None = None


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


def sample_input(segmenter: Segmenter, volume: Volume | None = None, side: int = 256,
                 seed: int = 0) -> np.ndarray:
    """A (1, c, y, x) uint8 test input for `segmenter`: the centre crop of the first slice of
    `volume` (default: phantom CA1 tissue), `side` rounded down to the model's divisor."""
    if volume is None:
        from emsynth.data.phantom import generate_volume

        volume = generate_volume("ca1", n_slices=1, shape=(side, side), seed=seed)
    d = segmenter.model.divisor
    h, w = volume.shape[1:]
    sy, sx = (min(side, n) // d * d for n in (h, w))
    if sy == 0 or sx == 0:
        raise EmsynthError(f"sample slices ({h} x {w}) are smaller than the model's {d} px")
    y0, x0 = (h - sy) // 2, (w - sx) // 2
    crop = (slice(y0, y0 + sy), slice(x0, x0 + sx))
    channels = []
    for name in segmenter.channel_names:
        if name == "image":
            channels.append(volume.image[0][crop])
        elif name in volume.labels:
            channels.append(volume.labels[name][0][crop].astype(np.uint8) * 255)
        else:
            raise EmsynthError(f"the sample volume has no {name!r} labels for the model's input")
    return np.stack(channels)[None].astype(np.uint8)


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


def _cover(path: Path, image: np.ndarray, prob: np.ndarray) -> None:
    """A 2:1 PNG: the input slice, and it with the probability in magenta."""
    import imageio.v3 as iio

    grey = np.repeat(image[..., None], 3, axis=-1).astype(np.float32)
    overlay = grey.copy()
    alpha = prob[..., None] * 0.6
    overlay = overlay * (1 - alpha) + np.array([255.0, 0.0, 255.0]) * alpha
    iio.imwrite(path, np.concatenate([grey, overlay], axis=1).clip(0, 255).astype(np.uint8))


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


def export_bioimageio(run_dir: str | Path, out_zip: str | Path, info: ExportInfo | None = None,
                      sample: Volume | None = None) -> Path:
    """Write the bioimage.io package of the segmenter in `run_dir` to `out_zip`; returns it.

    `sample`: a volume whose first slice (centre crop) becomes the test input (default:
    phantom CA1 tissue; the membrane model also takes its mito labels)."""
    _require_spec()
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as spec

    info = info or ExportInfo()
    segmenter, normalizer, kind = load_exportable(run_dir)
    module, kwargs = exported_module(segmenter, normalizer, info.tta)
    test_in = sample_input(segmenter, sample)
    with torch.no_grad():
        test_out = module(to_float(torch.from_numpy(test_in))).numpy().astype(np.float32)

    out_zip = Path(out_zip)
    with tempfile.TemporaryDirectory(prefix="emsynth-bioimageio-") as tmp:
        tmp = Path(tmp)
        torch.save(module.state_dict(), tmp / "weights.pt")
        np.save(tmp / "test_input.npy", test_in)
        np.save(tmp / "test_output.npy", test_out)
        _cover(tmp / "cover.png", test_in[0, 0], test_out[0, 0])
        (tmp / "README.md").write_text(_readme(kind, segmenter, kwargs, segmenter.threshold))
        (tmp / "emsynth_model.json").write_text(json.dumps({
            "target": segmenter.target_name, "channel_names": segmenter.channel_names,
            "threshold": segmenter.threshold, "emsynth_version": __version__,
            "meta": segmenter.meta,
        }, indent=2, default=str))

        d = segmenter.model.divisor
        space_in = [
            spec.SpaceInputAxis(id=spec.AxisId(a), size=spec.ParameterizedSize(min=d, step=d))
            for a in ("y", "x")
        ]
        space_out = [
            spec.SpaceOutputAxis(id=spec.AxisId(a), size=spec.SizeReference(
                tensor_id=spec.TensorId(INPUT_ID), axis_id=spec.AxisId(a)))
            for a in ("y", "x")
        ]
        inputs = spec.InputTensorDescr(
            id=spec.TensorId(INPUT_ID),
            description="EM slice(s), uint8 grey levels" + (
                "; channel mito: mitochondria mask (0 / 255)" if kind == MEMBRANE else ""),
            axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=[
                spec.Identifier(n) for n in segmenter.channel_names]), *space_in],
            test_tensor=spec.FileDescr(source=tmp / "test_input.npy"),
            data=spec.IntervalOrRatioDataDescr(type="uint8"),
            preprocessing=[
                spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32")),
                spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=1.0 / 255.0,
                                                                    offset=0.0)),
                # the last step fixes what the network gets (else: the input's uint8)
                spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32")),
            ],
        )
        outputs = spec.OutputTensorDescr(
            id=spec.TensorId(OUTPUT_ID),
            description=f"{segmenter.target_name} probability; mask = probability >= "
                        f"{segmenter.threshold:.3f}",
            axes=[spec.BatchAxis(), spec.ChannelAxis(
                channel_names=[spec.Identifier(segmenter.target_name)]), *space_out],
            test_tensor=spec.FileDescr(source=tmp / "test_output.npy"),
            data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        )
        weights = spec.WeightsDescr(pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
            source=tmp / "weights.pt",
            architecture=spec.ArchitectureFromLibraryDescr(
                import_from="emsynth.export.modules", callable=spec.Identifier(
                    "ExportedSegmenter"), kwargs=kwargs),
            pytorch_version=spec.Version(torch.__version__.split("+")[0]),
        ))
        what = "Mitochondria" if kind == MITO else kind.capitalize()
        descr = spec.ModelDescr(
            name=info.name or f"emsynth {kind} segmenter",
            description=info.description or (
                f"{what} segmentation of 2D electron-microscopy slices: a MONAI U-Net "
                f"({segmenter.model.arch}, channels {segmenter.model.channels}) trained with "
                "emsynth, applied with its sliding-window inference."),
            authors=[spec.Author(name=a) for a in info.authors],
            cite=[spec.CiteEntry(text=text, doi=spec.Doi(doi)) for text, doi in CITATIONS],
            license=spec.LicenseId(info.license),
            documentation=spec.FileDescr(source=tmp / "README.md"),
            covers=[spec.FileDescr(source=tmp / "cover.png")],
            attachments=[spec.FileDescr(source=tmp / "emsynth_model.json")],
            tags=["electron-microscopy", "segmentation", kind, "2d", "unet", "emsynth"],
            git_repo=info.git_repo,
            inputs=[inputs],
            outputs=[outputs],
            weights=weights,
            timestamp=datetime.datetime.now(datetime.timezone.utc),
            version="0.1.0",
            config={"emsynth": {"threshold": segmenter.threshold,
                                "emsynth_version": __version__}},
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
