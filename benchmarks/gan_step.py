"""GAN training speed: the engine's GanTask step vs a plain eager fp32 pix2pix step.

Every variant trains the same models from the same initial weights on the same batches
(phantom crops drawn by GanTask.sample_batch). The reference is the textbook pix2pix step in
fp32 with torch's default Adam and library convolutions throughout: G forward; D on the fake
and on the real pair; D update; D on the fake again with D frozen; G update. The engine step
is `GanTask.train_step` under the engine's autocast (bf16 where `precision` resolves to it),
with fused Adam, small CPU maps of G run as one matmul (`conv4s2_as_matmul`), one D pass over
fake and real together, and gradients freed rather than zeroed. --ablate also times the
engine step with one of those turned off at a time.

Repetitions are interleaved (alternating the order) so that load from other processes affects
every variant alike; the median seconds per step gives images/s. "Equal metrics": the mean
losses over the same batches are printed side by side. Peak RSS is read after the engine step
has run alone (each preset runs in its own process), then after all variants.

    .venv/bin/python benchmarks/gan_step.py                      # spec (ngf 64) and cpu preset
    .venv/bin/python benchmarks/gan_step.py --presets cpu --reps 7 --threads 1 --ablate
    .venv/bin/python benchmarks/gan_step.py --device cuda --steps 20
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from emsynth.config import load_config
from emsynth.data.phantom import generate_volume
from emsynth.engine.device import autocast_factory, cpu_kind, resolve_precision, thread_count
from emsynth.engine.task import StepContext
from emsynth.gan.config import GanConfig
from emsynth.gan.losses import discriminator_loss, generator_adversarial_loss
from emsynth.gan.task import GanTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "gan"


class ReferenceStep:
    """Plain eager fp32 pix2pix step (Isola et al.'s optimize_parameters) on a task's G, D."""

    def __init__(self, task: GanTask) -> None:
        self.generator = task.modules["generator"]
        self.discriminator = task.modules["discriminator"]
        optim = task.cfg.optim
        betas = (optim.beta1, optim.beta2)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=optim.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=optim.lr, betas=betas)
        self.loss = task.cfg.loss

    def __call__(self, batch, device: torch.device) -> dict[str, float]:
        masks, real = (t.to(device) for t in batch)
        mode, g, d = self.loss.adversarial, self.generator, self.discriminator
        fake = g(masks)
        pred_fake = d(torch.cat([masks, fake.detach()], 1))
        pred_real = d(torch.cat([masks, real], 1))
        loss_d = discriminator_loss([f[-1] for f in pred_real], [f[-1] for f in pred_fake], mode)
        self.opt_d.zero_grad()
        loss_d.backward()
        self.opt_d.step()
        d.requires_grad_(False)
        pred_fake = d(torch.cat([masks, fake], 1))
        loss_adv = generator_adversarial_loss([f[-1] for f in pred_fake], mode)
        loss_l1 = torch.nn.functional.l1_loss(fake, real)
        loss_g = loss_adv + self.loss.l1_weight * loss_l1
        self.opt_g.zero_grad()
        loss_g.backward()
        self.opt_g.step()
        d.requires_grad_(True)
        return {"d": loss_d.item(), "g_adv": loss_adv.item(), "l1": loss_l1.item()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(run, batches, device: torch.device) -> tuple[float, list[dict[str, float]]]:
    """Seconds per step over `batches`, and the losses of each step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    losses = [run(batch) for batch in batches]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / len(batches), losses


ABLATIONS = ("engine-fp32", "engine-no-fused-adam", "engine-no-small-map-matmul")


def build_variant(name: str, cfg: GanConfig, volume, device: torch.device, precision: str):
    """A step function for `name`, its models initialised exactly like every other variant's."""
    if name == "engine-fp32":
        precision = "fp32"
    ctx = StepContext(device=device, autocast=autocast_factory(device, precision),
                      wrap=lambda module, **_: module, precision=precision)
    torch.manual_seed(0)
    task = GanTask(cfg, [volume])
    task.setup(ctx)
    if name == "reference":
        task.modules["generator"].set_small_map_matmul(False)
        reference = ReferenceStep(task)
        return lambda batch: reference(batch, device)
    if name == "engine-no-small-map-matmul":
        task.modules["generator"].set_small_map_matmul(False)
    if name == "engine-no-fused-adam":
        optim = cfg.optim
        task.optimizers = {
            key: torch.optim.Adam(module.parameters(), lr=optim.lr,
                                  betas=(optim.beta1, optim.beta2))
            for key, module in task.modules.items()
        }
    return lambda batch: task.train_step(batch, ctx)


def bench_preset(preset: str, args: argparse.Namespace, device: torch.device) -> dict:
    cfg = load_config(GanConfig, CONFIGS / f"{preset}.yaml")
    volume = generate_volume("vnc", 2, (512, 512), seed=0)
    precision = resolve_precision(cfg.engine.precision, device)
    sampler_task = GanTask(cfg, [volume])
    rng = np.random.default_rng(0)
    n_batches = args.warmup + args.reps * args.steps
    batches = [sampler_task.sample_batch(rng) for _ in range(n_batches)]
    warm, timed_batches = batches[:args.warmup], batches[args.warmup:]

    names = ["engine", "reference", *(ABLATIONS if args.ablate else ())]
    runs = {}
    rss_engine = 0.0
    for name in names:
        runs[name] = build_variant(name, cfg, volume, device, precision)
        for batch in warm:
            runs[name](batch)
        if name == "engine":
            rss_engine = peak_rss_mb()

    seconds: dict[str, list[float]] = {name: [] for name in runs}
    losses: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for rep in range(args.reps):
        chunk = timed_batches[rep * args.steps:(rep + 1) * args.steps]
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            secs, step_losses = timed(runs[name], chunk, device)
            seconds[name].append(secs)
            losses[name].extend(step_losses)
    batch_size = cfg.data.batch_size
    result = {
        "preset": preset,
        "ngf": cfg.model.ngf,
        "ndf": cfg.model.ndf,
        "crop": cfg.data.crop,
        "batch": batch_size,
        "precision": precision,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": cpu_kind(),
        "steps_timed": args.reps * args.steps,
        "peak_rss_mb_engine_only": round(rss_engine, 1),
        "peak_rss_mb_all": round(peak_rss_mb(), 1),
    }
    for name in runs:
        median = statistics.median(seconds[name])
        result[f"{name}_images_per_s"] = batch_size / median
        result[f"{name}_s_per_step"] = median
        for key in ("d", "g_adv", "l1"):
            result[f"{name}_mean_{key}"] = float(np.mean([x[key] for x in losses[name]]))
    result["ratio"] = result["engine_images_per_s"] / result["reference_images_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="spec,cpu", help="configs/gan presets to time")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed repetition")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: every usable core)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ablate", action="store_true",
                        help="also time the engine step with each optimisation turned off")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if len(presets) > 1:  # one process per preset, so that each peak RSS is its own
        for preset in presets:
            command = [sys.executable, __file__, *sys.argv[1:], "--presets", preset]
            if args.json:
                command += ["--json", str(args.json.with_suffix(f".{preset}.json"))]
            subprocess.run(command, check=True)
        return
    torch.set_num_threads(thread_count(args.threads))
    device = torch.device(args.device)
    results = []
    for preset in presets:
        r = bench_preset(preset, args, device)
        results.append(r)
        print(
            f"{r['preset']:5s} ngf={r['ngf']:<3d} {r['crop']}px batch {r['batch']} "
            f"[{r['device']}: {r['cpu']}, {r['threads']} threads, {r['precision']}]: engine "
            f"{r['engine_images_per_s']:.3f} img/s, reference fp32 "
            f"{r['reference_images_per_s']:.3f} img/s, ratio {r['ratio']:.2f}x | mean L1 "
            f"{r['engine_mean_l1']:.4f} vs {r['reference_mean_l1']:.4f}, D "
            f"{r['engine_mean_d']:.4f} vs {r['reference_mean_d']:.4f} | peak RSS "
            f"{r['peak_rss_mb_engine_only']:.0f} MB (engine), {r['peak_rss_mb_all']:.0f} MB "
            "(all variants)",
            flush=True,
        )
        for name in ABLATIONS if args.ablate else ():
            print(f"      {name}: {r[f'{name}_images_per_s']:.3f} img/s, x"
                  f"{r[f'{name}_images_per_s'] / r['reference_images_per_s']:.2f} of the "
                  f"reference, mean L1 {r[f'{name}_mean_l1']:.4f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
