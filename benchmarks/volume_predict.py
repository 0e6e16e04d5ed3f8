"""Volume inference throughput: emsynth's blockwise prediction against MONAI's
`sliding_window_inference` at its defaults, side by side on the Lucchi++ validation slices.

Modes, each in its own child process so that its peak RSS is its own:

- monai: sliding_window_inference(sw_batch_size=1, overlap=0.25, mode="constant"), fp32, the
  model's window: a plain loop over the slices (read from the same OME-Zarr into memory
  before the clock starts), probabilities kept in memory, nothing written;
- blockwise: `segment predict`'s blockwise path, `predict_to_ome_zarr` (OME-Zarr in; OME-Zarr
  out with the mask as labels/mito and the pyramid; blocks of 8 x 1024 x 1024), the model's own
  infer config without TTA, precision auto (bf16 only where the CPU has it natively);
- blockwise-fp32: the same in fp32;
- blockwise-tta: precision auto with 8-way TTA on the first --tta-slices slices, each round
  followed by the same slices without TTA: the TTA cost is the ratio of the two times.

The parent asks the children in turn, round by round, so that load from other processes on a
shared machine falls on every mode alike. A mode's MP/s is its best round (load only ever slows
a round down); ratios are of best rounds, with each round's ratio alongside, and also per CPU
second of the child. On a loaded machine `--threads 1` gives the steadiest ratios: with more
threads every OpenMP barrier waits for whichever thread is descheduled, which hurts many small
forward passes (MONAI's sw_batch_size 1) far more than few large ones. Masks are taken at the
model's threshold; foreground IoU is against the labels and against MONAI's mask. Uses the
trained model at --model when there is one, else an untrained default U-Net (IoU against the
labels is then meaningless; between the paths it still compares them). Prints the CPU kind.

    .venv/bin/python benchmarks/volume_predict.py --quick --threads 1    # 2 slices, ~1 min
    .venv/bin/python benchmarks/volume_predict.py --slices 8 --threads 1 # ~3 min
    .venv/bin/python benchmarks/volume_predict.py                        # all 20, all cores
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python \\
        benchmarks/volume_predict.py --quick --threads 1                 # as on an AVX2 CPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "lucchi_pp" / "train"
DEFAULT_MODEL = ROOT / "runs" / "bench" / "cpu_auto_9m" / "model"
MODES = ("monai", "blockwise", "blockwise-fp32", "blockwise-tta")
BLOCK = (8, 1024, 1024)  # the CLI's default block


def load_segmenter(path: Path):
    """The trained segmenter at `path`, else an untrained default U-Net (seed 0)."""
    import torch

    from emsynth.segment.config import InferConfig, ModelConfig
    from emsynth.segment.model import Segmenter, build_model

    if (path / "model.safetensors").is_file():
        return Segmenter.load(path), True
    torch.manual_seed(0)
    cfg = ModelConfig()
    return Segmenter(build_model(cfg, 1).eval(), cfg, ["image"], "mito", 0.5, InferConfig()), False


# --- a child: one mode, run when the parent asks ---------------------------------------------


def usage() -> tuple[float, float]:
    """(CPU seconds of this process so far, peak RSS in MB). The peak is VmHWM, which starts
    afresh at exec; getrusage's ru_maxrss would include the parent's (Linux keeps it)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    peak = ru.ru_maxrss / 1024
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return ru.ru_utime + ru.ru_stime, peak


def child(args) -> None:
    import numpy as np
    import torch

    from emsynth.data.omezarr import open_ome_zarr
    from emsynth.engine.device import resolve_precision
    from emsynth.segment.blockwise import BlockwiseModel, blockwise_model, predict_to_ome_zarr
    from emsynth.segment.infer import window_size
    from emsynth.segment.model import to_float

    torch.set_num_threads(args.threads)
    segmenter, _ = load_segmenter(Path(args.model))
    net = segmenter.net.eval()
    full = open_ome_zarr(args.input).array
    n = args.tta_slices if args.child == "blockwise-tta" else full.shape[0]
    src = full[:n] if n < full.shape[0] else full
    src = np.asarray(src) if args.child == "monai" else src  # blockwise reads the zarr lazily
    shape = (n, full.shape[1], full.shape[2])
    cpu = torch.device("cpu")
    threshold = segmenter.threshold
    if args.child == "monai":
        from monai.inferers import sliding_window_inference

        roi = window_size(shape[1], shape[2], segmenter.infer.window, segmenter.model.divisor)
        precision = "fp32"

        def predict(zs: range) -> np.ndarray:
            probs = np.empty((len(zs), *shape[1:]), np.float32)
            with torch.no_grad():
                for j, i in enumerate(zs):  # defaults: sw_batch_size 1, overlap 0.25, constant
                    plane = to_float(torch.from_numpy(np.asarray(src[i : i + 1]))[None])
                    logits = sliding_window_inference(plane, roi, 1, net)
                    probs[j] = torch.sigmoid(logits)[0, 0].numpy()
            return probs >= threshold

        def mask_of(mask: np.ndarray) -> np.ndarray:
            return mask
    else:
        precision = "fp32" if args.child == "blockwise-fp32" else "auto"
        model = blockwise_model(segmenter, shape, cpu, precision, tta=args.child.endswith("tta"))
        precision = resolve_precision(precision, cpu, warn=False)
        plain = dataclasses.replace(model, tta=False)  # the TTA child's reference, same slices
        out = Path(args.work) / f"{args.child}.ome.zarr"

        def predict(zs: range, bw: BlockwiseModel = model) -> np.ndarray:
            part = src if len(zs) == shape[0] else src[zs.start : zs.stop]
            predict_to_ome_zarr(bw, part, out, threshold=threshold, label="mito",
                                block=BLOCK, shape=(len(zs), *shape[1:]))
            return out

        def mask_of(out: Path) -> np.ndarray:  # read back, then removed: neither is timed
            mask = open_ome_zarr(out).label("mito").array[:, :, :] != 0
            shutil.rmtree(out)
            return mask

    tta = args.child == "blockwise-tta"
    mask_of(predict(range(1)))  # warm-up: oneDNN primitives, the prepared net, first touches
    if tta:
        mask_of(predict(range(1), plain))
    print(json.dumps({"ready": True, "precision": precision, "slices": shape[0]}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        cpu0, _ = usage()
        start = time.perf_counter()
        result = predict(range(shape[0]))
        wall = time.perf_counter() - start
        cpu1, rss = usage()
        mask = mask_of(result)
        np.save(Path(args.work) / f"{args.child}.npy", mask)
        result = {"wall": wall, "cpu": cpu1 - cpu0, "rss": rss, "mp": mask.size / 1e6}
        if tta:  # the same slices without TTA, right after
            start = time.perf_counter()
            plain_out = predict(range(shape[0]), plain)
            result["wall_plain"] = time.perf_counter() - start
            mask_of(plain_out)
        print(json.dumps(result), flush=True)


# --- the parent -----------------------------------------------------------------------------


def start_child(mode: str, args, input_path: Path, work: Path) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", mode, "--input", str(input_path),
           "--work", str(work), "--model", str(args.model), "--threads", str(args.threads),
           "--tta-slices", str(args.tta_slices)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def ask(proc: subprocess.Popen, command: str | None) -> dict:
    if command is not None:
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"a benchmark child exited (code {proc.wait()}); see its stderr above")
    return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="Lucchi++ training volume (slices layout)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="a trained segmenter (else an untrained default U-Net)")
    parser.add_argument("--slices", type=int, default=None,
                        help="the first N validation slices (default: all 20)")
    parser.add_argument("--tta-slices", type=int, default=None,
                        help="slices for the TTA mode (default: a quarter of --slices, >= 1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per mode (default: every usable core, as the CLI)")
    parser.add_argument("--modes", default=",".join(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="2 slices (TTA on 1): about a minute with --threads 1")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--input", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from emsynth.engine.device import thread_count

    args.threads = thread_count(args.threads)
    if args.child:
        child(args)
        return
    if args.quick:
        args.slices = args.slices or 2
    run(args)


def run(args) -> None:
    import numpy as np

    from emsynth.config import load_config
    from emsynth.data.omezarr import write_volume
    from emsynth.data.readers import read_volume
    from emsynth.data.volume import Volume
    from emsynth.segment.config import SegmentConfig
    from emsynth.segment.train import resolve_split

    volume = read_volume(args.data, "slices")
    cfg = load_config(SegmentConfig, ROOT / "configs" / "segment" / "cpu.yaml", [])
    val = resolve_split(cfg, volume.image.shape[0]).val
    val = val[: args.slices] if args.slices else val
    args.tta_slices = min(args.tta_slices or max(1, len(val) // 4), len(val))
    labels = volume.labels["mito"][val]
    segmenter, trained = load_segmenter(args.model)
    modes = [m for m in args.modes.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="volume_predict_") as tmp:
        work = Path(tmp)
        part = Volume(np.ascontiguousarray(volume.image[val]), {"mito": labels},
                      source=f"{args.data} (slices)")
        input_path = write_volume(part, work / "in.ome.zarr")
        children, info = {}, {}
        try:
            for mode in modes:  # started together (untimed warm-ups), then run in turn
                children[mode] = start_child(mode, args, input_path, work)
            for mode in modes:
                info[mode] = ask(children[mode], None)
            rows: dict[str, list[dict]] = {m: [] for m in modes}
            masks = {}
            for r in range(args.rounds):
                for mode in modes:  # interleaved: each round runs every mode once, in turn
                    rows[mode].append(ask(children[mode], "run"))
                    if r == 0:
                        masks[mode] = np.load(work / f"{mode}.npy")
                    print(f"round {r + 1}/{args.rounds} {mode:<15} "
                          f"{rows[mode][-1]['wall']:7.1f} s", file=sys.stderr, flush=True)
        finally:
            for proc in children.values():
                if proc.poll() is None:
                    proc.stdin.write("quit\n")
                    proc.stdin.flush()
                    proc.wait(timeout=60)
    report = summarise(args, val, labels, rows, masks, info, segmenter, trained)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def summarise(args, val, labels, rows, masks, info, segmenter, trained: bool) -> dict:
    """Print the table and the ratios; return them as a dict. A mode's MP/s is its best
    round (other processes' load only ever slows a round down); ratios are of best rounds,
    with the per-round ratios alongside."""
    import torch

    from emsynth.engine.device import cpu_kind, resolve_precision
    from emsynth.segment.metrics import counts

    auto = resolve_precision("auto", torch.device("cpu"), warn=False)
    model = (f"{args.model} (trained, threshold {segmenter.threshold})" if trained else
             "untrained default U-Net (no model at --model: IoU vs labels is meaningless)")
    print(f"Lucchi++ validation slices {val[0]}-{val[-1]} ({len(val)} x {labels.shape[1]} x "
          f"{labels.shape[2]}); model {model}; window {segmenter.infer.window}, overlap "
          f"{segmenter.infer.overlap}, sw_batch_size {segmenter.infer.sw_batch_size}")
    print(f"CPU: {cpu_kind()}; {args.threads} torch threads; precision auto = {auto}; "
          f"{args.rounds} interleaved rounds")
    print(f"{'mode':<15} {'precision':<9} {'slices':>6} {'MP/s':>7} {'MP/CPU-s':>8} "
          f"{'peak RSS MB':>11} {'IoU labels':>10} {'IoU monai':>9}")
    report: dict = {"cpu": cpu_kind(), "threads": args.threads, "precision_auto": auto,
                    "slices": [val[0], val[-1]], "trained": trained, "modes": {}}

    def mps(mode: str, key: str = "wall") -> list[float]:
        return [r["mp"] / r[key] for r in rows[mode]]

    for mode, rs in rows.items():
        n = masks[mode].shape[0]
        iou = counts(masks[mode], labels[:n]).iou
        vs = counts(masks[mode], masks["monai"][:n]).iou if "monai" in masks else float("nan")
        rss = max(r["rss"] for r in rs)
        print(f"{mode:<15} {info[mode]['precision']:<9} {n:>6} {max(mps(mode)):>7.3f} "
              f"{max(mps(mode, 'cpu')):>8.3f} {rss:>11.0f} {iou:>10.4f} {vs:>9.4f}")
        report["modes"][mode] = {"precision": info[mode]["precision"], "slices": n,
                                 "mp_per_s": max(mps(mode)), "mp_per_s_rounds": mps(mode),
                                 "mp_per_cpu_s": max(mps(mode, "cpu")), "peak_rss_mb": rss,
                                 "iou_labels": iou, "iou_vs_monai": vs}
    for a in ("blockwise", "blockwise-fp32"):
        if a in rows and "monai" in rows:
            best = max(mps(a)) / max(mps("monai"))
            each = [x / y for x, y in zip(mps(a), mps("monai"))]
            cpu = max(mps(a, "cpu")) / max(mps("monai", "cpu"))
            print(f"{a} / monai MP/s: {best:.2f}x (rounds: {', '.join(f'{e:.2f}' for e in each)}"
                  f"); per CPU second {cpu:.2f}x")
            report[f"{a}/monai"] = {"best": best, "rounds": each, "cpu": cpu}
    if "blockwise-tta" in rows:
        each = [r["wall"] / r["wall_plain"] for r in rows["blockwise-tta"]]
        best = min(r["wall"] for r in rows["blockwise-tta"]) / min(
            r["wall_plain"] for r in rows["blockwise-tta"])
        print(f"TTA cost (8-way, same {masks['blockwise-tta'].shape[0]} slices, precision "
              f"{info['blockwise-tta']['precision']}): {best:.1f}x the time of no TTA (rounds: "
              f"{', '.join(f'{e:.1f}' for e in each)})")
        report["tta_cost"] = {"best": best, "rounds": each}
    return report


if __name__ == "__main__":
    main()
