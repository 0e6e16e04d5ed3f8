"""Blockwise OME-Zarr prediction vs MONAI's sliding_window_inference with its defaults.

Same untrained default segmenter U-Net, same phantom volume, same window; each mode runs in its
own process so that peak RSS is its own. Prints MP/s and peak RSS side by side.

    .venv/bin/python benchmarks/volume_predict.py --slices 4 --size 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_mode(mode: str, args) -> dict:
    import numpy as np
    import torch

    from emsynth.data.omezarr import open_ome_zarr
    from emsynth.segment.blockwise import BlockwiseModel, predict_to_ome_zarr
    from emsynth.segment.config import ModelConfig
    from emsynth.segment.model import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_model(ModelConfig(), 1).eval()
    src = open_ome_zarr(args.input).array
    z, y, x = src.shape
    start = time.perf_counter()
    if mode == "monai":
        from monai.inferers import sliding_window_inference

        with torch.no_grad():
            for i in range(z):  # defaults: overlap 0.25, mode constant, sw_batch_size 1
                plane = torch.from_numpy(np.asarray(src[i : i + 1]))[None].float() / 255
                sliding_window_inference(plane, (args.window, args.window), 1, net)
    else:
        model = BlockwiseModel(net, (args.window, args.window), 0.25, "gaussian", 8)
        with tempfile.TemporaryDirectory() as tmp:
            predict_to_ome_zarr(model, src, Path(tmp) / "p.ome.zarr", threshold=0.5,
                                label="mito", block=(args.block_z, args.block, args.block))
    elapsed = time.perf_counter() - start
    return {"mode": mode, "MP/s": z * y * x / 1e6 / elapsed, "s": elapsed,
            "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--block-z", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--input", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args)))
        return
    from emsynth.data.omezarr import write_volume
    from emsynth.data.phantom.generate import generate_volume

    with tempfile.TemporaryDirectory() as tmp:
        path = write_volume(generate_volume("vnc", args.slices, (args.size, args.size), 0),
                            Path(tmp) / "in.ome.zarr")
        rows = []
        for mode in ("monai", "blockwise"):
            cmd = [sys.executable, __file__, "--mode", mode, "--input", str(path),
                   *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k not in ("mode", "input")]]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{args.slices} x {args.size} x {args.size} phantom, window {args.window}, "
          f"{args.threads} threads, default segmenter U-Net (untrained), fp32")
    print(f"{'mode':<10} {'MP/s':>8} {'seconds':>8} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['mode']:<10} {r['MP/s']:>8.3f} {r['s']:>8.1f} {r['peak_rss_MB']:>12.0f}")
    print(f"blockwise / monai MP/s: {rows[1]['MP/s'] / rows[0]['MP/s']:.2f}x")


if __name__ == "__main__":
    main()
