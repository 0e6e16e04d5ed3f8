"""Blocks of a volume: the one machinery behind every blockwise run (segment, membranes, GAN).

Model-agnostic, so each stage keeps only what is its own (the network call):

- the global window grid (`Axis`, `grid_axes`) and `blend_windows`, which computes output
  pixels [y0, y1) x [x0, x1) from exactly the grid windows that touch them, in the order a
  whole-slice pass would, padding past the slice edge from global positions: a block's result
  is the whole-slice result, whatever the block size;
- chunk-aligned z/y/x `Block`s (`iter_blocks`), disjoint shards of them (`shard_blocks`);
- `BlockOutput`: the OME-Zarr a run writes (created atomically, checked against the run's
  signature, a done-marker per block), finished by whoever completes the last block: the
  multiscale pyramid is written then and the output marked complete;
- `BlockJob`: one blockwise computation, picklable without its loaded state, so the same job
  runs in this process (`run_blocks`) or on a dask cluster with one model per worker
  (`run_blocks_dask`); `run_shard` does one process's share either way.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from emsynth.errors import EmsynthError, input_error
from emsynth.io import atomic_write_text

#: Test hook: seconds to sleep after each block (lets the kill -9 test stop a run midway).
SLEEP_ENV = "EMSYNTH_BLOCK_SLEEP"
#: Folder of done-markers inside a blockwise output.
DONE_DIR = ".emsynth-done"
#: Pyramid levels halve y and x until the larger side is at most this many pixels.
PYRAMID_MIN = 256
IMAGE = "image"


# --- the window grid ------------------------------------------------------------------------------


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


def source_index(start: int, stop: int, size: int, pad: str) -> np.ndarray:
    """In-slice indices of global positions [start, stop) (>= 0), those past the edge padded
    as numpy pads a whole slice at its end: "edge" (replicate) or "reflect"."""
    pos = np.arange(start, stop)
    if pad == "edge":
        return np.minimum(pos, size - 1)
    if pad == "reflect":
        period = 2 * (size - 1)
        if period == 0:
            return np.zeros_like(pos)
        folded = pos % period
        return np.where(folded < size, folded, period - folded)
    raise ValueError(f"unknown padding {pad!r}")


def read_padded(read: Callable[[slice, slice], np.ndarray], ys: tuple[int, int],
                xs: tuple[int, int], size: tuple[int, int], pad: str) -> np.ndarray:
    """Region ys x xs (it may reach past the slice) from in-slice reads `read(ys, xs)`."""
    if ys[1] <= size[0] and xs[1] <= size[1]:
        return read(slice(*ys), slice(*xs))
    iy, ix = source_index(*ys, size[0], pad), source_index(*xs, size[1], pad)
    y0, x0 = int(iy.min()), int(ix.min())
    region = read(slice(y0, int(iy.max()) + 1), slice(x0, int(ix.max()) + 1))
    return region[..., (iy - y0)[:, None], (ix - x0)[None, :]]


#: A window function: windows (B, C, wy, wx) and their keys (z, ky, kx) -> outputs (B, wy, wx).
WindowFn = Callable[[np.ndarray, list[tuple[int, int, int]]], np.ndarray]


@functools.lru_cache(maxsize=16)
def importance_map(window: tuple[int, int], blend: str) -> np.ndarray:
    """MONAI's blending weights for one window (gaussian, sigma 0.125 of the side, or constant).

    Cached and read-only: every block of a run blends with the same map, and building a
    gaussian one costs about as much as a 256 x 256 window's forward pass."""
    from monai.data.utils import compute_importance_map

    weights = compute_importance_map(window, mode=blend, sigma_scale=0.125, device="cpu")
    weights = weights.float()
    nonzero = weights[weights > 0]
    weights = weights.clamp(min=float(nonzero.min()) if nonzero.numel() else 1e-3)
    weights = weights.numpy()
    weights.flags.writeable = False
    return weights


def blend_windows(
    read: Callable[[slice, slice], np.ndarray],
    out_y: tuple[int, int],
    out_x: tuple[int, int],
    axes: tuple[Axis, Axis],
    weights: np.ndarray,
    run: WindowFn,
    *,
    batch: int = 8,
    pad: str = "edge",
) -> np.ndarray:
    """Weighted mean (z, y1 - y0, x1 - x0) float32 of `run` over the grid windows touching
    output pixels out_y x out_x. read(ys, xs): the input (z, c, ys, xs) of an in-slice region.

    Every output pixel sums the same windows in the same order whatever region it is computed
    in (windows z-major, then row by row), so blocks add up to the whole-slice result.
    """
    ay, ax = axes
    ky0, ky1 = ay.windows(*out_y)
    kx0, kx1 = ax.windows(*out_x)
    ry0, ry1 = ky0 * ay.stride, ky1 * ay.stride + ay.window
    rx0, rx1 = kx0 * ax.stride, kx1 * ax.stride + ax.window
    region = read_padded(read, (ry0, ry1), (rx0, rx1), (ay.size, ax.size), pad)
    n_z = region.shape[0]
    num = np.zeros((n_z, ry1 - ry0, rx1 - rx0), np.float32)
    den = np.zeros((ry1 - ry0, rx1 - rx0), np.float32)
    tiles = [(ky, kx) for ky in range(ky0, ky1 + 1) for kx in range(kx0, kx1 + 1)]
    wy, wx = ay.window, ax.window
    corner = {t: (t[0] * ay.stride - ry0, t[1] * ax.stride - rx0) for t in tiles}
    for y, x in corner.values():
        den[y : y + wy, x : x + wx] += weights
    jobs = [(z, ky, kx) for z in range(n_z) for ky, kx in tiles]
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        windows = np.stack([region[z, :, corner[(ky, kx)][0] : corner[(ky, kx)][0] + wy,
                                   corner[(ky, kx)][1] : corner[(ky, kx)][1] + wx]
                            for z, ky, kx in chunk])
        outs = run(windows, chunk)
        for (z, ky, kx), out in zip(chunk, outs):
            y, x = corner[(ky, kx)]
            num[z, y : y + wy, x : x + wx] += out * weights
    cy0, cx0 = out_y[0] - ry0, out_x[0] - rx0
    cy1, cx1 = cy0 + out_y[1] - out_y[0], cx0 + out_x[1] - out_x[0]
    return num[:, cy0:cy1, cx0:cx1] / den[cy0:cy1, cx0:cx1]


# --- blocks ---------------------------------------------------------------------------------------


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

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return slice(*self.z), slice(*self.y), slice(*self.x)


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


# --- jobs: what a run computes per block -------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Lazy:
    """A value built where it is used: `fn(*args, **kwargs)` (a model loaded on each worker)."""

    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def get(self) -> Any:
        return self.fn(*self.args, **self.kwargs)


def resolve(value: Any) -> Any:
    """`value`, or what it builds when it is `Lazy`."""
    return value.get() if isinstance(value, Lazy) else value


def in_dask_worker() -> bool:
    """True inside a task on a dask worker (where objects may be shared between threads)."""
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


def owned(value: Any) -> tuple[Any, bool]:
    """(value resolved, whether the job may change it for good, e.g. a model's modes): what a
    `Lazy` builds is the job's own; in a dask worker a given object is copied (thread workers
    may share it with the caller and each other); elsewhere it is the caller's, left as found."""
    import copy

    if isinstance(value, Lazy):
        return value.get(), True
    if in_dask_worker():
        return copy.deepcopy(value), True
    return value, False


_SETUP_LOCK = threading.Lock()


class BlockJob:
    """One blockwise computation. `setup()` builds what a process needs once (model, input);
    `compute(state, block)` gives the block's raw result, `outputs(state, block, result)` the
    arrays written ("image" and label names). Pickled without its state, so each dask worker
    sets up its own copy once and reuses it for all its blocks."""

    def setup(self) -> Any:
        raise NotImplementedError

    def compute(self, state: Any, block: Block) -> np.ndarray:
        raise NotImplementedError

    def outputs(self, state: Any, block: Block, result: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def state(self) -> Any:
        state = self.__dict__.get("_state")
        if state is None:
            with _SETUP_LOCK:
                state = self.__dict__.get("_state")
                if state is None:
                    state = self.setup()
                    self.__dict__["_state"] = state
        return state

    def result(self, block: Block) -> np.ndarray:
        return self.compute(self.state(), block)

    def __call__(self, block: Block) -> dict[str, np.ndarray]:
        state = self.state()
        return self.outputs(state, block, self.compute(state, block))

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_state"}


def assemble(job: BlockJob, shape: Sequence[int], block: Sequence[int] | None = None
             ) -> np.ndarray:
    """The raw results (z, y, x) float32 of a whole volume in memory, blockwise or (block None)
    in one block: the reference the blockwise runs are compared against."""
    out = np.empty(tuple(shape), np.float32)
    for b in iter_blocks(shape, block or shape):
        out[b.slices] = job.result(b)
    return out


# --- the output: an OME-Zarr with done-markers and a pyramid -----------------------------------


def pyramid_levels(shape: Sequence[int], min_side: int = PYRAMID_MIN) -> int:
    """Levels (level 0 included) halving y and x until the larger side is <= min_side (0:
    level 0 only)."""
    side, levels = max(shape[-2:]), 1
    while side > min_side > 0:
        side = math.ceil(side / 2)
        levels += 1
    return levels


def level_shape(shape: Sequence[int], level: int) -> tuple[int, int, int]:
    z, y, x = shape
    for _ in range(level):
        y, x = math.ceil(y / 2), math.ceil(x / 2)
    return (z, y, x)


@dataclass
class BlockOutput:
    """A blockwise run's OME-Zarr: image + labels/<name>, level 0 written block by block."""

    path: Path
    shape: tuple[int, int, int]
    block: tuple[int, int, int]
    labels: tuple[str, ...]
    levels: int = 1

    @property
    def done_dir(self) -> Path:
        return self.path / DONE_DIR

    @property
    def blocks(self) -> list[Block]:
        return list(iter_blocks(self.shape, self.block))

    def _marker(self, block: Block, level: int = 0) -> Path:
        name = f"{block.name}.done" if level == 0 else f"pyramid/{level}_{block.name}.done"
        return self.done_dir / name

    def is_done(self, block: Block, level: int = 0) -> bool:
        return self._marker(block, level).exists()

    def mark_done(self, block: Block, level: int = 0) -> None:
        marker = self._marker(block, level)
        marker.parent.mkdir(exist_ok=True)
        atomic_write_text(marker, f"{time.time():.3f}\n")

    def array(self, name: str, level: int = 0):
        """The zarr array of the image ("image") or a label at `level` (opened per process)."""
        cache = self.__dict__.setdefault("_arrays", {})
        key = (name, level)
        if key not in cache:
            import zarr

            where = self.path if name == IMAGE else self.path / "labels" / name
            cache[key] = zarr.open_array(store=str(where / str(level)), mode="r+")
        return cache[key]

    def write(self, block: Block, arrays: dict[str, np.ndarray]) -> None:
        for name, values in arrays.items():
            self.array(name)[block.slices] = values

    def done_count(self) -> int:
        return sum(self.is_done(b) for b in self.blocks)

    def finish(self) -> bool:
        """When every block is done: write the pyramid (resumable, block by block; concurrent
        finishers write the same bytes), declare its levels and mark the output complete."""
        from emsynth.data.omezarr import declare_levels, downsample_yx, group_attrs, set_emsynth

        if self.done_count() < len(self.blocks):
            return False
        meta = (group_attrs(self.path) or {}).get("emsynth", {})
        if meta.get("complete"):
            return True
        names = (IMAGE, *self.labels)
        for level in range(1, self.levels):
            shape = level_shape(self.shape, level)
            prev = level_shape(self.shape, level - 1)
            chunk = tuple(min(b, n) for b, n in zip(self.block, shape))
            for b in iter_blocks(shape, chunk):
                if self.is_done(b, level):
                    continue
                sel = (slice(*b.z), slice(2 * b.y[0], min(2 * b.y[1], prev[1])),
                       slice(2 * b.x[0], min(2 * b.x[1], prev[2])))
                for name in names:
                    kind = "mean" if name == IMAGE else "max"
                    src = np.asarray(self.array(name, level - 1)[sel])
                    self.array(name, level)[b.slices] = downsample_yx(src, kind)
                self.mark_done(b, level)
        declare_levels(self.path, self.levels)
        for name in self.labels:
            declare_levels(self.path / "labels" / name, self.levels)
        set_emsynth(self.path, complete=True)
        return True

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_arrays"}


def open_output(
    out: str | Path,
    shape: Sequence[int],
    block: Sequence[int],
    *,
    image_dtype: Any = np.uint8,
    image_name: str = IMAGE,
    labels: Sequence[str] = (),
    scale_nm: Sequence[float] | None = None,
    signature: dict | None = None,
    pyramid_min: int = PYRAMID_MIN,
) -> BlockOutput:
    """Create the output OME-Zarr atomically (image, labels/<name> uint8, every pyramid level
    allocated, only level 0 declared), or open the one an earlier or concurrent run created
    with the same signature (shape, block, levels and the caller's settings)."""
    from emsynth.data.omezarr import create_image, create_label, create_level, group_attrs

    out = Path(out)
    shape = tuple(int(n) for n in shape)
    block = tuple(min(int(b), n) for b, n in zip(block, shape))
    levels = pyramid_levels(shape, pyramid_min)
    signature = {"shape": list(shape), "block": list(block), "levels": levels,
                 **(signature or {})}
    if not out.exists():
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            create_image(tmp, shape, image_dtype, scale_nm=scale_nm, chunks=block,
                         name=image_name, extra=signature)
            for name in labels:
                create_label(tmp, name, shape, np.uint8, scale_nm=scale_nm, chunks=block)
            for level in range(1, levels):
                lshape = level_shape(shape, level)
                chunks = tuple(min(b, n) for b, n in zip(block, lshape))
                create_level(tmp, level, lshape, chunks, image_dtype)
                for name in labels:
                    create_level(tmp / "labels" / name, level, lshape, chunks, np.uint8)
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
            "exists and is not a blockwise output of this input with these settings "
            f"(differs in: {', '.join(diff) or 'format'}; {json.dumps(theirs)[:200]})",
            "choose a new --out, or delete it to start over",
        )
    return BlockOutput(out, shape, block, tuple(labels), levels)


# --- running: here or on a dask cluster ----------------------------------------------------------


def run_blocks(job: BlockJob, blocks: Sequence[Block], output: BlockOutput,
               progress: Callable[[int], None] | None = None) -> int:
    """Compute and write each block not yet done, in this process; a done-marker follows each
    write, so a killed run resumes. Returns the number of blocks computed."""
    sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
    done = 0
    for block in blocks:
        if not output.is_done(block):
            output.write(block, job(block))
            output.mark_done(block)
            done += 1
            if sleep:
                time.sleep(sleep)
        if progress is not None:
            progress(block.voxels)
    return done


def _dask_block(job: BlockJob, output: BlockOutput, block: Block) -> int:
    output.write(block, job(block))
    output.mark_done(block)
    return block.voxels


def run_blocks_dask(client: Any, job: BlockJob, blocks: Sequence[Block], output: BlockOutput,
                    progress: Callable[[int], None] | None = None) -> int:
    """The same blocks as tasks on a dask cluster: the job is sent to every worker once
    (each sets up its model once), workers write their blocks and markers themselves."""
    from distributed import as_completed

    todo = []
    for block in blocks:
        if output.is_done(block):
            if progress is not None:
                progress(block.voxels)
        else:
            todo.append(block)
    if not todo:
        return 0
    [shared] = client.scatter([job], broadcast=True, hash=False)
    futures = [client.submit(_dask_block, shared, output, b, pure=False) for b in todo]
    try:
        for future in as_completed(futures):
            voxels = future.result()
            if progress is not None:
                progress(voxels)
    except BaseException:
        client.cancel(futures)
        raise
    return len(todo)


def run_shard(
    output: BlockOutput,
    job: BlockJob,
    *,
    shard_id: int = 0,
    num_shards: int = 1,
    client: Any = None,
    progress_factory: Callable[[int], contextlib.AbstractContextManager] | None = None,
) -> dict:
    """This process's share of the blocks (every num_shards-th), here or on `client`'s dask
    cluster, then `output.finish()`. Returns counts and whether the output is complete."""
    blocks = output.blocks
    mine = shard_blocks(blocks, shard_id, num_shards)
    total = sum(b.voxels for b in mine)
    todo = sum(b.voxels for b in mine if not output.is_done(b))
    ctx = progress_factory(total) if progress_factory else contextlib.nullcontext(None)
    start = time.perf_counter()
    with ctx as advance:
        if client is None:
            computed = run_blocks(job, mine, output, advance)
        else:
            computed = run_blocks_dask(client, job, mine, output, advance)
    elapsed = time.perf_counter() - start
    complete = output.finish()
    return {
        "blocks": len(blocks), "shard_blocks": len(mine), "predicted": computed,
        "skipped": len(mine) - computed, "done": output.done_count(), "complete": complete,
        "elapsed_s": elapsed, "voxels": todo, "levels": output.levels,
    }


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, *, n_workers: int = 2, threads_per_worker: int = 1,
                processes: bool = True) -> Iterator[Any]:
    """A dask.distributed client: of the cluster at `scheduler`, or of a LocalCluster."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise EmsynthError("--backend dask needs dask.distributed. Fix: pip install "
                           "'emsynth[dask]' (or pip install 'dask[distributed]')") from None
    import logging

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as err:
            raise input_error("--scheduler", f"cannot reach {scheduler} ({err})"[:200],
                              "start the scheduler first, or drop --scheduler for a local "
                              "cluster") from None
        with client:
            yield client
        return
    with LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                      processes=processes, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        yield client


# --- inputs ---------------------------------------------------------------------------------------


def open_input(path: str | Path, layout: str = "auto", *, mask_dir: str | None = None,
               label: str = "mito") -> tuple[Any, Any, str]:
    """(lazy uint8 (z, y, x) image, (z, y, x) scale in nm, source text) of a prediction input:
    `open_lazy`, without the reader's note that prediction input has no ground truth."""
    import warnings

    from emsynth.data.readers import open_lazy

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no ground truth.*")
        return open_lazy(path, layout, mask_dir=mask_dir, label=label)


def input_array(path: str | Path, layout: str = "auto", mask_dir: str | None = None,
                label: str = "mito") -> Any:
    """The image of `open_input` alone (what each dask worker opens)."""
    return open_input(path, layout, mask_dir=mask_dir, label=label)[0]


# --- the shared command-line pieces ---------------------------------------------------------------

BlockOpt = Annotated[
    str | None,
    typer.Option("--block", help="Blockwise in blocks (= output chunks) of z,y,x voxels, e.g. "
                 "8,1024,1024 (default for a .zarr OUT: 8,1024,1024)."),
]
ShardIdOpt = Annotated[
    int, typer.Option("--shard-id", min=0, help="This process's shard (0 .. num-shards - 1).")
]
NumShardsOpt = Annotated[
    int, typer.Option("--num-shards", min=1, help="Processes splitting the blocks of one run.")
]
BackendOpt = Annotated[
    str, typer.Option("--backend", help="Where blocks run: local (this process) or dask (a dask "
                      "cluster, one model per worker; needs the dask extra).")
]
SchedulerOpt = Annotated[
    str | None, typer.Option("--scheduler", help="--backend dask: address of a running dask "
                             "scheduler (default: a LocalCluster of 2 workers, 1 thread each).")
]
DEFAULT_BLOCK = (8, 1024, 1024)


def parse_block(text: str | None) -> tuple[int, int, int]:
    from emsynth.options import parse_zyx

    return DEFAULT_BLOCK if text is None else parse_zyx(text, "--block", "8,1024,1024")


def check_blockwise(out: Path, shard_id: int, num_shards: int, backend: str,
                    scheduler: str | None) -> None:
    """One-line errors for blockwise options that cannot work together."""
    if shard_id >= num_shards:
        raise input_error("--shard-id", f"{shard_id} is not below --num-shards {num_shards}",
                          f"use 0 .. {num_shards - 1}")
    if out.suffix != ".zarr":
        raise input_error(out, "blockwise runs write an OME-Zarr", "name --out NAME.ome.zarr")
    if backend not in ("local", "dask"):
        raise input_error("--backend", f"{backend!r} is not local or dask", "pass --backend dask")
    if scheduler is not None and backend != "dask":
        raise input_error("--scheduler", "applies to --backend dask only", "add --backend dask")


def backend_client(backend: str, scheduler: str | None) -> contextlib.AbstractContextManager:
    return dask_client(scheduler) if backend == "dask" else contextlib.nullcontext(None)


def mps_progress(label: str):
    """A progress-bar factory for blockwise runs: voxels done, MP/s and ETA on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class MPS(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{task.completed / 1e6:.1f}/{task.total / 1e6:.1f} MP "
                        f"{(speed or 0) / 1e6:.2f} MP/s")

    @contextlib.contextmanager
    def factory(total: int):
        progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MPS(), TextColumn("eta"),
                            TimeRemainingColumn(), console=Console(stderr=True))
        with progress:
            bar = progress.add_task(label, total=total)
            yield lambda n: progress.advance(bar, n)

    return factory


def summary(result: dict, shard_id: int, num_shards: int, verb: str = "predicted") -> str:
    """`shard i/n: k blocks predicted, m already done, x MP/s; complete` for the CLI."""
    mps = result["voxels"] / 1e6 / max(result["elapsed_s"], 1e-9) if result["predicted"] else 0
    state = (f"complete ({result['levels']} pyramid levels)" if result["complete"]
             else f"{result['done']}/{result['blocks']} blocks done")
    return (f"shard {shard_id}/{num_shards}: {result['predicted']} blocks {verb}, "
            f"{result['skipped']} already done, {mps:.2f} MP/s; {state}")
