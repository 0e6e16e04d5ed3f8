"""`emsynth export ...`: package trained models for other tools (the BioImage Model Zoo)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from emsynth.options import LayoutOpt

app = typer.Typer(help="Export trained models for other tools (bioimage.io).",
                  no_args_is_help=True)
out = Console()


@app.command("bioimageio")
def bioimageio_cmd(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", help="Run folder of `segment train` or `membranes train` (or model/), "
        "or of `gan train` (or its generator.safetensors).")],
    out_zip: Annotated[Path, typer.Argument(metavar="OUT.zip", dir_okay=False,
                                            help="The package to write.")],
    name: Annotated[str | None, typer.Option("--name", help="Model name in the zoo.")] = None,
    author: Annotated[list[str] | None, typer.Option(
        "--author", help="An author's name (repeat for several; default: emsynth).")] = None,
    license_id: Annotated[str, typer.Option("--license", help="SPDX licence id.")] = "MIT",
    tta: Annotated[bool | None, typer.Option(
        "--tta/--no-tta", help="Segmenters: bake 8-way TTA into the package (default: the "
        "model's).")] = None,
    dropout: Annotated[bool | None, typer.Option(
        "--dropout/--no-dropout", help="Generators: dropout on at synthesis, as pix2pix and "
        "`gan synthesize` do (default: on).")] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", min=0, help="Generators: the seed of dropout and decoder noise, fixed in the "
        "package and re-applied at every call (default: 0).")] = None,
    sample: Annotated[Path | None, typer.Option(
        "--sample", help="Volume whose first slice (centre crop) is the test input "
        "(default: phantom CA1 tissue; a membrane model needs its mito labels, a generator "
        "its conditioning labels).")] = None,
    layout: LayoutOpt = "auto",
    test: Annotated[bool, typer.Option(
        "--test/--no-test", help="Run bioimageio.core's model test on the package.")] = True,
) -> None:
    """Write a bioimage.io (v0.5) model package of a trained segmenter or GAN generator:
    weights, test input and output, cover, README; then test it with bioimageio.core (needs the
    bioimageio extra)."""
    from emsynth.export.bioimageio import ExportInfo, check_package, export_bioimageio

    volume = None
    if sample is not None:
        from emsynth.data.readers import read_volume

        volume = read_volume(sample, layout)
    info = ExportInfo(name=name, authors=author or ["emsynth"], license=license_id, tta=tta,
                      dropout=dropout, seed=seed)
    path = export_bioimageio(run_dir, out_zip, info, sample=volume)
    out.print(f"wrote {path}", highlight=False)
    if test:
        passed, summary = check_package(path)
        if not passed:
            Console(stderr=True).print(summary, highlight=False, soft_wrap=True)
            out.print("[bold red]bioimageio.core model test: failed[/]")
            raise typer.Exit(1)
        out.print("bioimageio.core model test: passed")
