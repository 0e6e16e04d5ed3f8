"""Flat memory: blockwise `emsynth segment predict` on phantom OME-Zarr volumes 1x, 2x, 4x, 8x.

Sizes: 1x = Z x S x S, 2x = 2Z x S x S, 4x = Z x 2S x 2S, 8x = 2Z x 2S x 2S (slices grow as well
as their number). Each volume is written block by block from a small pool of phantom tiles
(flipped and rotated per block), so it is never in memory whole; then `emsynth segment predict`
runs on it in its own process, and that process's peak RSS comes from os.wait4 (the rusage of
that one child). The model is the default segmenter U-Net, untrained (the content does not
matter for memory or speed), without TTA; a trained one can be passed with --model. Prints
volume size, peak RSS, MP/s (prediction only, as the command reports it) and the peak-RSS
ratio 8x / 1x, with the CPU kind and the precision.

    .venv/bin/python benchmarks/volume_memory.py --quick   # 2 x 256 x 256 base: < 2 minutes
    .venv/bin/python benchmarks/volume_memory.py           # 8x = 32 x 8192 x 8192, 2.1 GB uint8
    # the same in a 1 GB memory cgroup (smaller than the 8x volume), with a narrow U-Net
    .venv/bin/python benchmarks/volume_memory.py --limit-mb 1024 --channels 8,16,32,64
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUICK = {"slices": 2, "size": 256, "block": "2,256,256"}
FULL = {"slices": 16, "size": 4096, "block": "8,1024,1024"}
FACTORS = {"1x": (1, 1), "2x": (2, 1), "4x": (1, 2), "8x": (2, 2)}  # (z, y and x) factors


def write_phantom(path: Path, shape: tuple[int, int, int], block: tuple[int, int, int],
                  seed: int = 0) -> None:
    """An OME-Zarr phantom of `shape` written block by block from a pool of 4 phantom slices
    of one block's size, each block a random flip/rotation of pool slices."""
    import numpy as np

    from emsynth.data.blocks import iter_blocks
    from emsynth.data.omezarr import create_image
    from emsynth.data.phantom.generate import generate_volume

    side = max(min(block[1], shape[1]), min(block[2], shape[2]))
    pool = generate_volume("vnc", 4, (side, side), seed).image
    rng = np.random.default_rng(seed)
    array = create_image(path, shape, np.uint8, scale_nm=(8.0, 8.0, 8.0), chunks=block,
                         name="phantom")
    for b in iter_blocks(shape, block):
        nz, ny, nx = (b.z[1] - b.z[0]), (b.y[1] - b.y[0]), (b.x[1] - b.x[0])
        slab = np.stack([np.rot90(pool[rng.integers(len(pool))], int(rng.integers(4)))
                         for _ in range(nz)])
        array[b.slices] = slab[:, :ny, :nx]


def memory_cgroup(limit_mb: int) -> Path:
    """A fresh memory cgroup (v2 `memory.max` or v1 `memory.limit_in_bytes`) below this
    process's own, limited to `limit_mb`: the memory "given to" the prediction process, so a
    volume larger than it shows that nothing holds the volume. Needs a writable cgroup tree
    (root, or a delegated subtree); exits with the reason otherwise."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = [line.split(":", 2)[2] for line in lines if line.split(":")[1] == "memory"]
    if v1:
        base, limit_file = Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/"), "memory.limit_in_bytes"
    else:
        own = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
        base, limit_file = Path("/sys/fs/cgroup") / own.lstrip("/"), "memory.max"
    group = base / f"emsynth-volume-memory-{os.getpid()}"
    try:
        group.mkdir(exist_ok=True)
        (group / limit_file).write_text(str(limit_mb * 2**20))
    except OSError as err:
        raise SystemExit(f"--limit-mb needs a writable memory cgroup ({group}: {err}). Fix: run "
                         "as root or in a delegated cgroup, or drop --limit-mb") from None
    return group


def predict(input_path: Path, model: Path, out: Path, block: str, precision: str,
            threads: int | None, cgroup: Path | None = None) -> dict:
    """`emsynth segment predict` in a child process: its wall time, peak RSS and MP/s."""
    cmd = [sys.executable, "-m", "emsynth.cli", "segment", "predict", str(input_path), "-m",
           str(model), "-o", str(out), "--block", block, "--device", "cpu", "--precision",
           precision]
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    if cgroup is not None:  # the child joins the cgroup, then becomes the prediction
        cmd = ["sh", "-c", f'echo $$ > "{cgroup / "cgroup.procs"}" && exec "$@"', "sh", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    stdout = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"segment predict failed ({proc.returncode}): {' '.join(cmd)}\n{stdout}")
    found = re.search(r"([0-9.]+) MP/s", " ".join(stdout.split()))
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
            "mps": float(found.group(1)) if found else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 x 256 x 256 base (< 2 min).")
    parser.add_argument("--slices", type=int, help="Z of the 1x volume (default 16).")
    parser.add_argument("--size", type=int, help="S of the 1x volume (default 4096).")
    parser.add_argument("--block", help="z,y,x blocks (default 8,1024,1024).")
    parser.add_argument("--model", type=Path, help="A segmenter (default: untrained default).")
    parser.add_argument("--channels", default=None,
                        help="Widths of the untrained U-Net, e.g. 8,16,32,64 (default: the "
                        "segmenter default); memory does not depend on it, time does.")
    parser.add_argument("--limit-mb", type=int, default=None,
                        help="Run each prediction in a memory cgroup of this size (e.g. 1024, "
                        "below the 8x volume's 2.1 GB); needs a writable cgroup tree.")
    parser.add_argument("--precision", default="auto", help="fp32, bf16 or auto.")
    parser.add_argument("--threads", type=int, default=None, help="OMP threads of the child.")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Where the volumes go (default: a temporary folder; the 8x volume "
                        "and its prediction need about 2x its size on disk).")
    args = parser.parse_args()
    sizing = QUICK if args.quick else FULL
    slices = args.slices or sizing["slices"]
    size = args.size or sizing["size"]
    block_text = args.block or sizing["block"]
    block = tuple(int(v) for v in block_text.split(","))

    import torch

    from emsynth.engine.device import cpu_kind, resolve_precision
    from emsynth.segment.config import InferConfig, ModelConfig
    from emsynth.segment.model import Segmenter, build_model

    precision = resolve_precision(args.precision, torch.device("cpu"), warn=False)
    work = Path(tempfile.mkdtemp(prefix="volume_memory.", dir=args.workdir))
    cgroup = None
    try:
        model = args.model
        if model is None:
            torch.manual_seed(0)
            model = work / "model"
            cfg = ModelConfig()
            if args.channels is not None:
                widths = [int(c) for c in args.channels.split(",")]
                cfg = ModelConfig(channels=widths, strides=[2] * (len(widths) - 1))
            Segmenter(build_model(cfg, 1).eval(), cfg, ["image"], "mito", 0.5,
                      InferConfig()).save(model)
        cgroup = memory_cgroup(args.limit_mb) if args.limit_mb else None
        rows = []
        for name, (fz, fyx) in FACTORS.items():
            shape = (slices * fz, size * fyx, size * fyx)
            src, out = work / f"{name}.ome.zarr", work / f"{name}.pred.ome.zarr"
            start = time.perf_counter()
            write_phantom(src, shape, block)
            made = time.perf_counter() - start
            result = predict(src, model, out, block_text, precision, args.threads, cgroup)
            rows.append({"name": name, "shape": shape, "mb": shape[0] * shape[1] * shape[2] / 1e6,
                         "gen_s": made, **result})
            print(f"{name}: {shape[0]} x {shape[1]} x {shape[2]} done "
                  f"({result['peak_rss_mb']:.0f} MB peak)", file=sys.stderr, flush=True)
            shutil.rmtree(src)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if cgroup is not None:
            cgroup.rmdir()
    width = f"U-Net channels {args.channels}" if args.channels else "default segmenter U-Net"
    limit = f", in a {args.limit_mb} MB memory cgroup" if args.limit_mb else ""
    print(f"blockwise `emsynth segment predict`, blocks {block_text}, {width} (untrained unless "
          f"--model), no TTA{limit}; CPU: {cpu_kind()}, {torch.get_num_threads()} threads, "
          f"precision {precision}")
    print(f"{'volume':<7} {'z x y x':>18} {'MB uint8':>9} {'peak RSS MB':>12} {'MP/s':>7} "
          f"{'wall s':>7}")
    for r in rows:
        z, y, x = r["shape"]
        print(f"{r['name']:<7} {f'{z} x {y} x {x}':>18} {r['mb']:>9.1f} "
              f"{r['peak_rss_mb']:>12.0f} {r['mps']:>7.2f} {r['wall_s']:>7.1f}")
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(f"peak RSS 8x / 1x: {ratio:.2f} (volume 8x / 1x: {rows[-1]['mb'] / rows[0]['mb']:.0f})")


if __name__ == "__main__":
    main()
