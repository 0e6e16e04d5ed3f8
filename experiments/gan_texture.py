"""The GAN texture ablation of issue 12, resumable: train each variant, score it, tabulate.

    python experiments/gan_texture.py --dataset vnc --variants today,han
    python experiments/gan_texture.py --dataset ca1 --variants today,han --tstr-steps 500
    python experiments/gan_texture.py --dataset vnc --variants all --jobs 2   # hours on 2 cores
    python experiments/gan_texture.py --dataset ca1 --variants han --membranes cldice
    python experiments/gan_texture.py --dataset ca1 --variants han,l1_10 --seeds 0,1,2
    python experiments/gan_texture.py --dataset ca1 --variants han,l1_10 --gan-seeds 0,1

Every step is an emsynth command (printed before it runs), so each number can be reproduced
by hand. Rerunning the same command skips what is done: a GAN whose run.json reached --steps
is not retrained (a stopped or killed one resumes from its checkpoint), a variant with a score JSON is
not rescored, and TSTR's real-trained reference is trained once per dataset (`--tstr-cache`).
`--jobs N` runs N GANs (or evaluations) at once, each on a core of its own.

Seeds: `--seeds 0,1,2` scores each generator once per seed (`gan evaluate --seed`: synthesis
noise and dropout, the FID crops, and both TSTR segmenters' initialisation, sampling and
augmentation; the real-trained reference is retrained, and cached, per seed). The table then
gives TSTR as mean ± 95% t-interval over the seeds scored, and paired differences between
variants over their common seeds. That interval is the spread of the evaluation only;
`--gan-seeds 0,1` also trains each variant again with another `engine.seed` (GAN
initialisation, crops, noise, dropout), into `<variant>_gan<k>` (seed 0 keeps `<variant>`), and
compares the variants within each GAN seed.

Data and the choice: the generators are scored on held-out slices that act as validation
slices, a gap of 5 slices from anything they trained on (data.val_gap). VNC: the GANs train on
slices 0-10 and are scored on 16-19; the reference segmenter trains on 0-8 and picks its
threshold on 14-15 (a fixed --ref-steps, 2000 by default, one thread). CA1: only the study's
training and validation blocks (slices 0-129 of Lucchi++; the study's test block 135-164 is
never read): the membranes are predicted for 0-129 by a VNC membrane model, the GANs train on
0-104 and are scored on 115-129 (the study's validation block), the reference segmenter trains
on 0-99 and picks its threshold on 105-109. The membrane model is configs/membranes/cpu.yaml
trained on VNC 0-15 with its threshold on 16-19 (VNC is another volume, so its own split does
not touch CA1's blocks). `--membranes` picks the CA1 membrane channel (issue 12, item 5):
`predicted` as is, `thin` (skeletonised and dilated back to VNC's width, --thin-width 8: VNC's
labels are 8.6 px of 4.6 nm wide, 8 px of CA1's 5 nm) or `cldice` (a membrane model trained
with soft clDice beside DiceCE, loss.cldice_weight 0.5, 5 skeleton iterations for ~9 px bands).
Runs go to runs/gan12/<dataset>/<variant> (runs/gan12/ca1_<membranes>/<variant> for the other
membrane channels); the CA1 reference segmenter reads only images and mitochondria, which all
membrane channels share, so one serves them all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from emsynth.report.stats import Summary, paired_difference, summarize

ROOT = Path(__file__).resolve().parents[1]
EMSYNTH = [sys.executable, "-m", "emsynth"]
DATA = ROOT.parent / "shared" / "data"

HAN = ["model.decoder_noise=0.1", "loss.l1_weight=10", "loss.class_l1_weights={membrane: 2, mito: 4}",
       "model.n_scales=2", "model.d_downsample=false", "loss.scale_weights=[0.5,0.5]",
       "optim.g_steps_per_d=2"]

#: name -> config overrides on top of configs/gan/cpu.yaml. "today" is the preset as it was.
VARIANTS: dict[str, list[str]] = {
    "today": [],
    "noise": ["model.decoder_noise=0.1"],
    "l1_10": ["loss.l1_weight=10"],
    "classl1": ["loss.class_l1_weights={membrane: 2, mito: 4}"],
    "g2": ["optim.g_steps_per_d=2"],
    "d2full": ["model.n_scales=2", "model.d_downsample=false", "loss.scale_weights=[0.5,0.5]"],
    "sn": ["model.spectral_norm=true"],
    "diffaug": ["diffaugment.policy=[translation,colour,cutout]"],
    "consist": ["loss.consistency_weight=1", "loss.consistency_segmenter={ref}"],
    "han": HAN,
    "han_resize": [*HAN, "model.upsample=resize"],
    "han_bilinear": [*HAN, "model.upsample=bilinear"],
    "spade": ["model.arch=spade", "model.decoder_noise=0.1"],
    "spade_han": [*HAN, "model.arch=spade"],
}

#: CA1 membrane channel -> (membrane-model overrides on configs/membranes/cpu.yaml, thin width).
MEMBRANES: dict[str, tuple[list[str], int]] = {
    "predicted": ([], 0),
    "thin": ([], 8),
    "cldice": (["loss.cldice_weight=0.5", "loss.cldice_iters=5"], 0),
}


def channel_suffix(membranes: str) -> str:
    """Folder-name suffix of a CA1 membrane channel: none for the default, predicted."""
    return "" if membranes == "predicted" else f"_{membranes}"


def datasets(runs: Path, membranes: str = "predicted") -> dict[str, dict]:
    model_overrides, thin_width = MEMBRANES[membranes]
    model = runs / "membranes" / ("gan12_vnc" + ("_cldice" if model_overrides else ""))
    ca1 = runs / "membranes" / f"ca1_0-129{channel_suffix(membranes)}"
    train_model = ["membranes", "train", "-c", "configs/membranes/cpu.yaml", "-s",
                   "data.train_slices=0-15", "-s", "data.val_gap=0", "-s", "engine.num_threads=1",
                   "-s", "engine.max_time=null", "-o", str(model)]
    for o in model_overrides:
        train_model += ["-s", o]
    return {
        "vnc": {
            "data": [str(DATA / "drosophila_vnc")],
            "gan": ["-s", "data.val_block=4", "-s", "data.val_gap=5"],  # trains 0-10
            "score": ["--slices", "16-19"],
            "ref": ["-d", str(DATA / "drosophila_vnc"), "--train-slices", "0-8",
                    "--val-slices", "14-15"],
            "prepare": [],
        },
        "ca1": {
            "data": [str(ca1), "--layout", "slices"],
            # trains 0-104, never 105-109, holds out 110-129
            "gan": ["-s", "data.val_block=20", "-s", "data.val_gap=5"],
            "score": ["--slices", "115-129"],
            "ref": ["-d", str(ca1), "--layout", "slices", "--train-slices", "0-99",
                    "--val-slices", "105-109"],
            "prepare": [
                (model / "model", train_model),
                (ca1 / "prediction.json",
                 ["membranes", "predict", "-m", str(model), "-d", str(DATA / "lucchi_pp" / "train"),
                  "--slices", "0-129", "--threads", "1", "--thin-width", str(thin_width),
                  "-o", str(ca1)]),
            ],
        },
    }


def show(cmd: list[str]) -> str:
    return "emsynth " + shlex.join(cmd)


def run_all(commands: list[tuple[list[str], Path]], jobs: int) -> None:
    """Run (emsynth args, log file) commands, `jobs` at a time; fail loudly on any error.

    With jobs > 1 each runs pinned to a core of its own: emsynth sizes its torch threads to the
    cores it may use, so unpinned evaluations (and their TSTR segmenters) would each take every
    core and slow each other down (measured on 2 cores: 7-14 img/s each against 45 alone)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pin = jobs > 1 and len(cores) > 1
    pending, running, free = list(commands), [], list(range(jobs))
    while pending or running:
        while pending and len(running) < jobs:
            cmd, log = pending.pop(0)
            slot = free.pop(0)
            core = {cores[slot % len(cores)]} if pin else None
            print(f"$ {show(cmd)}  > {log}" + (f"  (core {min(core)})" if core else ""),
                  flush=True)
            log.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.Popen([*EMSYNTH, *cmd], cwd=ROOT, stdout=log.open("w"),
                                    stderr=subprocess.STDOUT)
            if core:  # at once: before the child has imported torch and sized its threads
                os.sched_setaffinity(proc.pid, core)
            running.append((proc, cmd, log, slot))
        time.sleep(5)
        for item in list(running):
            proc, cmd, log, slot = item
            if proc.poll() is not None:
                running.remove(item)
                free.append(slot)
                if proc.returncode != 0:
                    sys.exit(f"failed ({proc.returncode}): {show(cmd)}; see {log}")


def finished(run_dir: Path, steps: int) -> bool:
    info = run_dir / "run.json"
    if not info.is_file():
        return False
    record = json.loads(info.read_text())
    return (record.get("end_step") or 0) >= steps  # null while a run is going or was killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["vnc", "ca1"], required=True)
    parser.add_argument("--variants", default="today,han",
                        help=f"comma-separated, or 'all': {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=3000, help="GAN steps of every variant")
    parser.add_argument("--max-time", default="70m", help="each GAN's safety net")
    parser.add_argument("--tstr-steps", type=int, default=300,
                        help="TSTR segmenter steps; 0 scores without TSTR (minutes, not half an "
                        "hour per variant), a later run with steps adds it")
    parser.add_argument("--ref-steps", type=int, default=2000,
                        help="steps of the reference segmenter behind FCN-score and FID features")
    parser.add_argument("--jobs", type=int, default=2, help="GANs at once, one thread each")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument("--synthesis", choices=["tiles", "whole"], default="tiles",
                        help="score images made in training-crop tiles (emsynth gan "
                        "synthesize's default) or whole slices (--whole-slice)")
    parser.add_argument("--membranes", choices=list(MEMBRANES), default="predicted",
                        help="CA1's membrane channel: as predicted, thinned to VNC's width, or "
                        "from a clDice-trained membrane model")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated evaluation seeds; each scores every variant again")
    parser.add_argument("--gan-seeds", default="0",
                        help="comma-separated GAN training seeds (engine.seed); each trains every "
                        "variant again")
    parser.add_argument("--figure", type=Path, default=None,
                        help="also draw held-out slices, zoomed, of every variant")
    args = parser.parse_args()
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        gan_seeds = [int(s) for s in args.gan_seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r} / --gan-seeds {args.gan_seeds!r}: give "
                     "comma-separated integers, e.g. 0,1,2")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.membranes != "predicted" and args.dataset != "ca1":
        parser.error("--membranes applies to --dataset ca1 (VNC has true membranes)")
    ds = datasets(args.runs, args.membranes)[args.dataset]
    out = args.runs / "gan12" / f"{args.dataset}{channel_suffix(args.membranes)}"
    ref = args.runs / "segment" / f"{args.dataset}_ref{args.ref_steps}"

    for marker, cmd in ds["prepare"]:
        if not marker.exists():
            run_all([(cmd, out / f"prepare_{cmd[0]}_{cmd[1]}.log")], 1)
    if not (ref / "model").is_dir():
        run_all([(["segment", "train", "-c", "configs/segment/cpu.yaml", *ds["ref"], "-o",
                   str(ref), "-s", f"engine.steps={args.ref_steps}", "-s", "engine.max_time=null",
                   "-s", "engine.num_threads=1"], out / "ref.log")], 1)

    train = []
    for gan_seed in gan_seeds:
        for variant in names:
            name = run_name(variant, gan_seed)
            if finished(out / name, args.steps):
                continue
            overrides = [o.replace("{ref}", str(ref)) for o in VARIANTS[variant]]
            cmd = ["gan", "train", "-c", "configs/gan/cpu.yaml", "-d", *ds["data"], *ds["gan"],
                   "-s", "engine.num_threads=1", "--steps", str(args.steps),
                   "--max-time", args.max_time, "-o", str(out / name)]
            if gan_seed:  # seed 0 is the preset's own engine.seed: its runs keep their commands
                overrides.append(f"engine.seed={gan_seed}")
            for o in overrides:
                cmd += ["-s", o]
            train.append((cmd, out / f"{name}.log"))
    run_all(train, args.jobs)
    by_gan_seed = {k: [run_name(v, k) for v in names] for k in gan_seeds}
    runs = [name for group in by_gan_seed.values() for name in group]
    unfinished = [n for n in runs if not finished(out / n, args.steps)]
    if unfinished:
        sys.exit(f"not at {args.steps} steps yet (safety net hit?): {unfinished}; rerun to resume")

    score = []
    for seed in seeds:  # seed by seed, so that a seed's real TSTR reference is shared at once
        for name in runs:
            result = score_file(out, name, args.tstr_steps, args.synthesis, seed)
            if result.is_file():
                continue
            score.append((["gan", "evaluate", "-g", str(out / name), "-d",
                           *ds["data"], *ds["score"], "-s", str(ref), "--tstr-steps",
                           str(args.tstr_steps), "--tstr-config", "configs/segment/cpu.yaml",
                           "--tstr-cache", str(args.runs / "gan12" / args.dataset / "tstr_cache"),
                           "--seed", str(seed), "--json", str(result),
                           *(["--whole-slice"] if args.synthesis == "whole" else [])],
                          result.with_suffix(".log")))
    run_all(score, args.jobs)

    print(table(out, runs, args.tstr_steps, args.synthesis))
    for group in by_gan_seed.values():
        for name in group[1:]:
            difference = tstr_difference(out, group[0], name, args.tstr_steps, args.synthesis)
            if difference.n > 1:
                print(f"TSTR ratio, {name} − {group[0]}, paired over seeds: "
                      f"{difference.text()}, p = {difference.p:.3f}")
    if args.figure is not None:
        gens = []
        for name in by_gan_seed[gan_seeds[0]]:
            gens += ["-g", str(out / name)]
        run_all([(["gan", "figure", *gens, "-d", *ds["data"], "--slices",
                   ds["score"][1].split("-")[-1], "--crop", "256", "--out", str(args.figure)],
                  out / "figure.log")], 1)


def run_name(variant: str, gan_seed: int) -> str:
    """A variant's GAN folder for a training seed (seed 0 keeps the plain name)."""
    return variant if gan_seed == 0 else f"{variant}_gan{gan_seed}"


def score_file(out: Path, name: str, tstr_steps: int, synthesis: str, seed: int = 0) -> Path:
    """Where `gan evaluate --json` writes a variant's scores for these TSTR steps, synthesis and
    evaluation seed (seed 0 keeps the name it had before there were seeds)."""
    return out / f"{name}_tstr{tstr_steps}_{synthesis}{f'_seed{seed}' if seed else ''}.json"


def tstr_by_seed(out: Path, name: str, tstr_steps: int, synthesis: str) -> dict[int, float]:
    """A variant's TSTR ratio for every evaluation seed scored so far."""
    stem = f"{name}_tstr{tstr_steps}_{synthesis}"
    found = {}
    for path in out.glob(f"{stem}*.json"):
        named = re.fullmatch(re.escape(stem) + r"(?:_seed(\d+))?", path.stem)  # see score_file
        scores = json.loads(path.read_text()) if named else {}
        if "tstr_ratio" in scores:
            found[int(named[1] or 0)] = scores["tstr_ratio"]
    return dict(sorted(found.items()))


def tstr_difference(out: Path, a: str, b: str, tstr_steps: int, synthesis: str) -> Summary:
    """TSTR ratio of b minus a, paired over the evaluation seeds both were scored with."""
    return paired_difference(tstr_by_seed(out, a, tstr_steps, synthesis),
                             tstr_by_seed(out, b, tstr_steps, synthesis))


def table(out: Path, names: list[str], tstr_steps: int, synthesis: str) -> str:
    """Markdown table of the variants' scores, with the CPU kind and precision they trained in;
    a variant's scores with and without TSTR are merged (the synthesis is the same).
    TSTR is seed 0's (synthetic / real IoU; and the synthetic-trained segmenter's IoU on
    synthetic images, where scored) or, when several seeds were scored, their mean ± 95%
    t-interval; the other columns are seed 0's."""
    header = ("| variant | TSTR ratio (synthetic / real IoU) | spectrum distance | local-std W1 "
              "cytoplasm / mito | lattice mito (real) | FID − baseline | KID | grey W1 | "
              "FCN ratio | steps | CPU, precision |")
    rows = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        # Scores with and without TSTR (--tstr-steps 0) come from the same synthesis: a TSTR file
        # written before the lattice score existed takes it from a later --tstr-steps 0 run.
        s = {}
        for steps in (0, tstr_steps):
            path = score_file(out, name, steps, synthesis)
            s.update(json.loads(path.read_text()) if path.is_file() else {})
        run = json.loads((out / name / "run.json").read_text())
        kind = f"{run['resolved']['cpu_kind']}, {run['resolved']['precision']}"
        ratios = tstr_by_seed(out, name, tstr_steps, synthesis)
        tstr = (f"{s['tstr_ratio']:.3f} ({s['tstr_iou_synthetic']:.3f} / {s['tstr_iou_real']:.3f})"
                if "tstr_ratio" in s else "not measured")
        if "tstr_iou_synthetic_on_synthetic" in s:  # absent from scores written before it
            tstr += f"; on synthetic {s['tstr_iou_synthetic_on_synthetic']:.3f}"
        if len(ratios) > 1:
            tstr = summarize(list(ratios.values())).text()
        lattice = (f"{s['lattice_mito']:.3f} ({s['lattice_mito_real']:.3f})"
                   if "lattice_mito" in s else "not measured")  # scores written before it
        rows.append(
            f"| {name} | {tstr} | {s['spectrum_distance']:.3f} | "
            f"{s['local_std_w1_cytoplasm']:.1f} / {s['local_std_w1_mito']:.1f} | {lattice} | "
            f"{s['fid_minus_baseline']:.2f} | {s['kid']:.2f} | {s['grey_level_w1']:.1f} | "
            f"{s['fcn_ratio']:.2f} | {run['end_step']} | {kind} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
