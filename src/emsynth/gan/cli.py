"""`emsynth gan ...`: train the mask-to-EM pix2pix GAN and synthesise slices with it.

Heavy imports (torch, MONAI) happen inside the commands so `emsynth --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from emsynth.data.blocks import BackendOpt, BlockOpt, NumShardsOpt, SchedulerOpt, ShardIdOpt
from emsynth.engine.cli import TrainOptions, stop_line, train_options
from emsynth.errors import EmsynthError, input_error
from emsynth.options import DeviceOpt, LayoutOpt, PrecisionOpt

app = typer.Typer(
    help="Conditional GAN (pix2pix): train masks -> EM images, synthesise whole slices.",
    no_args_is_help=True,
)
out = Console()

TileOpt = Annotated[
    int | None, typer.Option("--tile", min=1, help="Tile side in px, a multiple of 256 "
                             "(default: the generator's training crop).")
]
WholeSliceOpt = Annotated[
    bool, typer.Option("--whole-slice", help="One generator pass per whole slice instead of "
                       "tiles (InstanceNorm then normalises over the slice).")
]
OverlapOpt = Annotated[
    float, typer.Option("--overlap", min=0.0, max=0.95, help="Tile overlap (fraction of a "
                        "side), blended with Gaussian weights.")
]


@app.command("train")
@train_options(default_config="configs/gan/cpu.yaml", default_run_dir="runs/gan")
def train_cmd(
    opts: TrainOptions,
    data: Annotated[
        list[Path] | None,
        typer.Option("--data", "-d", help="Dataset path (repeatable; default: data.paths of "
                     "the config, or the phantom when that is empty)."),
    ] = None,
    layout: Annotated[
        str | None, typer.Option("--layout", help="Layout of every --data (default: auto).")
    ] = None,
) -> None:
    """Train the pix2pix GAN on paired masks and EM images; the generator lands in
    RUN_DIR/generator.safetensors, image grids in RUN_DIR/images.

    Presets: configs/gan/cpu.yaml (about 25 minutes on 2 CPU cores), spec.yaml (the paper's
    setup, for a GPU), tiny.yaml (seconds, for demos and tests).
    """
    from emsynth.gan.config import GanConfig
    from emsynth.gan.train import train_gan

    cfg = opts.load(GanConfig)
    if data:
        cfg.data.paths = [str(p) for p in data]
    if layout is not None:
        cfg.data.layout = layout
    result = train_gan(cfg, opts.run_dir, resume=opts.resume)
    out.print(stop_line(result), highlight=False)
    if "val/l1" in result:
        out.print(f"validation L1 {result['val/l1']:.4f}, PSNR {result['val/psnr']:.2f} dB",
                  highlight=False)
    out.print(f"generator: {result['generator']}", highlight=False)


PixelNoiseOpt = Annotated[
    float, typer.Option("--pixel-noise", min=0.0, help="Add white Gaussian noise of this std "
                        "(grey levels) to the synthetic images: the generator does not draw "
                        "real slices' detector noise (gan evaluate's pixel-noise rows give both).")
]


@app.command("synthesize")
def synthesize_cmd(
    model: Annotated[Path, typer.Option("--model", "-m", help="GAN run folder or its "
                                        "generator.safetensors.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", file_okay=False,
                                          help="Output slice folder (images/, masks/, ...), or "
                                          "NAME.ome.zarr for a blockwise run.")],
    masks: Annotated[
        Path | None, typer.Option("--masks", help="Dataset holding the conditioning masks "
                                  "(any reader layout; an OME-Zarr is read blockwise).")
    ] = None,
    layout: LayoutOpt = "auto",
    slices: Annotated[
        str | None, typer.Option("--slices", help='Only these slices of --masks, e.g. "0-9".')
    ] = None,
    phantom: Annotated[
        str | None, typer.Option("--phantom", help="Instead of --masks: new masks from the "
                                 "phantom tissue model of this domain (vnc, ca1).")
    ] = None,
    count: Annotated[int, typer.Option("--count", min=1, help="Phantom mask slices.")] = 8,
    size: Annotated[int, typer.Option("--size", min=16, help="Phantom slice side.")] = 1024,
    mask_seed: Annotated[int, typer.Option("--mask-seed", min=0, help="Phantom seed.")] = 0,
    fit_to: Annotated[
        Path | None, typer.Option("--fit-to", help="Fit the phantom's mask geometry to this "
                                  "dataset's masks first.")
    ] = None,
    dropout: Annotated[
        bool, typer.Option("--dropout/--no-dropout",
                           help="Keep dropout on as pix2pix does at test time (its noise source).")
    ] = True,
    seed: Annotated[int, typer.Option("--seed", min=0,
                                      help="Seed of the dropout and decoder noise.")] = 0,
    tile: TileOpt = None,
    whole_slice: WholeSliceOpt = False,
    overlap: OverlapOpt = 0.25,
    pixel_noise: PixelNoiseOpt = 0.0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    block: BlockOpt = None,
    shard_id: ShardIdOpt = 0,
    num_shards: NumShardsOpt = 1,
    backend: BackendOpt = "local",
    scheduler: SchedulerOpt = None,
) -> None:
    """Synthesise one EM image per mask slice and write them with the masks as a slice folder.

    Tiles of the training crop, overlapping and blended (InstanceNorm sees a crop, as in
    training); --whole-slice runs one generator pass per whole slice instead. Each tile's noise
    is seeded from its position, so any split of the volume gives the same image. The masks
    come from a dataset (--masks) or are new, from the phantom tissue model (--phantom),
    optionally fitted to a real mask set (--fit-to). The output is ready for segmentation
    training.

    With OUT ending in .zarr (or --block) the synthesis runs blockwise with bounded memory
    into an OME-Zarr (image: synthetic EM, labels/<channel>: the masks); an OME-Zarr --masks
    (e.g. from `emsynth membranes predict -o NAME.ome.zarr`) is then read block by block.
    Resumable, --shard-id/--num-shards and --backend dask as in `emsynth segment predict`.
    """
    from emsynth.data.blocks import check_blockwise, parse_block
    from emsynth.data.readers import read_volume
    from emsynth.data.slices import parse_slices
    from emsynth.data.writers import write_slice_folder
    from emsynth.engine.device import resolve_device
    from emsynth.gan.export import load_generator
    from emsynth.gan.inference import choose_tiling, synthesize_volume
    from emsynth.synthesis.masks import phantom_masks

    if (masks is None) == (phantom is None):
        raise EmsynthError("give exactly one mask source. Fix: pass --masks DATASET or "
                           "--phantom vnc")
    blockwise = (block is not None or out_dir.suffix == ".zarr" or num_shards > 1
                 or backend != "local")
    if blockwise:
        check_blockwise(out_dir, shard_id, num_shards, backend, scheduler)
        if whole_slice:
            raise input_error("--whole-slice", "does not apply to blockwise synthesis (blocks "
                              "are tiled)", "drop --whole-slice, or write a slice folder")
        if slices is not None:
            raise input_error("--slices", "does not apply to blockwise synthesis",
                              "drop --slices (blocks cover the whole volume)")
        if pixel_noise:
            raise input_error("--pixel-noise", "is not yet supported by blockwise synthesis",
                              "drop it, or write a slice folder (OUT not ending in .zarr)")
    dev = resolve_device(device)
    generator, conditioning, meta = load_generator(model, dev)
    tiling = choose_tiling(model, meta, tile, whole_slice, overlap)
    if blockwise and masks is not None:
        from emsynth.data.omezarr import is_ome_zarr

        if is_ome_zarr(masks):
            _synthesize_blockwise(model, masks, None, out_dir, generator, conditioning, tiling,
                                  dropout, seed, device, precision, parse_block(block),
                                  shard_id, num_shards, backend, scheduler)
            return
    if masks is not None:
        volume = read_volume(masks, layout)
        if slices is not None:
            volume = volume.select(parse_slices(slices, len(volume), "--slices"))
    else:
        like = read_volume(fit_to, layout) if fit_to is not None else None
        volume = phantom_masks(phantom, count, (size, size), mask_seed, like=like)
    if blockwise:
        _synthesize_blockwise(model, masks, volume, out_dir, generator, conditioning, tiling,
                              dropout, seed, device, precision, parse_block(block), shard_id,
                              num_shards, backend, scheduler)
        return
    synthetic = synthesize_volume(generator, volume, conditioning, dropout=dropout, seed=seed,
                                  device=dev, precision=precision, progress=True, tiling=tiling,
                                  pixel_noise=pixel_noise)
    write_slice_folder(synthetic, out_dir)
    how = f"tiles of {tiling.tile} px" if tiling else "whole slices"
    out.print(f"wrote {len(synthetic)} synthetic slices to {out_dir} ({how}, conditioned on "
              f"{', '.join(conditioning.channels)})", highlight=False)


def _synthesize_blockwise(model, masks, volume, out_dir, generator, conditioning, tiling,
                          dropout, seed, device, precision, block, shard_id, num_shards,
                          backend, scheduler) -> None:
    """Blockwise synthesis from an OME-Zarr's labels (volume None) or an in-memory Volume."""
    from emsynth.data.blocks import Lazy, backend_client, mps_progress, summary
    from emsynth.data.omezarr import open_ome_zarr, scale_of
    from emsynth.gan.inference import (
        check_conditioning,
        load_generator_only,
        mask_arrays,
        synthesize_to_ome_zarr,
    )

    check_conditioning(generator, conditioning, model)
    channels = conditioning.channels
    if volume is None:
        arrays = mask_arrays(masks, channels)
        scale = open_ome_zarr(masks).scale_nm
        source = f"{masks}"
    else:
        conditioning.check(volume, "mask volume")
        arrays = {c: volume.labels[c] for c in channels}
        scale = scale_of(volume)
        source = volume.source or "phantom masks"
    shape = tuple(arrays[channels[0]].shape)
    job_generator, job_masks = generator, arrays
    if backend == "dask":  # each worker loads the generator (and opens the masks) once
        job_generator = Lazy(load_generator_only, (model, device))
        if volume is None:
            job_masks = Lazy(mask_arrays, (masks, channels))
    signature = {"masks": str(Path(masks).resolve()) if masks else source,
                 "model": str(Path(model).resolve())}
    with backend_client(backend, scheduler) as client:
        result = synthesize_to_ome_zarr(
            job_generator, job_masks, out_dir, conditioning, tiling, shape=shape, block=block,
            dropout=dropout, seed=seed, device=device, precision=precision, scale_nm=scale,
            shard_id=shard_id, num_shards=num_shards, signature=signature, client=client,
            progress_factory=mps_progress(f"synthesize {shard_id + 1}/{num_shards}"),
        )
    out.print(f"{source} -> {out_dir} (image: synthetic EM from tiles of {tiling.tile} px, "
              f"labels/{', labels/'.join(channels)}); "
              f"{summary(result, shard_id, num_shards, 'synthesized')}", highlight=False)


@app.command("evaluate")
def evaluate_cmd(
    generator: Annotated[Path, typer.Option("--generator", "-g", help="GAN run folder or its "
                                            "generator.safetensors.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Real images with their masks "
                                       "(mito plus the generator's other conditioning labels).")],
    segmenter: Annotated[Path, typer.Option("--segmenter", "-s", help="Mito segmenter trained "
                                            "on real images: `emsynth segment train` run "
                                            "folder or its model folder.")],
    layout: LayoutOpt = "auto",
    slices: Annotated[
        str | None, typer.Option("--slices", help='Only these slices of --data, e.g. "16-19" '
                                 "(best: slices neither network trained on).")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", dir_okay=False, help="Also write the scores here.")
    ] = None,
    crops: Annotated[int, typer.Option("--crops", min=2, help="Random crops per side for "
                                       "FID/KID.")] = 64,
    crop_size: Annotated[int, typer.Option("--crop-size", min=16, help="Side of those crops "
                                           "(shrunk to fit the slices).")] = 256,
    kid_subsets: Annotated[int, typer.Option("--kid-subsets", min=1,
                                             help="Random subsets (of half the crops) KID "
                                             "averages over.")] = 100,
    dropout: Annotated[
        bool, typer.Option("--dropout/--no-dropout", help="Dropout on at synthesis, as "
                           "pix2pix does at test time.")
    ] = True,
    seed: Annotated[int, typer.Option("--seed", min=0,
                                      help="Seed of dropout, decoder noise and crops.")] = 0,
    tstr_steps: Annotated[
        int, typer.Option("--tstr-steps", min=0, help="Also TSTR: train a segmenter this many "
                          "steps on synthetic images of the first half of the slices and one "
                          "on their real images, score both on the real rest (0 = skip).")
    ] = 0,
    tstr_config: Annotated[
        Path | None, typer.Option("--tstr-config", dir_okay=False, help="Segmenter recipe for "
                                  "TSTR (a configs/segment YAML; default: the segment defaults).")
    ] = None,
    tstr_dir: Annotated[
        Path | None, typer.Option("--tstr-dir", file_okay=False, help="Keep TSTR's two "
                                  "segmenters here (default: a temporary folder).")
    ] = None,
    tstr_cache: Annotated[
        Path | None, typer.Option("--tstr-cache", file_okay=False, help="Keep TSTR's "
                                  "real-trained reference here, keyed by the real slices and "
                                  "the recipe, and reuse it for every generator scored on them.")
    ] = None,
    tile: TileOpt = None,
    whole_slice: WholeSliceOpt = False,
    overlap: OverlapOpt = 0.25,
    pixel_noise: PixelNoiseOpt = 0.0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Score the generator's images against the real ones of the same masks, offline.

    FCN-score (a real-trained segmenter's foreground IoU on synthetic vs real images; the
    ratio is the headline), SSIM/PSNR to the paired real slice, FID/KID on the segmenter's
    encoder features (no Inception download; comparable only with the same segmenter) next to
    their real-vs-real baseline, texture statistics (power-spectrum distance, local-std W1 in
    cytoplasm and mitochondria), the grey-level Wasserstein-1 distance and, with --tstr-steps,
    TSTR (train on synthetic, test on real, as a ratio to the real-trained recipe). The
    synthetic slices are made as `emsynth gan synthesize` makes them: tiles of the training
    crop, or one pass per slice with --whole-slice, with --pixel-noise added if given.
    """
    import json

    from rich.table import Table

    from emsynth.data.readers import read_volume
    from emsynth.data.slices import parse_slices
    from emsynth.engine.device import resolve_device
    from emsynth.engine.runinfo import provenance
    from emsynth.gan.inference import choose_tiling
    from emsynth.gan.quality import PSNR_CAP_DB, evaluate_generator, load_segmenter
    from emsynth.io import atomic_write_text

    load_segmenter(segmenter)  # fail on a wrong path before reading data or synthesising
    tiling = choose_tiling(generator, None, tile, whole_slice, overlap)
    recipe = None
    if tstr_steps and tstr_config is not None:
        from emsynth.config import load_config
        from emsynth.segment.config import SegmentConfig

        recipe = load_config(SegmentConfig, tstr_config)
    volume = read_volume(data, layout)
    if slices is not None:
        volume = volume.select(parse_slices(slices, len(volume), "--slices"))
    run_device = resolve_device(device)
    scores = evaluate_generator(generator, volume, segmenter, crops=crops, crop_size=crop_size,
                                seed=seed, dropout=dropout, kid_subsets=kid_subsets,
                                device=run_device, precision=precision,
                                progress=True, tstr_steps=tstr_steps, tstr_config=recipe,
                                tstr_dir=tstr_dir, tstr_cache=tstr_cache, tiling=tiling,
                                pixel_noise=pixel_noise)
    table = Table(title=f"GAN quality on {scores['slices']} slices of {data}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("note")
    rows = [
        ("FCN-score ratio", f"{scores['fcn_ratio']:.3f}", "synthetic / real, 1 = as good"),
        ("FCN-score synthetic", f"{scores['fcn_iou_synthetic']:.4f}",
         "foreground IoU (whole volume)"),
        ("FCN-score real", f"{scores['fcn_iou_real']:.4f}", "foreground IoU (whole volume)"),
        ("SSIM", f"{scores['ssim']:.4f}", "to the paired real slice, mean"),
        ("PSNR", f"{scores['psnr_db']:.2f} dB", f"mean, capped at {PSNR_CAP_DB:.0f}"),
        ("FID", f"{scores['fid']:.4g}", f"segmenter encoder, {scores['feature_dim']} features"),
        ("KID", f"{scores['kid']:.4g} ± {scores['kid_std']:.2g}",
         f"{scores['crops']} crops of {scores['crop_size']} px"),
        ("FID − FID(real, real)", f"{scores['fid_minus_baseline']:.4g}",
         f"real-vs-real baseline {scores['fid_baseline']:.4g} at the same n"),
        ("KID real-vs-real", f"{scores['kid_baseline']:.4g}", "baseline at the same n"),
        ("spectrum distance", f"{scores['spectrum_distance']:.3f}",
         "radial log10 power spectra, mean |difference|; flat images score high"),
        ("local-std W1 cytoplasm", f"{scores['local_std_w1_cytoplasm']:.2f}",
         "grey levels, 7x7 windows"),
        ("local-std W1 mito", f"{scores['local_std_w1_mito']:.2f}", "grey levels, 7x7 windows"),
        ("lattice mito", f"{scores['lattice_mito']:.3f}",
         f"peak share of 32 px windows; real {scores['lattice_mito_real']:.3f}"),
        ("lattice cytoplasm", f"{scores['lattice_cytoplasm']:.3f}",
         f"peak share of 32 px windows; real {scores['lattice_cytoplasm_real']:.3f}"),
        ("pixel noise cytoplasm", f"{scores['pixel_noise_cytoplasm']:.2f}",
         f"grey levels (Immerkaer); real {scores['pixel_noise_cytoplasm_real']:.2f}"),
        ("pixel noise mito", f"{scores['pixel_noise_mito']:.2f}",
         f"grey levels (Immerkaer); real {scores['pixel_noise_mito_real']:.2f}"),
        ("grey-level W1", f"{scores['grey_level_w1']:.2f}",
         (f"mean grey real {scores['mean_grey_real']:.1f}, "
          f"synthetic {scores['mean_grey_synthetic']:.1f}")),
    ]
    if "tstr_ratio" in scores:
        rows += [
            ("TSTR ratio", f"{scores['tstr_ratio']:.3f}",
             "synthetic-trained / real-trained IoU on real held-out slices"),
            ("TSTR synthetic-trained", f"{scores['tstr_iou_synthetic']:.4f}",
             f"{scores['tstr_steps']} steps, trained on slices {scores['tstr_train_slices']}"),
            ("TSTR synthetic on synthetic", f"{scores['tstr_iou_synthetic_on_synthetic']:.4f}",
             "the synthetic-trained segmenter on synthetic images of the scored slices"),
            ("TSTR real-trained", f"{scores['tstr_iou_real']:.4f}",
             f"scored on real slices {scores['tstr_test_slices']}"),
        ]
    for row in rows:
        table.add_row(*row)
    out.print(table)
    if json_out is not None:
        record = {**scores, "provenance": provenance(run_device, precision)}
        atomic_write_text(json_out, json.dumps(record, indent=2))
        out.print(f"wrote {json_out}", highlight=False)


@app.command("figure")
def figure_cmd(
    generators: Annotated[list[Path], typer.Option("--generator", "-g", help="GAN run folder or "
                                                   "generator file (repeatable: one column "
                                                   "each, e.g. an ablation).")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Real images with the masks the "
                                       "generators are conditioned on.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", dir_okay=False, help="PNG to write.")],
    layout: LayoutOpt = "auto",
    slices: Annotated[
        str | None, typer.Option("--slices", help='Rows: these slices of --data, e.g. "18-19" '
                                 "(default: 3 evenly spread).")
    ] = None,
    crop: Annotated[int, typer.Option("--crop", min=0, help="Centre crop side in px (0 = whole "
                                      "slice).")] = 512,
    dropout: Annotated[
        bool, typer.Option("--dropout/--no-dropout", help="Dropout on at synthesis.")
    ] = True,
    seed: Annotated[int, typer.Option("--seed", min=0,
                                      help="Seed of the dropout and decoder noise.")] = 0,
    device: DeviceOpt = "auto",
    title: Annotated[str, typer.Option("--title", help="Figure title.")] = "",
) -> None:
    """Masks | real | synthetic side by side on the same slices (the study's Figures 4-5).

    Each generator gets a column titled by its conditioning channels, so `-g with_membranes
    -g mito_only` shows by eye what the membranes add.
    """
    from emsynth.data.figures import default_slices
    from emsynth.data.readers import read_volume
    from emsynth.data.slices import parse_slices
    from emsynth.engine.device import resolve_device
    from emsynth.gan.export import load_generator
    from emsynth.gan.figures import comparison_figure
    from emsynth.gan.inference import synthesize_volume

    if out_path.suffix.lower() != ".png":
        raise EmsynthError(f"{out_path}: the figure is written as PNG. Fix: end --out in .png")
    dev = resolve_device(device)
    loaded = [(path, *load_generator(path, dev)[:2]) for path in generators]
    volume = read_volume(data, layout)
    rows = (parse_slices(slices, len(volume), "--slices") if slices is not None
            else default_slices(len(volume)))
    used = {name for _, _, conditioning in loaded for name in conditioning.channels}
    volume = volume.select(rows)
    volume.labels = {name: lab for name, lab in volume.labels.items() if name in used}
    columns: dict[str, object] = {}
    labels = [f"synthetic ({' + '.join(conditioning.channels)})" for _, _, conditioning in loaded]
    for label, (path, generator, conditioning) in zip(labels, loaded):
        # Generators on the same masks are told apart by their run folder, every one of them.
        name = Path(path).name if labels.count(label) > 1 else label
        columns[name] = synthesize_volume(generator, volume, conditioning, dropout=dropout,
                                          seed=seed, device=dev, precision="fp32").image
    comparison_figure(out_path, volume, columns, rows=list(range(len(volume))), crop=crop or None,
                      title=title)
    out.print(f"wrote {out_path} ({len(volume)} slices, {len(columns)} generator(s))",
              highlight=False)
