"""Blockwise 2D sliding-window prediction of volumes of any size, with bounded memory.

The sliding windows lie on one global grid per slice (window `w`, stride `s = w (1 - overlap)`,
windows at 0, s, 2s, ... until the slice is covered; the last ones reach past the edge and see
replicate padding, as MONAI's do). A block of output pixels [b0, b1) needs exactly the grid
windows that touch it, so it reads its input with a halo of up to one window on each side,
blends those windows in the same order as a whole-slice pass would, and crops. The result of a
blockwise run is therefore the whole-volume result, block size whatever it is (up to the float
rounding of a different batch composition; masks are equal in the tests).

Blocks are z/y/x boxes aligned with the output chunks, so every block writes its own chunks and
nothing else: blocks can run in any order, in several processes (`shard_id` / `num_shards`
take every num_shards-th block), and a done-marker file per block lets a killed run resume.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from emsynth.io import atomic_write_text

#: Test hook: seconds to sleep after each block (lets the kill -9 test stop a run midway).
SLEEP_ENV = "EMSYNTH_BLOCK_SLEEP"


@dataclass(frozen=True)
class Axis:
    """The global window grid along one axis of length `size`."""

    size: int
    window: int
    stride: int

    @property
    def count(self) -> int:
        if self.size <= self.window:
            return 1
        return math.ceil((self.size - self.window) / self.stride) + 1

    def windows(self, b0: int, b1: int) -> tuple[int, int]:
        """First and last window index touching output pixels [b0, b1)."""
        k0 = max(0, math.ceil((b0 - self.window + 1) / self.stride))
        k1 = min(self.count - 1, (b1 - 1) // self.stride)
        return k0, k1


def grid_axes(height: int, width: int, window: tuple[int, int], overlap: float) -> tuple[Axis, Axis]:
    """The y and x grids for slices of `height` x `width` (stride as in MONAI: at least 1)."""
    wy, wx = window
    sy = max(int(wy * (1 - overlap)), 1)
    sx = max(int(wx * (1 - overlap)), 1)
    return Axis(height, wy, sy), Axis(width, wx, sx)


def importance_map(window: tuple[int, int], blend: str) -> torch.Tensor:
    """MONAI's blending weights for one window (gaussian, sigma 0.125 of the side, or constant)."""
    from monai.data.utils import compute_importance_map

    weights = compute_importance_map(window, mode=blend, sigma_scale=0.125, device="cpu")
    weights = weights.float()
    nonzero = weights[weights > 0]
    return torch.clamp(weights, min=float(nonzero.min()) if nonzero.numel() else 1e-3)


@torch.no_grad()
def predict_region(
    net: nn.Module,
    read: Callable[[slice, slice], np.ndarray],
    out_y: tuple[int, int],
    out_x: tuple[int, int],
    axes: tuple[Axis, Axis],
    weights: torch.Tensor,
    *,
    sw_batch_size: int = 8,
    tta: bool = False,
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> np.ndarray:
    """Foreground probabilities (z, y1 - y0, x1 - x0) of output pixels out_y x out_x.

    read(ys, xs): the uint8 input (z, c, ys, xs) of a region inside the slice; the region
    beyond the slice edge is replicate-padded here, as on the whole slice.
    """
    from emsynth.segment.augment import dihedral, inverse_dihedral
    from emsynth.segment.model import to_float

    ay, ax = axes
    ky0, ky1 = ay.windows(*out_y)
    kx0, kx1 = ax.windows(*out_x)
    ry0, ry1 = ky0 * ay.stride, ky1 * ay.stride + ay.window
    rx0, rx1 = kx0 * ax.stride, kx1 * ax.stride + ax.window
    region = read(slice(ry0, min(ry1, ay.size)), slice(rx0, min(rx1, ax.size)))
    pad_y, pad_x = ry1 - min(ry1, ay.size), rx1 - min(rx1, ax.size)
    if pad_y or pad_x:
        region = np.pad(region, ((0, 0), (0, 0), (0, pad_y), (0, pad_x)), mode="edge")
    n_z = region.shape[0]
    num = torch.zeros((n_z, ry1 - ry0, rx1 - rx0), dtype=torch.float32)
    den = torch.zeros((ry1 - ry0, rx1 - rx0), dtype=torch.float32)
    positions = [(ky * ay.stride - ry0, kx * ax.stride - rx0)
                 for ky in range(ky0, ky1 + 1) for kx in range(kx0, kx1 + 1)]
    wy, wx = ay.window, ax.window
    for y, x in positions:
        den[y : y + wy, x : x + wx] += weights
    tensor = torch.from_numpy(np.ascontiguousarray(region))
    jobs = [(z, y, x) for z in range(n_z) for y, x in positions]
    for start in range(0, len(jobs), sw_batch_size):
        batch = jobs[start : start + sw_batch_size]
        x_in = torch.stack([tensor[z, :, y : y + wy, x : x + wx] for z, y, x in batch])
        x_in = to_float(x_in.to(device))
        if tta:
            out = torch.zeros((len(batch), 1, wy, wx), dtype=torch.float32, device=x_in.device)
            for k in range(8):
                with autocast():
                    logits = net(dihedral(x_in, k)).float()
                out += inverse_dihedral(torch.sigmoid(logits), k)
            out /= 8.0
        else:
            with autocast():
                out = net(x_in).float()
        out = out[:, 0].cpu()
        for (z, y, x), window_out in zip(batch, out):
            num[z, y : y + wy, x : x + wx] += window_out * weights
    cy0, cx0 = out_y[0] - ry0, out_x[0] - rx0
    cy1, cx1 = cy0 + out_y[1] - out_y[0], cx0 + out_x[1] - out_x[0]
    blended = num[:, cy0:cy1, cx0:cx1] / den[cy0:cy1, cx0:cx1]
    return (blended if tta else torch.sigmoid(blended)).numpy()


@dataclass(frozen=True)
class Block:
    index: tuple[int, int, int]
    z: tuple[int, int]
    y: tuple[int, int]
    x: tuple[int, int]

    @property
    def name(self) -> str:
        return "_".join(str(i) for i in self.index)

    @property
    def voxels(self) -> int:
        return (self.z[1] - self.z[0]) * (self.y[1] - self.y[0]) * (self.x[1] - self.x[0])


def iter_blocks(shape: Sequence[int], block: Sequence[int]) -> Iterator[Block]:
    """Blocks of `block` voxels (smaller at the far edges) tiling `shape`, in z, y, x order."""
    counts = [math.ceil(n / b) for n, b in zip(shape, block)]
    for i in range(counts[0]):
        for j in range(counts[1]):
            for k in range(counts[2]):
                spans = [
                    (idx * b, min((idx + 1) * b, n))
                    for idx, b, n in zip((i, j, k), block, shape)
                ]
                yield Block((i, j, k), *spans)


def shard_blocks(blocks: Sequence[Block], shard_id: int = 0, num_shards: int = 1) -> list[Block]:
    """Every num_shards-th block, starting at shard_id: shards are disjoint and cover all."""
    return [b for i, b in enumerate(blocks) if i % num_shards == shard_id]


@dataclass
class BlockwiseModel:
    """What a blockwise run needs of a 2D model: the net, its window grid and blending."""

    net: nn.Module
    window: tuple[int, int]
    overlap: float
    blend: str = "gaussian"
    sw_batch_size: int = 8
    tta: bool = False
    device: torch.device | str = "cpu"
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def run_blocks(
    model: BlockwiseModel,
    source,
    write: Callable[[Block, np.ndarray], None],
    blocks: Sequence[Block],
    *,
    done_dir: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Predict each block of `blocks` from `source` ((z, y, x) or (z, c, y, x) uint8, any
    array that slices lazily: numpy, zarr, an OME-Zarr view) and hand it to `write`.

    With done_dir, a block whose marker `done_dir/<block>.done` exists is skipped and a marker
    is written after each block's write returns. Returns the number of blocks predicted.
    """
    shape = source.shape
    height, width = shape[-2], shape[-1]
    axes = grid_axes(height, width, model.window, model.overlap)
    weights = importance_map((axes[0].window, axes[1].window), model.blend)
    sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
    was_training = model.net.training
    model.net.eval()
    done = 0
    try:
        for block in blocks:
            marker = None if done_dir is None else done_dir / f"{block.name}.done"
            if marker is not None and marker.exists():
                if progress is not None:
                    progress(block.voxels)
                continue
            z0, z1 = block.z

            def read(ys: slice, xs: slice, z0: int = z0, z1: int = z1) -> np.ndarray:
                if len(shape) == 3:
                    return np.asarray(source[z0:z1, ys, xs])[:, None]
                return np.asarray(source[z0:z1, :, ys, xs])

            probs = predict_region(
                model.net, read, block.y, block.x, axes, weights,
                sw_batch_size=model.sw_batch_size, tta=model.tta, device=model.device,
                autocast=model.autocast,
            )
            write(block, probs)
            if marker is not None:
                atomic_write_text(marker, f"{time.time():.3f}\n")
            done += 1
            if progress is not None:
                progress(block.voxels)
            if sleep:
                time.sleep(sleep)
    finally:
        model.net.train(was_training)
    return done


def predict_array(
    model: BlockwiseModel, source, block: Sequence[int] | None = None
) -> np.ndarray:
    """Probabilities (z, y, x) float32 of a whole in-memory volume, blockwise or (block None)
    in one block: the reference the blockwise runs are compared against."""
    shape = tuple(source.shape[:1]) + tuple(source.shape[-2:])
    out = np.empty(shape, np.float32)

    def write(b: Block, probs: np.ndarray) -> None:
        out[b.z[0] : b.z[1], b.y[0] : b.y[1], b.x[0] : b.x[1]] = probs

    run_blocks(model, source, write, list(iter_blocks(shape, block or shape)))
    return out


# --- OME-Zarr output: a resumable, shardable prediction -----------------------------------------

DONE_DIR = ".emsynth-done"
PROB_NAME = "prob"


def _open_output(out: Path, shape, block, scale_nm, label: str, float_prob: bool,
                 signature: dict):
    """Create the output OME-Zarr (image = probabilities, labels/<label> = mask) atomically, or
    open the one an earlier or concurrent run created with the same signature."""
    import json
    import shutil

    import zarr

    from emsynth.data.omezarr import create_image, create_label, group_attrs
    from emsynth.errors import input_error

    if not out.exists():
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            create_image(tmp, shape, np.float32 if float_prob else np.uint8, scale_nm=scale_nm,
                         chunks=block, name=PROB_NAME, extra=signature)
            create_label(tmp, label, shape, np.uint8, scale_nm=scale_nm, chunks=block)
            (tmp / DONE_DIR).mkdir()
            try:
                os.rename(tmp, out)  # fails if another shard created it first: use theirs
            except OSError:
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    attrs = group_attrs(out) or {}
    found = attrs.get("emsynth")
    if not isinstance(found, dict) or {k: found.get(k) for k in signature} != signature:
        theirs = {k: found.get(k) for k in signature} if isinstance(found, dict) else None
        diff = [k for k in signature if not theirs or theirs.get(k) != signature[k]]
        raise input_error(
            out,
            "exists and is not a prediction of this input with these settings "
            f"(differs in: {', '.join(diff) or 'format'}; {json.dumps(theirs)[:200]})",
            "choose a new --out, or delete it to start over",
        )
    group = zarr.open_group(store=str(out), mode="r+")
    return group["0"], group["labels"][label]["0"]


def predict_to_ome_zarr(
    model: BlockwiseModel,
    source,
    out: str | Path,
    *,
    threshold: float,
    label: str,
    block: Sequence[int],
    scale_nm: Sequence[float] | None = None,
    float_prob: bool = False,
    shard_id: int = 0,
    num_shards: int = 1,
    signature: dict | None = None,
    progress_factory: Callable[[int], contextlib.AbstractContextManager] | None = None,
) -> dict:
    """Predict `source` blockwise into the OME-Zarr `out`: image = probabilities (uint8 0-255
    or float32), labels/<label> = mask (0/1). Resumes from the done-markers; with num_shards > 1
    this process does every num_shards-th block. Returns counts and whether all blocks are done.
    """
    from emsynth.segment.infer import probability_to_uint8

    out = Path(out)
    shape = (source.shape[0], source.shape[-2], source.shape[-1])
    block = tuple(min(b, n) for b, n in zip(block, shape))
    signature = {"shape": list(shape), "block": list(block), "float_prob": float_prob,
                 **(signature or {})}
    prob_arr, mask_arr = _open_output(out, shape, block, scale_nm, label, float_prob, signature)
    done_dir = out / DONE_DIR
    blocks = list(iter_blocks(shape, block))
    mine = shard_blocks(blocks, shard_id, num_shards)

    def write(b: Block, probs: np.ndarray) -> None:
        sel = (slice(*b.z), slice(*b.y), slice(*b.x))
        prob_arr[sel] = probs if float_prob else probability_to_uint8(probs)
        mask_arr[sel] = (probs >= threshold).astype(np.uint8)

    total = sum(b.voxels for b in mine)
    todo = sum(b.voxels for b in mine if not (done_dir / f"{b.name}.done").exists())
    ctx = progress_factory(total) if progress_factory else contextlib.nullcontext(None)
    start = time.perf_counter()
    with ctx as advance:
        predicted = run_blocks(model, source, write, mine, done_dir=done_dir, progress=advance)
    elapsed = time.perf_counter() - start
    finished = sum((done_dir / f"{b.name}.done").exists() for b in blocks)
    complete = finished == len(blocks)
    if complete:
        import zarr

        group = zarr.open_group(store=str(out), mode="r+")
        meta = dict(group.attrs.get("emsynth", {}))
        if not meta.get("complete"):
            group.attrs.update({"emsynth": {**meta, "complete": True}})
    return {
        "blocks": len(blocks), "shard_blocks": len(mine), "predicted": predicted,
        "skipped": len(mine) - predicted, "done": finished, "complete": complete,
        "elapsed_s": elapsed, "voxels": todo,
    }
