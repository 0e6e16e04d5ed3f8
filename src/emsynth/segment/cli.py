"""`emsynth segment ...`: train a segmenter, predict with it, evaluate predictions.

Heavy imports (torch, MONAI) happen inside the commands so `emsynth --help` stays fast.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from emsynth.data.blocks import BackendOpt, BlockOpt, NumShardsOpt, SchedulerOpt, ShardIdOpt
from emsynth.engine.cli import TrainOptions, stop_line, train_options
from emsynth.errors import input_error
from emsynth.io import atomic_write_text
from emsynth.options import DeviceOpt, LayoutOpt, PrecisionOpt

app = typer.Typer(
    help="Binary segmentation (mitochondria by default): train a U-Net, predict, evaluate.",
    no_args_is_help=True,
)
out = Console()

MaskDirOpt = Annotated[
    str | None,
    typer.Option(
        "--mask-dir", help="Mask folder beside images/ (generic layout), e.g. masks_epfl."
    ),
]
LabelOpt = Annotated[
    str, typer.Option("--label", help="Label the masks hold / to score: mito, membrane or synapse.")
]


def _read(path: Path, layout: str, mask_dir: str | None, label: str, slices: str | None):
    """read_volume, then keep only `slices` (a spec like "145-164") when given."""
    from emsynth.data.readers import read_volume
    from emsynth.data.slices import parse_slices

    volume = read_volume(path, layout, mask_dir=mask_dir, label=label)
    if slices is None:
        return volume
    return volume.select(parse_slices(slices, len(volume), "--slices"))


@app.command("train")
@train_options(default_config=None, default_run_dir="runs/segment")
def train_cmd(
    opts: TrainOptions,
    data: Annotated[Path, typer.Option("--data", "-d", help="Dataset path (any reader layout).")],
    layout: LayoutOpt = "auto",
    mask_dir: MaskDirOpt = None,
    label: LabelOpt = "mito",
    train_slices: Annotated[
        str | None,
        typer.Option(
            "--train-slices", help='Training slices, e.g. "0-144" (default: all but val).'
        ),
    ] = None,
    val_slices: Annotated[
        str | None,
        typer.Option(
            "--val-slices",
            help='Validation block, e.g. "145-164" (default: the last data.val_block slices).',
        ),
    ] = None,
) -> None:
    """Train a U-Net segmenter with the shared engine; the model lands in RUN_DIR/model.

    Presets: --config configs/segment/cpu.yaml (20 minutes on 2 CPU cores) or full.yaml (GPU).
    Without --config the SegmentConfig defaults apply.
    """
    from emsynth.segment.config import SegmentConfig
    from emsynth.segment.metrics import IOU_NAME
    from emsynth.segment.train import MODEL_DIR, train_segmenter

    cfg = opts.load(SegmentConfig)
    if train_slices is not None:
        cfg.data.train_slices = train_slices
    if val_slices is not None:
        cfg.data.val_slices = val_slices
    volume = _read(data, layout, mask_dir, label, None)
    meta = {"data": str(data), "layout": layout, "mask_dir": mask_dir}
    result = train_segmenter(cfg, volume, opts.run_dir, resume=opts.resume, meta=meta)
    out.print(stop_line(result), highlight=False)
    final = result["final"]
    if final:
        out.print(
            f"validation {IOU_NAME}: {final['fg_iou']:.4f} at threshold "
            f"{final['threshold']:.3f} ({final['fg_iou@0.5']:.4f} at 0.5); "
            f"Dice {final['fg_dice']:.4f}",
            highlight=False,
        )
    out.print(f"model: {opts.run_dir / MODEL_DIR}", highlight=False)


def _predict_blockwise(input_path, model, out_dir, tta, layout, mask_dir, label, slices,
                       float_prob, device, precision, block, shard_id, num_shards, backend,
                       scheduler) -> None:
    from emsynth.data.blocks import (
        Lazy,
        backend_client,
        check_blockwise,
        input_array,
        mps_progress,
        open_input,
        parse_block,
        summary,
    )
    from emsynth.engine.device import resolve_device
    from emsynth.segment.blockwise import (
        blockwise_model,
        load_blockwise_model,
        predict_to_ome_zarr,
    )
    from emsynth.segment.model import Segmenter

    check_blockwise(out_dir, shard_id, num_shards, backend, scheduler)
    if slices is not None:
        raise input_error("--slices", "does not apply to blockwise prediction",
                          "drop --slices (blocks cover the whole volume) or write TIFFs")
    block_shape = parse_block(block)
    dev = resolve_device(device)
    segmenter = Segmenter.load(model, device=dev)
    if segmenter.channel_names != ["image"]:
        raise input_error(model, f"model reads channels {segmenter.channel_names}; blockwise "
                          "prediction feeds the image only", "predict without --block into TIFFs")
    source, scale, described = open_input(input_path, layout, mask_dir=mask_dir, label=label)
    bw_model = blockwise_model(segmenter, source.shape, dev, precision, tta)
    target = segmenter.target_name or label
    signature = {"input": str(Path(input_path).resolve()), "model": str(Path(model).resolve()),
                 "threshold": segmenter.threshold, "tta": bw_model.tta, "target": target,
                 "window": list(bw_model.window), "overlap": bw_model.overlap}
    job_model, job_source = bw_model, source
    if backend == "dask":  # each worker loads the model and opens the input once
        job_model = Lazy(load_blockwise_model, (model, source.shape, device, precision, tta))
        job_source = Lazy(input_array, (input_path, layout, mask_dir, label))
    with backend_client(backend, scheduler) as client:
        result = predict_to_ome_zarr(
            job_model, job_source, out_dir, threshold=segmenter.threshold, label=target,
            block=block_shape, scale_nm=scale, float_prob=float_prob, shard_id=shard_id,
            num_shards=num_shards, signature=signature, shape=source.shape, client=client,
            progress_factory=mps_progress(f"predict {shard_id + 1}/{num_shards}"),
        )
    out.print(
        f"{described} -> {out_dir} (image: probabilities, labels/{target}: mask at "
        f"{segmenter.threshold:.3f}); {summary(result, shard_id, num_shards)}",
        highlight=False,
    )


@app.command("predict")
def predict_cmd(
    input_path: Annotated[
        Path, typer.Argument(metavar="INPUT", help="Volume: any reader layout or a TIFF stack.")
    ],
    model: Annotated[Path, typer.Option("--model", "-m", help="Model folder (RUN_DIR/model).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", file_okay=False, help="Output folder.")],
    tta: Annotated[
        bool | None,
        typer.Option("--tta/--no-tta", help="8-way flip/rot90 averaging (default: the model's)."),
    ] = None,
    layout: LayoutOpt = "auto",
    mask_dir: MaskDirOpt = None,
    label: LabelOpt = "mito",
    slices: Annotated[
        str | None, typer.Option("--slices", help='Only these slices, e.g. "145-164".')
    ] = None,
    float_prob: Annotated[
        bool, typer.Option("--float-prob", help="Probabilities as float32 (default uint8 0-255).")
    ] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    block: BlockOpt = None,
    shard_id: ShardIdOpt = 0,
    num_shards: NumShardsOpt = 1,
    backend: BackendOpt = "local",
    scheduler: SchedulerOpt = None,
) -> None:
    """Write probability and binary-mask TIFF stacks (OUT/prob.tif, OUT/mask.tif) for a volume.

    The mask uses the threshold chosen on validation and saved with the model.

    With OUT ending in .zarr (or --block given) the prediction runs blockwise with bounded
    memory into an OME-Zarr: the probabilities as its image, the mask as labels/<target>. Each
    finished block leaves a done-marker, so rerunning the same command resumes a killed run;
    --shard-id/--num-shards split the blocks across processes writing the same OUT;
    --backend dask runs them on a dask cluster (one model per worker). The last block to
    finish writes the multiscale pyramid (y, x halved per level).
    """
    if block is not None or out_dir.suffix == ".zarr" or num_shards > 1 or backend != "local":
        _predict_blockwise(input_path, model, out_dir, tta, layout, mask_dir, label, slices,
                           float_prob, device, precision, block, shard_id, num_shards, backend,
                           scheduler)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from emsynth.engine.device import resolve_device, resolve_precision
    from emsynth.segment.infer import predict_with, probability_to_uint8, write_tiff_stack
    from emsynth.segment.model import Segmenter
    from emsynth.segment.sampling import segment_data

    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    segmenter = Segmenter.load(model, device=dev)
    with warnings.catch_warnings():
        # Prediction needs no ground truth: the reader's note that none was found is noise here.
        warnings.filterwarnings("ignore", message=".*no ground truth.*")
        volume = _read(input_path, layout, mask_dir, label, slices)
    data = segment_data(volume, segmenter.channel_names, None)
    progress = Progress(
        TextColumn("[bold]predict"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    with progress:
        bar = progress.add_task("predict", total=len(data))
        prob = predict_with(
            segmenter, data.inputs, dev, precision, tta, progress=lambda n: progress.advance(bar, n)
        )
    mask = (prob >= segmenter.threshold).astype("uint8") * 255
    write_tiff_stack(out_dir / "prob.tif", prob if float_prob else probability_to_uint8(prob))
    write_tiff_stack(out_dir / "mask.tif", mask)
    record = {
        "input": str(input_path),
        "source": volume.source,
        "model": str(model),
        "threshold": segmenter.threshold,
        "tta": segmenter.infer.tta if tta is None else tta,
        "target": segmenter.target_name,
        "slice_names": volume.slice_names,
        "prob": "prob.tif (float32 0-1)" if float_prob else "prob.tif (uint8, 255 = 1.0)",
        "mask": "mask.tif (uint8, 255 = foreground)",
    }
    atomic_write_text(out_dir / "predict.json", json.dumps(record, indent=2))
    out.print(
        f"wrote {out_dir / 'prob.tif'} and {out_dir / 'mask.tif'} ({len(data)} slices, "
        f"threshold {segmenter.threshold:.3f})",
        highlight=False,
    )


def _read_prediction(path: Path, threshold: float):
    """Binary (z, y, x) from a mask or probability TIFF stack (uint8 0-255 or float 0-1)."""
    import numpy as np
    import tifffile

    if not path.is_file():
        raise input_error(
            path, "does not exist", "pass the mask.tif or prob.tif written by predict"
        )
    try:
        stack = tifffile.imread(path)
    except (tifffile.TiffFileError, ValueError) as err:
        raise input_error(path, f"not a readable TIFF ({err})", "pass a TIFF stack") from None
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3:
        raise input_error(
            path, f"has shape {stack.shape}, not (slices, y, x)", "pass a greyscale TIFF stack"
        )
    if stack.dtype == np.bool_:
        return stack
    if np.issubdtype(stack.dtype, np.floating):
        return stack >= threshold
    if stack.dtype != np.uint8:
        raise input_error(path, f"has dtype {stack.dtype}", "pass uint8 (0-255) or float (0-1)")
    return stack >= int(np.ceil(threshold * 255))


@app.command("evaluate")
def evaluate_cmd(
    prediction: Annotated[
        Path, typer.Argument(help="Predicted mask.tif or prob.tif (a TIFF stack).")
    ],
    truth: Annotated[Path, typer.Option("--truth", "-t", help="Ground truth: any reader layout.")],
    layout: LayoutOpt = "auto",
    mask_dir: MaskDirOpt = None,
    label: LabelOpt = "mito",
    slices: Annotated[
        str | None,
        typer.Option("--slices", help='Truth slices the prediction covers, e.g. "145-164".'),
    ] = None,
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold",
            min=0.0,
            max=1.0,
            help="Probability stacks: foreground where >= this (masks: any value >= it).",
        ),
    ] = 0.5,
    json_out: Annotated[
        Path | None, typer.Option("--json", dir_okay=False, help="Also write the scores as JSON.")
    ] = None,
) -> None:
    """Score a prediction TIFF stack against ground truth from any reader layout.

    Prints foreground IoU (whole volume), Dice, precision, recall and per-slice IoU.
    """
    from emsynth.segment.metrics import IOU_NAME, format_scores, score_volume

    pred = _read_prediction(prediction, threshold)
    volume = _read(truth, layout, mask_dir, label, slices)
    if label not in volume.labels:
        raise input_error(
            truth,
            f"has no {label!r} labels (has {sorted(volume.labels)})",
            "pass --label with one of those, or a dataset with these labels",
        )
    target = volume.labels[label]
    if pred.shape != target.shape:
        raise input_error(
            prediction,
            f"has shape {pred.shape} but the truth has {target.shape}",
            "predict the same slices (select the truth slices it covers with --slices)",
        )
    scores = score_volume(pred, target)
    out.print(
        format_scores(scores, title=f"{prediction} vs {volume.source} ({label})"), highlight=False
    )
    if json_out is not None:
        record = {
            "prediction": str(prediction),
            "truth": volume.source,
            "label": label,
            "iou_is": IOU_NAME,
            **scores.as_dict(),
        }
        atomic_write_text(json_out, json.dumps(record, indent=2))
