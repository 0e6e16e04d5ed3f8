"""Slice selections of a volume: "0-9,20-29" ranges, contiguous z blocks, even spreads.

Every stage holds validation (and the study also test) slices out as contiguous z blocks:
neighbouring EM slices are nearly identical, so interleaved held-out slices would measure
memorisation, not generalisation, and so would a held-out block whose neighbours train. Every
stage leaves `DEFAULT_GAP` slices out on each side of its held-out blocks, through one rule:
`training_slices` (the slices that may train, given the held-out ones); `split_blocks` places the
blocks at the end of a volume (the study, the GAN, segment train's default validation block).
"""

from __future__ import annotations

import numpy as np

from emsynth.errors import EmsynthError

#: Slices left out between a held-out block and the training slices, by default in every stage
#: (the study's split.gap, segment and membranes data.val_gap, the GAN's data.val_gap):
#: neighbouring slices correlate at ~0.9, so a training slice next to a validation slice makes
#: the validation figures optimistic. 0 only where a volume is too short (tiny test phantoms).
DEFAULT_GAP = 5


def parse_slices(spec: str, n_slices: int, what: str = "slices") -> list[int]:
    """Slice indices from "a-b" (inclusive), "a", or comma-joined parts: "0-9,20-29"."""
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise EmsynthError(
                f"{what} {spec!r} is not a slice range. Fix: write e.g. 0-144 or 0-9,20-29"
            ) from None
    if not out:
        raise EmsynthError(f"{what} {spec!r} selects no slices. Fix: write e.g. 0-144")
    bad = [i for i in out if not 0 <= i < n_slices]
    if bad:
        raise EmsynthError(
            f"{what} {spec!r} names slice {bad[0]} but the volume has {n_slices} "
            f"(0-{n_slices - 1})."
            " Fix: use indices inside the volume"
        )
    return sorted(set(out))


def split_blocks(
    n_slices: int,
    val: int,
    test: int = 0,
    gap: int = DEFAULT_GAP,
    *,
    fix: str = "use smaller blocks",
    where: str = "",
) -> tuple[list[int], list[int], list[int]]:
    """Contiguous z blocks: train = the first slices, then val, then test, in z order.

    `gap` slices are left out between neighbouring blocks (`training_slices`'s rule) so the last
    training slice and the first validation slice are not near-duplicates. When no training
    slice would be left, the error names the volume (`where`, e.g. its source) and says how to
    fix it (`fix`, naming the caller's own settings).
    """
    used = val + test + gap * ((val > 0) + (test > 0))
    if used >= n_slices:
        held = f"{val} validation" + (f" + {test} test" if test else "")
        gaps = f" (with gaps of {gap})" if gap else ""
        prefix = f"{where}: " if where else ""
        raise EmsynthError(
            f"{prefix}holding out {held} slices{gaps} leaves no training slices in a "
            f"{n_slices}-slice volume. Fix: {fix}"
        )
    start = n_slices - used + (gap if val else 0)
    val_idx = list(range(start, start + val))
    start = start + val + (gap if test else 0)
    test_idx = list(range(start, start + test))
    train = training_slices(n_slices, val_idx + test_idx, gap, fix=fix, where=where)
    return train, val_idx, test_idx


def training_slices(
    n_slices: int,
    held: list[int],
    gap: int = DEFAULT_GAP,
    train: list[int] | None = None,
    *,
    fix: str = "use a smaller held-out block or gap",
    where: str = "",
) -> list[int]:
    """The slices that may train: `train` (default: every slice) less the held-out slices and
    the `gap` slices on either side of each held-out one. Given training slices inside a gap
    are left out too (the gap is what keeps near-duplicates of held-out slices out of
    training); callers record the slices they train on. Raises when none is left."""
    near = set()
    for z in held:
        near.update(range(z - gap, z + gap + 1))
    out = [z for z in (range(n_slices) if train is None else train) if z not in near]
    if not out:
        prefix = f"{where}: " if where else ""
        raise EmsynthError(
            f"{prefix}holding out {len(held)} slices with a gap of {gap} leaves no training "
            f"slices in a {n_slices}-slice volume. Fix: {fix}"
        )
    return out


def evenly_spaced(indices: list[int], count: int) -> list[int]:
    """`count` indices spread evenly over `indices` (first and last included)."""
    if count >= len(indices):
        return list(indices)
    picks = np.round(np.linspace(0, len(indices) - 1, count)).astype(int)
    return [indices[i] for i in picks]
