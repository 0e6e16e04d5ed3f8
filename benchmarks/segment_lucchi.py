"""Mitochondria segmentation on Lucchi++ (EPFL CA1 training volume): train a preset, report.

Splits the volume as `emsynth segment train` does (`emsynth.segment.train.resolve_split`, i.e.
`emsynth.data.slices.split_blocks`): with the presets' data.val_block 20 and data.val_gap 5, it
validates on the contiguous block 145-164 and trains on 0-139; the 5 slices between never train
(neighbouring slices are near-duplicates, correlated at ~0.9, so a training slice next to the
validation block would make the figures optimistic). `--set data.val_gap=0` gives the old split
(0-144 / 145-164) for comparison with figures measured before the gap. Prints:
validation foreground IoU (whole volume) and Dice at the chosen threshold and at 0.5, training
images/s, inference megapixels/s over the validation slices, peak RSS, and the engine's
training images/s against a plain eager fp32 loop over the same model and batches.

    .venv/bin/python benchmarks/segment_lucchi.py --preset cpu            # the 20-minute run
    .venv/bin/python benchmarks/segment_lucchi.py --preset cpu --max-time 2m --out /tmp/smoke
    .venv/bin/python benchmarks/segment_lucchi.py --preset reference      # the plain bar
    .venv/bin/python benchmarks/segment_lucchi.py --labels masks_epfl --train-slices 10
    .venv/bin/python benchmarks/segment_lucchi.py --single-crop --max-time 1m
    .venv/bin/python benchmarks/segment_lucchi.py --ratio-only --engine-steps 20   # step speed

`--preset reference` is the plain bar the cpu preset must beat: MONAI UNet 16-256 with 2
residual units, DiceCE, precision auto, batch 8 of 256^2, flips/rot90 only, Adam 1e-3 cosine, no
foreground sampling, no TTA, threshold 0.5, 20 minutes of training (the cpu preset with its
warps, TTA and threshold choice switched off).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from emsynth.config import load_config
from emsynth.data.readers import read_volume
from emsynth.data.slices import evenly_spaced
from emsynth.engine.device import cpu_kind, resolve_device, resolve_precision, thread_count
from emsynth.engine.metrics import read_metrics_csv
from emsynth.engine.trainer import train
from emsynth.io import atomic_write_text
from emsynth.segment import augment
from emsynth.segment.config import SegmentConfig
from emsynth.segment.infer import predict_with
from emsynth.segment.metrics import IOU_NAME, counts
from emsynth.segment.model import Segmenter, build_model, to_float
from emsynth.segment.sampling import SegmentData, segment_data
from emsynth.segment.task import SegmentLoss, SegmentTask
from emsynth.segment.train import MODEL_DIR, fit, resolve_split

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "lucchi_pp" / "train"
CROP = 256

REFERENCE_OVERRIDES = [
    "augment.elastic_prob=0.0",
    "augment.rotate_prob=0.0",
    "augment.scale_range=0.0",
    "infer.tta=false",
    "threshold.choose=false",
    "engine.max_time=20m",
    "engine.val_every=0",
]


def load_preset(name: str, overrides: list[str]) -> SegmentConfig:
    preset = "cpu" if name == "reference" else name
    extra = REFERENCE_OVERRIDES if name == "reference" else []
    return load_config(SegmentConfig, ROOT / "configs" / "segment" / f"{preset}.yaml",
                       [*extra, *overrides])


def single_crop(data: SegmentData) -> SegmentData:
    """One CROP x CROP crop from the centre of the middle training slice."""
    z = len(data) // 2
    h, w = data.inputs.shape[-2:]
    y0, x0 = (h - CROP) // 2, (w - CROP) // 2
    return SegmentData(
        inputs=data.inputs[z : z + 1, :, y0 : y0 + CROP, x0 : x0 + CROP].copy(),
        target=data.target[z : z + 1, y0 : y0 + CROP, x0 : x0 + CROP].copy(),
        channel_names=data.channel_names,
        target_name=data.target_name,
        slice_names=[f"{data.slice_names[z]}[{y0}:{y0 + CROP},{x0}:{x0 + CROP}]"],
    )


def engine_vs_plain(cfg: SegmentConfig, train_data: SegmentData, steps: int) -> dict:
    """Training images/s of the engine and of a plain eager fp32 loop, same model and batches.

    Both start from a freshly built model and draw their batches from a generator seeded
    alike (the engine's batch stream is default_rng(seed)), so they see identical batches.
    """
    short = cfg.model_copy(deep=True)
    short.engine = short.engine.model_copy(update={
        "steps": steps, "max_time": None, "val_every": 0, "checkpoint_every": 0,
        "log_every": 0, "image_every": 0,
    })
    with tempfile.TemporaryDirectory() as tmp:
        result = train(SegmentTask(short, train_data, None), short.engine, tmp, resume=False)
    engine_ips = steps * cfg.sampling.batch_size / result["elapsed_s"]

    device = resolve_device(cfg.engine.device)
    torch.manual_seed(cfg.engine.seed)
    net = build_model(cfg.model, len(train_data.channel_names)).to(device)
    task = SegmentTask(cfg, train_data, None)  # only for its sampler and loss settings
    rng = np.random.default_rng(cfg.engine.seed)
    batches = [task.sample_batch(rng) for _ in range(steps)]
    opt_cls = torch.optim.AdamW if cfg.optim.name == "adamw" else torch.optim.Adam
    optimizer = opt_cls(net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    loss_fn = SegmentLoss(cfg.loss)  # the task's own loss (DiceCE, + clDice if configured)
    channels = task.intensity_channels
    threads = torch.get_num_threads()
    torch.set_num_threads(thread_count(cfg.engine.num_threads))  # as many as the engine had
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        x = to_float(torch.from_numpy(batch.inputs).to(device))
        y = torch.from_numpy(batch.target).to(device).float()
        x, y = augment.apply(x, y, batch.params, channels)
        loss = loss_fn(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    plain_ips = steps * cfg.sampling.batch_size / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return {"steps": steps, "engine_images_per_s": engine_ips,
            "engine_precision": resolve_precision(cfg.engine.precision, device),
            "plain_fp32_images_per_s": plain_ips, "ratio": engine_ips / plain_ips}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def infer_and_score(model_dir: Path, val: SegmentData, device: torch.device, precision: str,
                    tta: bool) -> dict:
    segmenter = Segmenter.load(model_dir, device=device)
    _sync(device)
    start = time.perf_counter()
    prob = predict_with(segmenter, val.inputs, device, precision, tta=tta)
    _sync(device)
    seconds = time.perf_counter() - start
    chosen = counts(prob >= segmenter.threshold, val.target)
    half = counts(prob >= 0.5, val.target)
    return {
        "tta": tta, "threshold": segmenter.threshold,
        "iou": chosen.iou, "dice": chosen.dice, "iou@0.5": half.iou, "dice@0.5": half.dice,
        "megapixels_per_s": prob.size / seconds / 1e6, "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="lucchi_pp/train folder")
    parser.add_argument("--labels", choices=["masks", "masks_epfl"], default="masks",
                        help="Lucchi++ labels (masks) or the original EPFL ones (masks_epfl)")
    parser.add_argument("--train-slices", type=int, default=None, metavar="N",
                        help="train on N slices evenly spaced over the training slices (default: "
                        "all of them: 0-139 with the presets' split)")
    parser.add_argument("--single-crop", action="store_true",
                        help=f"train on one {CROP}x{CROP} crop of one slice")
    parser.add_argument("--preset", choices=["cpu", "full", "reference"], default="cpu")
    parser.add_argument("--max-time", default=None, help='training budget, e.g. "2m"')
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="extra config override (repeatable)")
    parser.add_argument("--engine-steps", type=int, default=10,
                        help="steps of each side of the engine-vs-plain comparison (0 = skip)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temp dir)")
    parser.add_argument("--ratio-only", action="store_true",
                        help="only the engine-vs-plain comparison (--engine-steps), no training run")
    args = parser.parse_args()

    overrides = list(args.overrides)
    if args.max_time:
        overrides.append(f"engine.max_time={args.max_time}")
    cfg = load_preset(args.preset, overrides)
    if not args.data.is_dir():
        sys.exit(f"{args.data}: Lucchi++ training folder not found. Fix: pass --data")
    mask_dir = None if args.labels == "masks" else args.labels
    volume = read_volume(args.data, "auto" if mask_dir is None else "generic", mask_dir=mask_dir)
    split = resolve_split(cfg, len(volume))  # segment train's split: data.val_block, val_gap
    if not split.val:
        sys.exit("the preset has no validation block (data.val_block=0). Fix: set "
                 "data.val_block or data.val_slices")
    train_idx = split.train if args.train_slices is None else evenly_spaced(
        split.train, args.train_slices)
    train_data = segment_data(volume.select(train_idx), cfg.data.inputs, cfg.data.target)
    if args.single_crop:
        train_data = single_crop(train_data)
    val_data = segment_data(volume.select(split.val), cfg.data.inputs, cfg.data.target)
    val_range = f"{split.val[0]}-{split.val[-1]}"
    del volume
    out = args.out or Path(tempfile.mkdtemp(prefix="segment_lucchi_"))
    device = resolve_device(cfg.engine.device)
    precision = resolve_precision(cfg.engine.precision, device)
    print(f"preset {args.preset} on {device} [{cpu_kind()}] ({precision}, "
          f"{cfg.engine.num_threads or thread_count(None)} threads), labels {args.labels}, "
          f"{len(train_data)} training slice(s){' (single crop)' if args.single_crop else ''}, "
          f"validation slices {val_range}, run folder {out}", flush=True)

    report: dict = {"preset": args.preset, "labels": args.labels, "device": str(device),
                    "cpu": cpu_kind(), "precision": precision,
                    "overrides": overrides, "train_slices": train_idx,
                    "val_slices": split.val, "val_range": val_range,
                    "single_crop": args.single_crop,
                    "threads": cfg.engine.num_threads or thread_count(None)}
    if args.engine_steps:
        report["engine_vs_plain"] = engine_vs_plain(cfg, train_data, args.engine_steps)
    if args.ratio_only:
        e = report["engine_vs_plain"]
        print(f"engine: {e['engine_images_per_s']:.1f} images/s ({e['engine_precision']}) vs "
              f"plain eager fp32 loop {e['plain_fp32_images_per_s']:.1f} images/s over the same "
              f"{e['steps']} batches: ratio {e['ratio']:.2f}")
        return

    meta = {"benchmark": "segment_lucchi", "labels": args.labels}
    result = fit(cfg, train_data, val_data, out, resume=False, meta=meta)
    rates = [r["value"] for r in read_metrics_csv(out / "metrics.csv")
             if r["name"] == "perf/images_per_s"]
    report["training"] = {
        "steps": result["step"], "elapsed_s": result["elapsed_s"],
        "stop_reason": result["stop_reason"],
        "images_per_s_median": statistics.median(rates) if rates else None,
        "images_per_s_overall": result["step"] * cfg.sampling.batch_size / result["elapsed_s"],
    }
    runs = [infer_and_score(out / MODEL_DIR, val_data, device, precision, tta=False)]
    if cfg.infer.tta:
        runs.append(infer_and_score(out / MODEL_DIR, val_data, device, precision, tta=True))
    report["validation"] = runs
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    atomic_write_text(out / "benchmark.json", json.dumps(report, indent=2))
    print_report(report)


def print_report(report: dict) -> None:
    t = report["training"]
    median = t["images_per_s_median"]
    windows = f"{median:.1f} images/s (median of log windows), " if median else ""
    print(f"\ntraining: {t['steps']} steps in {t['elapsed_s']:.0f} s ({t['stop_reason']}); "
          f"{windows}{t['images_per_s_overall']:.1f} images/s overall incl. validation")
    for v in report["validation"]:
        label = "with 8-way TTA" if v["tta"] else "no TTA"
        print(f"validation {IOU_NAME}, slices {report['val_range']}, {label}: "
              f"{v['iou']:.4f} at threshold {v['threshold']:.3f}, {v['iou@0.5']:.4f} at 0.5; "
              f"Dice {v['dice']:.4f} / {v['dice@0.5']:.4f}; "
              f"inference {v['megapixels_per_s']:.2f} megapixels/s")
    if "engine_vs_plain" in report:
        e = report["engine_vs_plain"]
        print(f"engine: {e['engine_images_per_s']:.1f} images/s ({e['engine_precision']}) vs plain "
              f"eager fp32 loop {e['plain_fp32_images_per_s']:.1f} images/s over the same "
              f"{e['steps']} batches: ratio {e['ratio']:.2f}")
    print(f"peak RSS {report['peak_rss_mib']:.0f} MiB; threads {report['threads']}")


if __name__ == "__main__":
    main()
