"""Time the phantom generator: ms per slice at 256, 512 and 1024 px for each domain.

Run: .venv/bin/python benchmarks/phantom_speed.py [--repeats N]
Prints the median over N seeds of one full slice (image + masks) in wall-clock and CPU time
(CPU time is the fairer figure on a machine shared with other jobs), of masks only, and the
per-slice cost inside a volume (whose tissue set-up is shared by all its slices).
"""

from __future__ import annotations

import argparse
import statistics
import time

from emsynth.data.phantom import DOMAINS, generate_masks, generate_slice, generate_volume


def _median_ms(fn, repeats: int) -> tuple[float, float]:
    """(wall, CPU) milliseconds, medians over seeds 0..repeats-1."""
    wall, cpu = [], []
    for seed in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(seed)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="seeds timed per entry")
    parser.add_argument("--volume-slices", type=int, default=8, help="slices per timed volume")
    args = parser.parse_args()
    generate_slice("vnc", (64, 64), 0)  # warm caches and imports
    print(
        f"{'domain':<6} {'size':>5} {'slice ms':>9} {'slice cpu ms':>13} {'masks ms':>9} "
        f"{'in volume ms/slice':>19}"
    )
    for name in DOMAINS:
        for size in (256, 512, 1024):
            shape = (size, size)
            full, cpu = _median_ms(
                lambda s, d=name, sh=shape: generate_slice(d, sh, s), args.repeats
            )
            masks, _ = _median_ms(
                lambda s, d=name, sh=shape: generate_masks(d, sh, s), args.repeats
            )
            n = args.volume_slices
            start = time.perf_counter()
            generate_volume(name, n, shape, 0)
            per_slice = 1000 * (time.perf_counter() - start) / n
            print(
                f"{name:<6} {size:>5} {full:>9.1f} {cpu:>13.1f} {masks:>9.1f} {per_slice:>19.1f}"
            )


if __name__ == "__main__":
    main()
