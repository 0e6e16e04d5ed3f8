"""Threads: training-step speed of the demo's and the study's models at 1 vs N torch threads.

Decides whether a preset should pin `num_threads: 1` (tiny models whose kernels are too small
to split) or use every core (the engine's default). Each model trains through its own Task
(the same step the engine runs), from the same initial weights on the same batches, at each
thread count; repetitions are interleaved so that load from other processes affects every
variant alike; the median seconds per step gives images/s. Prints the CPU kind and the
precision (`auto` resolved, or --precision).

    .venv/bin/python benchmarks/threads.py                        # precision auto
    .venv/bin/python benchmarks/threads.py --precision fp32 --threads 1,2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from emsynth.config import load_config
from emsynth.data.phantom import generate_volume
from emsynth.engine.device import cpu_kind, resolve_precision, usable_cores
from emsynth.engine.task import StepContext
from emsynth.gan.config import GanConfig
from emsynth.gan.task import GanTask
from emsynth.segment.config import SegmentConfig
from emsynth.segment.sampling import segment_data
from emsynth.segment.task import SegmentTask
from emsynth.study.config import StudyConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def models() -> dict[str, tuple[type, object]]:
    """name -> (task class, config) for every small model a preset trains."""
    demo = load_config(StudyConfig, CONFIGS / "study" / "demo.yaml")
    lucchi = load_config(StudyConfig, CONFIGS / "study" / "lucchi_cpu.yaml")
    return {
        "demo GAN (ngf 8)": (GanTask, demo.gan),
        "demo segmenter (8-32)": (SegmentTask, demo.segment),
        "tiny GAN preset (ngf 8, 3 scales)": (GanTask, load_config(
            GanConfig, CONFIGS / "gan" / "tiny.yaml")),
        "study GAN, lucchi_cpu (ngf 16)": (GanTask, lucchi.gan),
        "study segmenter, lucchi_cpu (16-128)": (SegmentTask, lucchi.segment),
        "segment cpu preset (16-256)": (SegmentTask, load_config(
            SegmentConfig, CONFIGS / "segment" / "cpu.yaml")),
    }


def build(task_cls: type, cfg, precision: str):
    device = torch.device("cpu")
    ctx = StepContext(device=device, autocast=_autocast(device, precision),
                      wrap=lambda module, **_: module, precision=precision)
    volume = generate_volume("ca1", 3, (512, 512), seed=0)
    torch.manual_seed(0)
    if task_cls is GanTask:
        task = GanTask(cfg, [volume])
    else:
        task = SegmentTask(cfg, segment_data(volume, cfg.data.inputs, cfg.data.target))
    task.setup(ctx)
    return task, ctx


def _autocast(device: torch.device, precision: str):
    from emsynth.engine.device import autocast_factory

    return autocast_factory(device, precision)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default=f"1,{usable_cores()}",
                        help="thread counts to compare (default: 1 and every usable core)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=3, help="steps per timed repetition")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per variant")
    parser.add_argument("--only", default=None, help="only models whose name contains this")
    args = parser.parse_args()
    counts = sorted({int(t) for t in args.threads.split(",")})
    precision = resolve_precision(args.precision, torch.device("cpu"))
    print(f"CPU [{cpu_kind()}], precision {precision}, torch {torch.__version__}; median of "
          f"{args.reps} x {args.steps} steps, interleaved", flush=True)
    for name, (task_cls, cfg) in models().items():
        if args.only and args.only not in name:
            continue
        rng = np.random.default_rng(0)
        sampler, _ = build(task_cls, cfg, precision)
        batches = [sampler.sample_batch(rng) for _ in range(2 + args.reps * args.steps)]
        variants = {n: build(task_cls, cfg, precision) for n in counts}
        for n, (task, ctx) in variants.items():
            torch.set_num_threads(n)
            for batch in batches[:2]:
                task.train_step(batch, ctx)
        seconds: dict[int, list[float]] = {n: [] for n in counts}
        for rep in range(args.reps):
            chunk = batches[2 + rep * args.steps: 2 + (rep + 1) * args.steps]
            for n in counts if rep % 2 == 0 else counts[::-1]:
                task, ctx = variants[n]
                torch.set_num_threads(n)
                start = time.perf_counter()
                for batch in chunk:
                    task.train_step(batch, ctx)
                seconds[n].append((time.perf_counter() - start) / len(chunk))
        batch_size = task.batch_size or 1
        rates = {n: batch_size / statistics.median(s) for n, s in seconds.items()}
        base = rates[counts[0]]
        shown = ", ".join(f"{n} thread{'s' if n > 1 else ''} {r:.1f} img/s ({r / base:.2f}x)"
                          for n, r in rates.items())
        print(f"{name:38s} {shown}", flush=True)


if __name__ == "__main__":
    main()
