"""Step budgets of a study's real-only segmenters, chosen on the validation block (issue 13).

    python experiments/study_budget.py configs/study/lucchi_scarce_cpu.yaml --regime 1slice \
        --steps 400,800,1600,3200
    python experiments/study_budget.py configs/study/lucchi_scarce_cpu.yaml --regime all \
        --steps 1000,2000,4000,8000 --seeds 0,1
    python experiments/study_budget.py configs/study/lucchi_scarce_cpu.yaml --regime 1slice \
        --steps 800 -s segment.model.norm=batch --tag batch      # compare recipes likewise

For each step count, trains the study's real-only segmenter of a regime (the study's own
recipe, data selection and seed: `cells.run_segment`, a full learning-rate schedule for each
count) and reads its validation IoU at the threshold chosen on the validation block. The test
block is never loaded. The rule the presets follow: the smallest budget whose mean validation
IoU is within 0.01 of the best one tried. Resumable: runs land in
runs/study_budget/<config>/<regime>/steps<N>-seed<S>/ and finished ones are read back.
Prints a table, writes budget.json and budget.png beside the runs;
`--figure docs/study_budgets.png` draws every regime calibrated so far into one figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from emsynth.config import load_config
from emsynth.data.volume import MITO
from emsynth.engine.device import cpu_kind, resolve_precision, torch_threads
from emsynth.engine.runinfo import git_state, versions
from emsynth.segment.sampling import IMAGE, segment_data
from emsynth.study import cells
from emsynth.study import data as study_data
from emsynth.study.cache import Cell, CellSpec
from emsynth.study.config import StudyConfig
from emsynth.study.layout import REAL

#: The budget rule: the smallest step count within this much of the best mean validation IoU.
TOLERANCE = 0.01


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, nargs="?")
    parser.add_argument("--figure", type=Path,
                        help="instead of training: draw every budget.json under --out into "
                        "one figure, e.g. docs/study_budgets.png")
    parser.add_argument("--regime")
    parser.add_argument("--steps", help="comma-separated step counts")
    parser.add_argument("--seeds", default="0", help="comma-separated study seeds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", "-s", action="append", default=[], dest="overrides",
                        help="override a study config key, e.g. segment.model.norm=batch")
    parser.add_argument("--tag", default="", help="suffix of the run folders (with --set)")
    parser.add_argument("--out", type=Path, default=Path("runs/study_budget"))
    args = parser.parse_args()
    if args.figure is not None:
        summary_figure(args.out, args.figure)
        return
    if args.config is None or args.regime is None or args.steps is None:
        parser.error("config, --regime and --steps are required (or --figure)")

    cfg = load_config(StudyConfig, args.config, args.overrides)
    regime = next((r for r in cfg.regimes if r.name == args.regime), None)
    if regime is None:
        raise SystemExit(f"{args.config}: no regime {args.regime!r} "
                         f"(have {', '.join(r.name for r in cfg.regimes)})")
    steps = [int(s) for s in args.steps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    source = study_data.load_source(cfg.data, "data")
    blocks = study_data.split(cfg, len(source.volume))  # carves out the test block, unread
    volume = source.volume
    val = segment_data(volume.select(blocks.val), [IMAGE], MITO)
    out = args.out / args.config.stem / (regime.name + (f"-{args.tag}" if args.tag else ""))
    rows = []
    with torch_threads(args.threads):
        for seed in seeds:
            selection = study_data.select(regime, blocks.train, seed, volume.labels[MITO])
            real = segment_data(study_data.cut(volume, selection), [IMAGE], MITO)
            for n in steps:
                cell = Cell(out, CellSpec("budget", 1, {"steps": n, "seed": seed}))
                cell.dir = out / f"steps{n}-seed{seed}"
                if cell.done:
                    result = cell.result()
                else:
                    record = cell.start()
                    result = cells.run_segment(cell, cfg, REAL, seed, real, None, val, steps=n)
                    cell.finish(record, result)
                iou = result["validation"]["fg_iou"]
                rows.append({"steps": n, "seed": seed, "val_iou": iou,
                             "train_s": result["train_s"]})
                print(f"{regime.name} steps {n:6d} seed {seed}: validation IoU {iou:.4f} "
                      f"({result['train_s']:.0f} s)", flush=True)
    means = {n: float(np.mean([r["val_iou"] for r in rows if r["steps"] == n])) for n in steps}
    best = max(means.values())
    chosen = min(n for n in steps if means[n] >= best - TOLERANCE)
    precision = resolve_precision(cfg.segment.engine.precision, torch.device("cpu"))
    summary = {"config": str(args.config), "overrides": args.overrides, "regime": regime.name,
               "seeds": seeds,
               "validation_slices": blocks.val, "rows": rows, "mean_val_iou": means,
               "chosen_steps": chosen, "rule": f"smallest within {TOLERANCE} of the best",
               "preset_steps": regime.steps,
               "cpu": cpu_kind(), "precision": precision, "threads": args.threads,
               "versions": versions(), "git": git_state()}
    (out / "budget.json").write_text(json.dumps(summary, indent=2) + "\n")
    _figure(out / "budget.png", regime.name, rows, means, chosen)
    print(f"{regime.name}: chosen {chosen} steps (mean validation IoU "
          + ", ".join(f"{n}: {m:.4f}" for n, m in means.items())
          + f"; {cpu_kind()}, {precision})")


def _figure(path: Path, regime: str, rows: list[dict], means: dict[int, float],
            chosen: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.scatter([r["steps"] for r in rows], [r["val_iou"] for r in rows], s=12, alpha=0.6)
    ax.plot(list(means), list(means.values()), marker="o")
    ax.axvline(chosen, ls="--", c="grey")
    ax.set_xscale("log")
    ax.set_xlabel("segmenter steps (real-only)")
    ax.set_ylabel("validation IoU")
    ax.set_title(f"{regime}: chosen {chosen}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_figure(root: Path, path: Path) -> None:
    """Validation IoU against steps for every regime calibrated under `root`, chosen budgets
    marked; regimes in order of their annotated data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = {}
    for budget in sorted(root.glob("*/*/budget.json")):
        summary = json.loads(budget.read_text())
        if summary.get("overrides"):
            continue  # a recipe comparison, not the preset's budget
        found.setdefault(summary["regime"], summary)
    order = ["crop256", "1slice", "2slices", "5slices", "all"]
    regimes = sorted(found, key=lambda r: order.index(r) if r in order else len(order))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for regime in regimes:
        means = {int(k): v for k, v in found[regime]["mean_val_iou"].items()}
        steps = sorted(means)
        line, = ax.plot(steps, [means[n] for n in steps], marker="o", label=regime)
        chosen = found[regime]["chosen_steps"]
        ax.scatter([chosen], [means[chosen]], s=110, facecolors="none",
                   edgecolors=line.get_color())
        preset = found[regime].get("preset_steps")
        if preset in means:
            ax.scatter([preset], [means[preset]], s=60, marker="x", c="black", zorder=3)
    ax.set_xscale("log")
    ticks = [250, 500, 1000, 2000, 4000, 8000]
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("segmenter steps, real-only (batch 8 of 128 px)")
    ax.set_ylabel("validation foreground IoU")
    first = found[regimes[0]]
    ax.set_title(f"o: the rule's budget, x: the preset's ({first['cpu']}, {first['precision']})",
                 fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
