"""`emsynth data ...`: inspect, show, generate and fetch EM datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from emsynth.options import LayoutOpt, parse_zyx

app = typer.Typer(help="Inspect, show, generate (phantom) and fetch EM datasets.", no_args_is_help=True)


_MIRROR_HELP = (
    "Fetch from here instead of upstream: an http(s) base URL or a local folder holding the "
    "same relative paths as upstream. drosophila-vnc: raw/NN.tif, membranes/NN.png, "
    "mitochondria/NN.png, synapses/NN.png (NN=00..19), e.g. /work/shared/data/drosophila_vnc; "
    "epfl-ca1: training.tif, training_groundtruth.tif, testing.tif, testing_groundtruth.tif; "
    "isbi2012: train-volume.tif, train-labels.tif."
)


@app.command("fetch")
def fetch(
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="Dataset: drosophila-vnc, epfl-ca1 or isbi2012.")
    ],
    dest: Annotated[str, typer.Option("--dest", help="Folder to download into (made if missing).")],
    mirror: Annotated[str | None, typer.Option("--mirror", help=_MIRROR_HELP)] = None,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Fetch only files whose relative path matches this glob."),
    ] = None,
    retries: Annotated[
        int, typer.Option("--retries", min=0, help="Automatic resumes after a dropped connection.")
    ] = 2,
) -> None:
    """Download a public EM dataset into DEST, verified and resumable.

    Each file streams to FILE.part, is checked, then renamed to FILE.

    Check: SHA-256 where a checksum is published, else the TIFF's pages, size, type and values.

    Files present that pass their check are skipped; a .part left by a drop resumes (HTTP Range).
    """
    from emsynth.data.fetch import fetch_dataset, get_dataset

    dataset = get_dataset(name)
    results = fetch_dataset(name, dest, mirror=mirror, only=only or None, retries=retries)
    present = sum(r.action == "present" for r in results)
    checks = sorted({r.check for r in results})
    typer.echo(
        f"{name}: {len(results)} files verified in {dest} ({len(results) - present} fetched, "
        f"{present} already present); checks: {'; '.join(checks)}. "
        f"Read with read_volume({str(Path(dest) / dataset.read_path)!r}, "
        f"layout={dataset.layout!r})."
    )


# --- info and show: read any layout, report and draw it ---------------------------------------

_PATH_HELP = "Dataset folder (drosophila_vnc, images/ + masks/, ...) or a multipage TIFF."
_MASK_DIR_HELP = "Read this mask folder beside images/ (e.g. masks_epfl) as label --label."
_LABEL_HELP = "Label name of --mask-dir: mito, membrane or synapse."
_POLARITY_HELP = (
    "auto (the layout's convention; rejects masks that look inverted), foreground-white or "
    "foreground-black."
)


def _read_with_notes(path, layout, mask_dir, label, polarity, indices=None):
    """Read a dataset, printing conversion notes (InputWarning) as one line each on stderr."""
    import warnings

    from rich.console import Console

    from emsynth.data.readers import read_volume, resolve_layout
    from emsynth.data.validate import InputWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InputWarning)
        layout_used = resolve_layout(path, layout, mask_dir)
        volume = read_volume(
            path, layout_used, mask_dir=mask_dir, label=label, polarity=polarity, indices=indices
        )
    notes = [str(w.message) for w in caught if issubclass(w.category, InputWarning)]
    err = Console(stderr=True)
    for note in notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    return volume, layout_used, notes


@app.command("info")
def info(
    path: Annotated[str, typer.Argument(help=_PATH_HELP)],
    layout: LayoutOpt = "auto",
    mask_dir: Annotated[str | None, typer.Option("--mask-dir", help=_MASK_DIR_HELP)] = None,
    label: Annotated[str, typer.Option("--label", help=_LABEL_HELP)] = "mito",
    polarity: Annotated[str, typer.Option("--polarity", help=_POLARITY_HELP)] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Read and validate a dataset; print its layout, size, label fractions and intensities."""
    import json

    from rich.console import Console
    from rich.table import Table

    from emsynth.data.readers import volume_stats

    volume, layout_used, notes = _read_with_notes(path, layout, mask_dir, label, polarity)
    stats = {"path": str(path), "layout": layout_used, **volume_stats(volume), "notes": notes}
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    table = Table(title=f"{path}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    z, y, x = stats["shape"]
    pixel = stats["pixel_size_nm"]
    table.add_row("layout", layout_used)
    table.add_row("source", stats["source"])
    table.add_row("slices", f"{z} ({stats['first_slice']} .. {stats['last_slice']})")
    table.add_row("shape (z, y, x)", f"{z} x {y} x {x}, {stats['dtype']}")
    table.add_row("pixel size", f"{pixel[0]:g} x {pixel[1]:g} nm" if pixel else "unknown")
    for name, fraction in stats["label_fractions"].items():
        table.add_row(f"label {name}", f"{fraction:.2%} of pixels")
    if not stats["label_fractions"]:
        table.add_row("labels", "none")
    i = stats["intensity"]
    table.add_row(
        "intensity",
        f"mean {i['mean']:.1f}, std {i['std']:.1f}, p1 {i['p1']}, p99 {i['p99']}, "
        f"range {i['min']}..{i['max']}",
    )
    Console().print(table)


@app.command("show")
def show(
    path: Annotated[str, typer.Argument(help=_PATH_HELP)],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")],
    slices: Annotated[
        str | None,
        typer.Option(
            "--slices", help="Comma-separated slice indices, e.g. 0,5,10 (default: first, "
            "middle, last)."
        ),
    ] = None,
    title: Annotated[
        str | None, typer.Option("--title", help="Figure title (default: the path).")
    ] = None,
    layout: LayoutOpt = "auto",
    mask_dir: Annotated[str | None, typer.Option("--mask-dir", help=_MASK_DIR_HELP)] = None,
    label: Annotated[str, typer.Option("--label", help=_LABEL_HELP)] = "mito",
    polarity: Annotated[str, typer.Option("--polarity", help=_POLARITY_HELP)] = "auto",
) -> None:
    """Draw a few slices side by side, image above and label overlay below (mitochondria red,
    membranes green, synapses blue)."""
    from emsynth.data.figures import default_slices, save_slice_figure
    from emsynth.errors import input_error

    indices = None
    if slices is not None:
        try:
            indices = [int(tok) for tok in slices.split(",") if tok.strip()]
        except ValueError:
            indices = []
        if not indices:
            raise input_error(
                "--slices", f"{slices!r} is not a list of slice indices", "e.g. --slices 0,5,10"
            )
    volume, _, _ = _read_with_notes(path, layout, mask_dir, label, polarity, indices)
    if indices is None:
        indices = default_slices(len(volume))
        volume = volume.select(indices)
    written = save_slice_figure(volume, out, title=title or str(path), z_numbers=indices)
    typer.echo(f"wrote {written} ({written.stat().st_size / 1024:.0f} KB, slices {indices})")


# --- phantom: the embedded procedural dataset --------------------------------------------------


@app.command("phantom")
def phantom(
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Slice folder to write: new, empty, or an emsynth slice folder to replace."
        ),
    ],
    domain: Annotated[
        str, typer.Option("--domain", help="vnc (ssTEM-like) or ca1 (FIB-SEM-like).")
    ] = "vnc",
    n_slices: Annotated[int, typer.Option("--slices", min=1, help="Number of z slices.")] = 8,
    size: Annotated[int, typer.Option("--size", min=16, help="Slice height and width (px).")] = 512,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same data).")] = 0,
) -> None:
    """Generate a procedural EM volume (cells, membranes, mitochondria, vesicles) and write it
    as an emsynth slice folder (images/, masks/ 255 = mito, membranes/, meta.json)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from emsynth.data.phantom import get_domain, iter_slices, phantom_volume
    from emsynth.data.writers import write_slice_folder

    spec = get_domain(domain)
    slices = []
    columns = (
        TextColumn("[bold]phantom {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(spec.name, total=n_slices)
        for piece in iter_slices(spec, n_slices, (size, size), seed):
            slices.append(piece)
            progress.advance(task)
    volume = phantom_volume(spec, slices, seed)
    write_slice_folder(volume, out)
    fractions = ", ".join(f"{k} {v:.2%}" for k, v in volume.label_fractions().items())
    typer.echo(
        f"wrote {out}: {n_slices} x {size} x {size} px phantom '{spec.name}' (seed {seed}, "
        f"{spec.pixel_size_nm:g} nm/px); label fractions: {fractions}"
    )


# --- convert: any layout to OME-Zarr -----------------------------------------------------------


def _parse_chunks(text: str | None):
    return None if text is None else parse_zyx(text, "--chunks", "16,512,512")


@app.command("convert")
def convert(
    path: Annotated[str, typer.Argument(help=_PATH_HELP)],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="OME-Zarr to write (e.g. "
                                        "volume.ome.zarr); must not exist unless --overwrite.")],
    layout: LayoutOpt = "auto",
    mask_dir: Annotated[str | None, typer.Option("--mask-dir", help=_MASK_DIR_HELP)] = None,
    label: Annotated[str, typer.Option("--label", help=_LABEL_HELP)] = "mito",
    polarity: Annotated[str, typer.Option("--polarity", help=_POLARITY_HELP)] = "auto",
    chunks: Annotated[
        str | None, typer.Option("--chunks", help="Chunk shape z,y,x (default: up to 16,512,512).")
    ] = None,
    ngff: Annotated[
        str, typer.Option("--ngff", help="NGFF version: 0.5 (zarr v3) or 0.4 (zarr v2).")
    ] = "0.5",
    z_nm: Annotated[
        float | None, typer.Option("--z-nm", min=0.0, help="Slice thickness in nm (default: the "
                                   "pixel size, i.e. isotropic).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
) -> None:
    """Convert any supported layout into an OME-Zarr image with labels/<name> (mito, membrane,
    synapse) and its physical scale; written to a temporary folder, then renamed onto OUT."""
    from emsynth.data.omezarr import write_volume
    from emsynth.errors import input_error

    if ngff not in ("0.4", "0.5"):
        raise input_error("--ngff", f"unknown NGFF version {ngff!r}", "use 0.5 or 0.4")
    if out.exists() and not overwrite:
        raise input_error(out, "already exists", "choose a new OUT or pass --overwrite")
    chunk_shape = _parse_chunks(chunks)
    volume, layout_used, _ = _read_with_notes(path, layout, mask_dir, label, polarity)
    if Path(path).resolve() == out.resolve():
        raise input_error(out, "is the input itself", "write to another path")
    write_volume(volume, out, chunks=chunk_shape, version=ngff, z_nm=z_nm, overwrite=overwrite)
    z, y, x = volume.shape
    labels = ", ".join(sorted(volume.labels)) or "none"
    typer.echo(f"wrote {out}: OME-Zarr {ngff}, {z} x {y} x {x} uint8 from {layout_used}, "
               f"labels: {labels}")
