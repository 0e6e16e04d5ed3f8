"""`emsynth membranes ...`: train the (EM image, mitochondria) -> membrane U-Net, predict
membranes for a volume (e.g. CA1) as a slice folder the GAN reads, check plausibility.

The work is the stage's: training in membranes.task, prediction, thresholding, thinning and
scoring in membranes.predict, plausibility in membranes.checks, figures in membranes.figures.

Heavy imports (torch, MONAI) happen inside the commands so `emsynth --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from emsynth.data.blocks import BackendOpt, BlockOpt, NumShardsOpt, SchedulerOpt, ShardIdOpt
from emsynth.engine.cli import TrainOptions, stop_line, train_options
from emsynth.membranes.config import MITO_FROM_HELP
from emsynth.options import DeviceOpt, LayoutOpt, PrecisionOpt, ThreadsOpt

app = typer.Typer(
    help="Membrane transfer: predict cell membranes from (EM image, mitochondria mask), "
    "trained on Drosophila VNC, applied to CA1.",
    no_args_is_help=True,
)
out = Console()



@app.command("train")
@train_options(default_config=None, default_run_dir="runs/membranes/vnc")
def train_cmd(
    opts: TrainOptions,
    data: Annotated[
        Path | None,
        typer.Option("--data", "-d", help="Training dataset with membrane + mitochondria labels "
                     "(default: data.path, ../shared/data/drosophila_vnc)."),
    ] = None,
    layout: LayoutOpt = "auto",
    phantom: Annotated[
        str | None,
        typer.Option("--phantom", help="Train on a generated phantom volume of this domain (vnc "
                     "or ca1) instead; its size: config data.phantom (default 20 slices of 512^2)."),
    ] = None,
    add_slices: Annotated[
        Path | None,
        typer.Option(
            "--add-slices",
            help="Add membrane-only training slices, e.g. ../shared/data/isbi2012/train. Their "
            "mitochondria channel is zeros unless --extra-mito names a mitochondria model.",
        ),
    ] = None,
    extra_mito: Annotated[
        str | None,
        typer.Option(
            "--extra-mito",
            help='Mitochondria channel of --add-slices: "zeros" (default) or a mitochondria '
            "model folder from `emsynth segment train` (its prediction is used).",
        ),
    ] = None,
    train_slices: Annotated[
        str | None, typer.Option("--train-slices", help='Training slices (default "0-15").')
    ] = None,
    val_slices: Annotated[
        str | None,
        typer.Option("--val-slices", help='Held-out block for the threshold (default "16-19").'),
    ] = None,
) -> None:
    """Train the membrane U-Net (inputs: EM image + mitochondria mask) with the shared engine.

    Default data: drosophila_vnc, slices 0-15 train, 16-19 held out (threshold choice).

    Robustness augmentations (config section `robust`, each off at probability 0): Gaussian
    noise with sigma ~ U(0, noise_max), brightness/contrast/gamma, blur, mitochondria-channel
    dropout. Intensity normalisation (`normalize.method`: none, standardize, histmatch) is
    applied at train and at predict time.

    --add-slices (e.g. ISBI 2012, membranes only): their mitochondria channel is filled with
    zeros by default, or with a mitochondria model's prediction (--extra-mito MODEL_DIR).

    Presets: --config configs/membranes/cpu.yaml (minutes on 2 CPU cores), gpu.yaml,
    phantom.yaml. The model lands in RUN_DIR/model.
    """
    from emsynth.membranes.config import MembraneConfig
    from emsynth.membranes.task import train_membranes
    from emsynth.segment.train import MODEL_DIR

    overrides = []
    for key, value in (("path", data), ("layout", layout if data else None),
                       ("phantom.domain", phantom), ("extra_path", add_slices),
                       ("extra_mito", extra_mito), ("train_slices", train_slices),
                       ("val_slices", val_slices)):
        if value is not None:
            overrides.append(f"data.{key}={json.dumps(str(value))}")
    opts.overrides = [*opts.overrides, *overrides]
    cfg = opts.load(MembraneConfig)
    result = train_membranes(cfg, opts.run_dir, resume=opts.resume)
    out.print(stop_line(result), highlight=False)
    final = result["final"]
    if final:
        out.print(
            f"held-out slices {cfg.data.val_slices}: membrane F1 {final['fg_dice']:.4f}, IoU "
            f"{final['fg_iou']:.4f} at threshold {final['threshold']:.3f} (F1 "
            f"{final['fg_dice@0.5']:.4f}, IoU {final['fg_iou@0.5']:.4f} at 0.5)",
            highlight=False,
        )
    out.print(f"model: {opts.run_dir / MODEL_DIR}", highlight=False)


@app.command("predict")
def predict_cmd(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Run folder of `membranes train` (or its model/).")
    ],
    data: Annotated[
        Path,
        typer.Option("--data", "-d", help="Volume to predict (any reader layout), e.g. "
                     "../shared/data/lucchi_pp/train (CA1)."),
    ],
    out_dir: Annotated[
        Path,
        typer.Option("--out", "-o", file_okay=False,
                     help="Output slice folder, e.g. runs/membranes/ca1_with_membranes."),
    ],
    layout: LayoutOpt = "auto",
    slices: Annotated[
        str | None, typer.Option("--slices", help='Only these slices, e.g. "16-19".')
    ] = None,
    mito_from: Annotated[
        str, typer.Option("--mito-from", help="Mitochondria channel: " + MITO_FROM_HELP)
    ] = "labels",
    threshold: Annotated[
        float | None,
        typer.Option("--threshold", min=0.0, max=1.0,
                     help="Binary membranes where prob >= this (default: the model's, chosen "
                     "on held-out slices)."),
    ] = None,
    thin_width: Annotated[
        int,
        typer.Option("--thin-width", min=0,
                     help="Thin membranes to a closed boundary map of this width in px "
                     "(skeletonize + dilate); 0 keeps the thresholded mask."),
    ] = 0,
    tta: Annotated[
        bool | None,
        typer.Option("--tta/--no-tta", help="8-way flip/rot90 averaging (default: the model's)."),
    ] = None,
    figure: Annotated[
        Path | None,
        typer.Option("--figure", dir_okay=False,
                     help="Also draw EM | mitochondria | predicted [| true] membranes to this PNG."),
    ] = None,
    figure_crop: Annotated[
        int, typer.Option("--figure-crop", min=0, help="Centre crop of figure panels (0 = whole).")
    ] = 512,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
    block: BlockOpt = None,
    shard_id: ShardIdOpt = 0,
    num_shards: NumShardsOpt = 1,
    backend: BackendOpt = "local",
    scheduler: SchedulerOpt = None,
) -> None:
    """Predict membranes for every slice of a volume (sliding window, any slice size).

    Writes OUT as an emsynth slice folder that the GAN stage reads directly: images/, masks/
    (mitochondria, 255) and membranes/ (predicted membranes, 255); plus membrane_prob.tif
    (uint8 probabilities, 255 = 1.0) and prediction.json (threshold, plausibility numbers, and
    membrane F1/IoU when the volume has membrane labels).

    Volumes without mitochondria labels (ISBI 2012) need --mito-from zeros or a mitochondria
    model folder.

    With OUT ending in .zarr (or --block) the prediction runs blockwise with bounded memory into
    an OME-Zarr: membrane probabilities as its image, labels/membrane (the mask at the
    threshold) and labels/mito (the mitochondria channel the model read), ready for `emsynth gan
    synthesize --masks OUT`. Resumable, --shard-id/--num-shards and --backend dask as in
    `emsynth segment predict`; thinning, scores and figures need whole slices (not blockwise).
    """
    if block is not None or out_dir.suffix == ".zarr" or num_shards > 1 or backend != "local":
        _predict_blockwise(model, data, out_dir, layout, slices, mito_from, threshold,
                           thin_width, tta, figure, device, precision, threads, block, shard_id,
                           num_shards, backend, scheduler)
        return
    import torch
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from emsynth.data.readers import read_volume
    from emsynth.data.slices import parse_slices
    from emsynth.data.volume import MEMBRANE
    from emsynth.engine.device import resolve_device, resolve_precision, thread_count
    from emsynth.membranes.checks import format_plausibility
    from emsynth.membranes.figures import prediction_figure
    from emsynth.membranes.predict import (
        MembraneModel,
        format_scores,
        mito_mask,
        predict_volume,
        write_prediction,
    )

    torch.set_num_threads(thread_count(threads))
    dev = str(resolve_device(device))
    precision = resolve_precision(precision, torch.device(dev))
    membrane_model = MembraneModel.load(model, device=dev)
    volume = read_volume(data, layout)
    if slices is not None:
        volume = volume.select(parse_slices(slices, len(volume), "--slices"))
    mito = mito_mask(volume, mito_from, device=dev, precision=precision)  # errors before the bar
    progress = Progress(TextColumn("[bold]predict membranes"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=Console(stderr=True))
    with progress:
        bar = progress.add_task("predict", total=len(volume))
        result = predict_volume(membrane_model, volume, mito_from, threshold, thin_width, dev,
                                precision, tta, progress=lambda n: progress.advance(bar, n),
                                data=str(data), mito=mito)
    written = write_prediction(out_dir, volume, result.mito, result.prob, result.membranes,
                               result.record)
    out.print(format_plausibility(result.checks, title=f"plausibility of predicted membranes "
                                  f"({len(volume)} slices)"), highlight=False)
    for line in format_scores(result.record):
        out.print(line, highlight=False)
    if figure is not None:
        prediction_figure(figure, volume.image, result.mito, result.membranes,
                          volume.labels.get(MEMBRANE), names=volume.slice_names,
                          crop=figure_crop or None,
                          title=f"{data.parent.name}/{data.name}: membranes predicted from "
                          f"EM + mitochondria ({mito_from})")
        out.print(f"figure: {figure}", highlight=False)
    out.print(f"wrote {written} (images/, masks/, membranes/, membrane_prob.tif)",
              highlight=False)


def _predict_blockwise(model, data, out_dir, layout, slices, mito_from, threshold, thin_width,
                       tta, figure, device, precision, threads, block, shard_id, num_shards,
                       backend, scheduler) -> None:
    import torch

    from emsynth.data.blocks import (
        Lazy,
        backend_client,
        check_blockwise,
        mps_progress,
        open_input,
        parse_block,
        summary,
    )
    from emsynth.engine.device import resolve_device, resolve_precision, thread_count
    from emsynth.errors import input_error
    from emsynth.membranes.predict import (
        MembraneModel,
        load_membrane_blockwise,
        normalization_luts,
        open_membrane_inputs,
        predict_membranes_to_ome_zarr,
    )
    from emsynth.segment.blockwise import blockwise_model

    check_blockwise(out_dir, shard_id, num_shards, backend, scheduler)
    whole_slice_only = [
        (slices is not None, "--slices", "drop it (blocks cover the whole volume)"),
        (thin_width > 0, "--thin-width", "thin a slice-folder prediction (needs whole slices)"),
        (figure is not None, "--figure", "draw it from a slice-folder prediction"),
    ]
    for given, option, fix in whole_slice_only:
        if given:
            raise input_error(option, "does not apply to blockwise prediction", fix)
    torch.set_num_threads(thread_count(threads))
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    membrane_model = MembraneModel.load(model, device=str(dev))
    image, scale, described = open_input(data, layout)
    luts = normalization_luts(membrane_model.normalizer, image)
    inputs = open_membrane_inputs(data, layout, luts, mito_from, str(dev), precision, image=image)
    bw_model = blockwise_model(membrane_model.segmenter, image.shape, dev, precision, tta)
    thr = membrane_model.threshold if threshold is None else threshold
    signature = {"input": str(Path(data).resolve()), "model": str(membrane_model.path.resolve()),
                 "mito_from": mito_from, "threshold": thr, "tta": bw_model.tta,
                 "window": list(bw_model.window), "overlap": bw_model.overlap}
    job_model, job_inputs = bw_model, inputs
    if backend == "dask":  # each worker loads the models and opens the input once
        job_model = Lazy(load_membrane_blockwise, (model, image.shape, device, precision, tta))
        job_inputs = Lazy(open_membrane_inputs, (data, layout, luts, mito_from, device,
                                                 precision))
    with backend_client(backend, scheduler) as client:
        result = predict_membranes_to_ome_zarr(
            job_model, job_inputs, out_dir, threshold=thr, block=parse_block(block),
            shape=image.shape, scale_nm=scale, shard_id=shard_id, num_shards=num_shards,
            signature=signature, client=client,
            progress_factory=mps_progress(f"predict membranes {shard_id + 1}/{num_shards}"))
    out.print(f"{described} -> {out_dir} (image: membrane probabilities, labels/membrane: mask "
              f"at {thr:.3f}, labels/mito: {mito_from}); {summary(result, shard_id, num_shards)}",
              highlight=False)


@app.command("check")
def check_cmd(
    path: Annotated[Path, typer.Argument(help="Volume with membrane labels (any reader layout).")],
    layout: LayoutOpt = "auto",
    min_region_px: Annotated[
        int, typer.Option("--min-region-px", min=1, help="Smallest cell-sized region (px).")
    ] = 150,
    erode_px: Annotated[
        int, typer.Option("--erode-px", min=0, help="Mitochondria erosion before the crossing test.")
    ] = 3,
    json_out: Annotated[
        Path | None, typer.Option("--json", dir_okay=False, help="Also write the numbers as JSON.")
    ] = None,
) -> None:
    """Plausibility numbers of membranes (predicted or true).

    Membrane pixel fraction, share of mitochondrion interiors crossed by membrane, and
    closedness: fragments, cytoplasm in cell-sized regions, open skeleton ends. Compare a
    prediction with ground truth, e.g. ../shared/data/drosophila_vnc.
    """
    from emsynth.data.readers import read_volume
    from emsynth.io import atomic_write_text
    from emsynth.membranes.checks import check_volume, format_plausibility

    volume = read_volume(path, layout)
    checks = check_volume(volume, erode_px, min_region_px, where=path)
    out.print(format_plausibility(checks, title=f"{volume.source}"), highlight=False)
    if json_out is not None:
        atomic_write_text(json_out, json.dumps({"source": volume.source, **checks.as_dict()},
                                               indent=2))


@app.command("figure")
def figure_cmd(
    prediction: Annotated[
        Path, typer.Argument(help="Output folder of `membranes predict` (a slice folder).")
    ],
    out_png: Annotated[Path, typer.Option("--out", "-o", dir_okay=False, help="PNG to write.")],
    truth: Annotated[
        Path | None,
        typer.Option("--truth", help="Dataset with the true membranes of the same slices."),
    ] = None,
    truth_slices: Annotated[
        str | None,
        typer.Option("--truth-slices", help='Slices of --truth the prediction covers, e.g. "16-19".'),
    ] = None,
    rows: Annotated[
        str | None,
        typer.Option("--rows", help="Comma-separated slice positions to draw (default: 3 spread)."),
    ] = None,
    crop: Annotated[
        int, typer.Option("--crop", min=0, help="Centre crop of each panel in px (0 = whole).")
    ] = 512,
) -> None:
    """Draw EM | mitochondria | predicted membranes [| true membranes] from a prediction folder."""
    from emsynth.membranes.figures import prediction_folder_figure

    prediction_folder_figure(prediction, out_png, truth, truth_slices, rows, crop or None)
    out.print(f"wrote {out_png} ({out_png.stat().st_size / 1024:.0f} KB)", highlight=False)
