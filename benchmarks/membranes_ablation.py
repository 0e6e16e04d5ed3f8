"""Controlled membrane transfer with full ground truth: train on phantom "vnc", test on phantom
"ca1", with and without each domain-robustness augmentation.

The two phantom domains differ like VNC ssTEM and CA1 FIB-SEM (contrast, blur, noise grain,
membrane thickness, cell and mitochondrion sizes), and unlike real CA1 both have membrane
labels, so transfer is measured, not judged. One model per variant and seed, same preset
(configs/membranes/phantom.yaml) and wall-clock budget; prints a table of membrane F1 / IoU on
the held-out phantom-vnc slices (in domain) and on a phantom-ca1 volume (transfer), beside the
trivial all-membrane baseline.

    .venv/bin/python benchmarks/membranes_ablation.py                       # ~2.5 min per model
    .venv/bin/python benchmarks/membranes_ablation.py --max-time 30s --variants none,all \
        --out /tmp/ablation_smoke
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from emsynth.config import load_config
from emsynth.data.phantom import generate_volume
from emsynth.data.volume import MEMBRANE
from emsynth.io import atomic_write_text
from emsynth.membranes.config import AUGMENTATION_VARIANTS, MembraneConfig, variant_names
from emsynth.membranes.predict import MembraneModel, evaluate_volume
from emsynth.membranes.task import train_membranes

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = AUGMENTATION_VARIANTS


def run(name: str, seed: int, args: argparse.Namespace, target) -> dict:
    run_dir = args.out / f"{name}_seed{seed}"
    cfg = load_config(MembraneConfig, args.config, [
        *VARIANTS[name], f"engine.max_time={args.max_time}", f"engine.seed={seed}",
        f"engine.device={args.device}", *args.set,
    ])
    if (run_dir / "final_metrics.json").is_file() and not args.retrain:
        record = json.loads((run_dir / "final_metrics.json").read_text())
        final, steps = record["final"], record["engine"]["step"]
    else:
        result = train_membranes(cfg, run_dir, resume=not args.retrain)
        final, steps = result["final"], result["step"]
    model = MembraneModel.load(run_dir, device=args.device)
    report = evaluate_volume(model, target, "labels", args.device)
    return {"variant": name, "seed": seed, "steps": steps,
            "vnc_f1": final["fg_dice"], "vnc_iou": final["fg_iou"],
            "ca1_f1": report["scores"]["f1"], "ca1_iou": report["scores"]["iou"],
            "ca1_threshold": report["threshold"]}


def summary(rows: list[dict], baseline_iou: float, baseline_f1: float) -> str:
    head = "| variant | seeds | steps | phantom-vnc F1 | phantom-vnc IoU | phantom-ca1 F1 | " \
           "phantom-ca1 IoU |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    def cell(group: list[dict], key: str) -> str:
        values = np.array([r[key] for r in group])
        return f"{values.mean():.3f}" + (f" ± {values.std():.3f}" if len(values) > 1 else "")

    for name in dict.fromkeys(r["variant"] for r in rows):
        group = [r for r in rows if r["variant"] == name]
        lines.append(f"| {name} | {len(group)} | {int(np.mean([r['steps'] for r in group]))} | "
                     f"{cell(group, 'vnc_f1')} | {cell(group, 'vnc_iou')} | "
                     f"{cell(group, 'ca1_f1')} | {cell(group, 'ca1_iou')} |")
    lines.append(f"| all-membrane baseline | - | - | - | - | {baseline_f1:.3f} | "
                 f"{baseline_iou:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/membranes/phantom.yaml")
    parser.add_argument("--variants", default="none,noise,intensity,blur,standardize,all")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--max-time", default="150s", help="training budget per model")
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    parser.add_argument("--target-slices", type=int, default=10)
    parser.add_argument("--target-size", type=int, default=256)
    parser.add_argument("--target-seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/membranes/ablation")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for prediction (1 is fastest on a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        names = variant_names(args.variants)
    except ValueError as error:
        parser.error(str(error))
    seeds = [int(s) for s in args.seeds.split(",")]
    size = (args.target_size, args.target_size)
    target = generate_volume("ca1", args.target_slices, size, seed=args.target_seed)
    truth_fraction = float(target.labels[MEMBRANE].mean())
    baseline_f1 = 2 * truth_fraction / (1 + truth_fraction)
    rows = []
    for name in names:
        for seed in seeds:
            rows.append(run(name, seed, args, target))
            print(json.dumps(rows[-1]), flush=True)
            atomic_write_text(args.out / "ablation.json", json.dumps(rows, indent=2))
    print(f"\nphantom vnc -> phantom ca1 ({args.target_slices} slices of {size[0]}^2, seed "
          f"{args.target_seed}); training per model: the preset's steps (overrides: "
          f"{args.set or 'none'}) within {args.max_time}, on {args.device}; membrane F1/IoU "
          "pixel-wise, whole volume, at each model's validation threshold")
    print(summary(rows, truth_fraction, baseline_f1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
