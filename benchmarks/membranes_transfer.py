"""Membrane transfer from Drosophila VNC: held-out VNC, cross-dataset ISBI 2012, CA1 plausibility.

Trains one membrane model per augmentation variant on drosophila_vnc slices 0-10 (threshold
chosen on 16-19; 11-15 are the preset's data.val_gap), each with the same config and budget,
then reports for each:

- held-out VNC slices 16-19: membrane F1 and IoU (pixel-wise, membrane class, whole block);
- ISBI 2012 train (30 slices, 0 = membrane in its files): membrane F1 and IoU; ISBI has no
  mitochondria labels, so the mitochondria channel is zeros (column "ISBI zeros") and, with
  --mito-model, a VNC mitochondria segmenter's prediction (column "ISBI mito-pred");
- CA1 (lucchi_pp/train, evenly spaced slices, true mitochondria masks): the plausibility
  numbers of emsynth.membranes.checks (no membrane labels exist there).

    .venv/bin/python benchmarks/membranes_transfer.py --max-time 5m
    .venv/bin/python benchmarks/membranes_transfer.py --variants none,noise --max-time 1m \
        --out /tmp/transfer_smoke

Runs are cached: a variant whose run folder already holds a finished model is evaluated
without retraining (delete the folder, or pass --retrain, to train again).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from emsynth.config import load_config
from emsynth.data.readers import read_volume
from emsynth.data.slices import evenly_spaced
from emsynth.io import atomic_write_text
from emsynth.membranes.config import AUGMENTATION_VARIANTS, MembraneConfig, variant_names
from emsynth.membranes.predict import MembraneModel, evaluate_volume
from emsynth.membranes.task import train_membranes

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
VARIANTS = AUGMENTATION_VARIANTS


def run_variant(name: str, args: argparse.Namespace, volumes: dict) -> dict:
    run_dir = args.out / name
    overrides = [*VARIANTS[name], f"engine.max_time={args.max_time}",
                 f"engine.seed={args.seed}", f"engine.device={args.device}", *args.set]
    cfg = load_config(MembraneConfig, args.config, overrides)
    cfg.data.path = str(args.data_root / "drosophila_vnc")
    started = time.time()
    finished = (run_dir / "final_metrics.json").is_file() and not args.retrain
    if not finished:
        result = train_membranes(cfg, run_dir, resume=not args.retrain)
        train_info = {"steps": result["step"], "train_s": round(result["elapsed_s"])}
    else:
        record = json.loads((run_dir / "final_metrics.json").read_text())
        train_info = {"steps": record["engine"]["step"], "train_s": round(
            record["engine"]["elapsed_s"]), "cached": True}
    model = MembraneModel.load(run_dir, device=args.device)
    row: dict = {"variant": name, **train_info, "threshold": model.threshold}
    row["vnc"] = evaluate_volume(model, volumes["vnc"], "labels", args.device)
    row["isbi_zeros"] = evaluate_volume(model, volumes["isbi"], "zeros", args.device)
    if args.mito_model:
        row["isbi_mito_pred"] = evaluate_volume(
            model, volumes["isbi"], str(args.mito_model), args.device
        )
    row["ca1"] = evaluate_volume(model, volumes["ca1"], "labels", args.device)
    row["wall_s"] = round(time.time() - started)
    return row


def table(rows: list[dict]) -> str:
    head = ["variant", "steps", "VNC F1", "VNC IoU", "ISBI zeros F1", "ISBI zeros IoU"]
    if any("isbi_mito_pred" in r for r in rows):
        head += ["ISBI mito-pred F1", "ISBI mito-pred IoU"]
    head += ["CA1 memb frac", "CA1 mito-int on memb", "CA1 fragments", "CA1 open ends/1k"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], str(r["steps"]),
                 f"{r['vnc']['scores']['f1']:.3f}", f"{r['vnc']['scores']['iou']:.3f}",
                 f"{r['isbi_zeros']['scores']['f1']:.3f}",
                 f"{r['isbi_zeros']['scores']['iou']:.3f}"]
        if "ISBI mito-pred F1" in head:
            s = r.get("isbi_mito_pred", {}).get("scores")
            cells += [f"{s['f1']:.3f}", f"{s['iou']:.3f}"] if s else ["-", "-"]
        p = r["ca1"]["plausibility"]
        cells += [f"{p['membrane_fraction']:.3f}", f"{p['mito_interior_on_membrane']:.4f}",
                  f"{p['fragment_share']:.3f}", f"{p['endpoints_per_1k']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/membranes/cpu.yaml")
    parser.add_argument("--variants", default="none,noise,all",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--max-time", default="5m", help="training budget per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/membranes/transfer")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--json", type=Path, default=None,
                        help="results file (default OUT/transfer.json), rewritten after each model")
    parser.add_argument("--mito-model", type=Path, default=None,
                        help="mitochondria segmenter (emsynth segment train) for ISBI's mito channel")
    parser.add_argument("--ca1-slices", type=int, default=8)
    parser.add_argument("--data-root", type=Path, default=DATA,
                        help="folder holding drosophila_vnc/, isbi2012/train/, lucchi_pp/train/")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for prediction (1 is fastest on a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        names = variant_names(args.variants)
    except ValueError as error:
        parser.error(str(error))
    vnc = read_volume(args.data_root / "drosophila_vnc")
    ca1 = read_volume(args.data_root / "lucchi_pp" / "train")
    volumes = {
        "vnc": vnc.select(list(range(16, 20))),
        "isbi": read_volume(args.data_root / "isbi2012" / "train"),
        "ca1": ca1.select(evenly_spaced(list(range(len(ca1))), args.ca1_slices)),
    }
    rows = []
    for name in names:
        rows.append(run_variant(name, args, volumes))
        print(table(rows[-1:]), flush=True)
        atomic_write_text(args.json or args.out / "transfer.json", json.dumps(rows, indent=2))
    print(f"\nmembrane transfer, config {args.config.name} (overrides: {args.set or 'none'}), "
          f"training capped at {args.max_time} per model, seed {args.seed}, device "
          f"{args.device}; F1/IoU pixel-wise on the membrane class, whole volume; ISBI mito "
          "channel: zeros (and a mito model's prediction where given)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
