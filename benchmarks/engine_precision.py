"""bf16 autocast vs fp32: training-step speed of a small 2D U-Net (CPU by default, or a GPU).

Uses the engine's own autocast factory, so the numbers describe what `precision=auto` buys.
Repetitions of the two precisions are interleaved so that load from other processes affects
both alike; the median seconds per step is reported.

    .venv/bin/python benchmarks/engine_precision.py [--size 128 --batch 8 --steps 5 --reps 5]
    .venv/bin/python benchmarks/engine_precision.py --device cuda --batch 32 --size 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from emsynth.engine.device import autocast_factory, choose_precision, cpu_kind, thread_count


def step_seconds(model, optimizer, loss_fn, images, masks, precision: str, steps: int) -> float:
    device = images.device
    autocast = autocast_factory(device, precision)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        with autocast():
            logits = model(images)
        loss = loss_fn(logits.float(), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="crop side in pixels")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repetition")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per precision")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: every usable core)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.set_num_threads(thread_count(args.threads))
    torch.manual_seed(0)
    model = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(16, 32, 64, 128),
                 strides=(2, 2, 2), num_res_units=1).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(sigmoid=True)
    images = torch.randn(args.batch, 1, args.size, args.size, device=args.device)
    masks = (torch.rand(args.batch, 1, args.size, args.size, device=args.device) > 0.7).float()
    timings: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for precision in timings:  # warm-up (allocator, oneDNN kernel selection)
        step_seconds(model, optimizer, loss_fn, images, masks, precision, 2)
    for _ in range(args.reps):
        for precision, found in timings.items():
            found.append(step_seconds(model, optimizer, loss_fn, images, masks, precision,
                                      args.steps))
    medians = {p: statistics.median(t) for p, t in timings.items()}
    where = (torch.cuda.get_device_name(args.device) if args.device == "cuda"
             else f"CPU [{cpu_kind()}], {torch.get_num_threads()} threads")
    print(f"UNet(16,32,64,128) batch {args.batch} x {args.size}^2, {where}, "
          f"torch {torch.__version__}, median of {args.reps} x {args.steps} steps")
    for precision, seconds in medians.items():
        print(f"  {precision}: {seconds * 1000:7.1f} ms/step  "
              f"{args.batch / seconds:6.1f} images/s")
    print(f"  bf16 speed-up: {medians['fp32'] / medians['bf16']:.2f}x; precision auto picks "
          f"{choose_precision('auto', torch.device(args.device)).precision} here")


if __name__ == "__main__":
    main()
