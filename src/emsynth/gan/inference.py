"""Synthesis: masks of any size -> synthetic EM slices, whole-slice or in crop-sized tiles.

Whole slice (the default of the API): each slice is reflect-padded (centred) to the next
multiple of 256, run through the generator once and cropped back. The generator is fully
convolutional, so there are no seams by construction; InstanceNorm then normalises over the
whole slice, as pix2pix does at test time on its full-size inputs.

Tiles (`Tiling`, the default of `emsynth gan synthesize`): tiles of the training crop on one
global grid per slice, overlapping and blended with Gaussian weights, so InstanceNorm sees
what it saw in training (a crop, not a 4k slice); tiles past the slice edge are reflect-padded.
Each tile's dropout and decoder noise are seeded from (seed, z, tile row, tile column), so the
result does not depend on how a volume is split: the blockwise run into an OME-Zarr
(`SynthesizeJob`, `synthesize_to_ome_zarr`) equals the in-memory one exactly.

Dropout: pix2pix keeps dropout active at test time, as its only source of noise (Isola et al.
2017, sec. 3.1); `dropout=True` (the default) does the same, so two seeds give two different
images of one mask set; `dropout=False` gives the deterministic mean-like output. Either way
the result is a function of (weights, masks, seed).

Decoder noise (`model.decoder_noise`, Han et al. 2018) is part of the generator and stays on at
synthesis whatever `dropout` says; it is drawn from the same seeded generator, so `seed` fixes
it too. Both generator architectures (spec U-Net, SPADE) are fed the same way.

Pixel noise (`pixel_noise`, grey levels; off by default): white Gaussian noise added to the
synthetic slices after the generator, seeded by (seed, slice). This departs from pix2pix: the
generator does not draw the detector noise of real slices (CA1 validation slices: 9.0 grey
levels inside cytoplasm, the texture preset's images 1.5, `gan evaluate`'s pixel-noise rows),
and segmenters trained on its clean images found nothing in real ones (README, TSTR).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from emsynth.data.blocks import (
    IMAGE,
    PYRAMID_MIN,
    Block,
    BlockJob,
    blend_windows,
    grid_axes,
    importance_map,
    open_output,
    owned,
    resolve,
    run_shard,
)
from emsynth.data.volume import LABEL_NAMES, Volume
from emsynth.engine import checkpoint as ckpt
from emsynth.engine.device import autocast_factory, resolve_device, resolve_precision
from emsynth.errors import input_error
from emsynth.gan.data import Conditioning, unit_to_image
from emsynth.gan.networks import SIDE_MULTIPLE

#: Tiles overlap by this fraction of their side.
TILE_OVERLAP = 0.25
#: Dropout and decoder noise draw from torch's global generator: one tile at a time per process.
_RNG_LOCK = threading.Lock()


def default_conditioning(generator: nn.Module) -> Conditioning:
    """The training default for a generator with this many inputs: mito, membrane[, synapse]."""
    return Conditioning(LABEL_NAMES[: generator.in_channels], "-1,1")


def padding_for(side: int) -> tuple[int, int]:
    """(before, after) padding that centres `side` in the next multiple of 256."""
    total = math.ceil(side / SIDE_MULTIPLE) * SIDE_MULTIPLE - side
    return total // 2, total - total // 2


def _set_dropout(generator: nn.Module, active: bool) -> None:
    generator.eval()
    for module in generator.modules():
        if isinstance(module, nn.Dropout):
            module.train(active)


@contextlib.contextmanager
def synthesis_mode(generator: nn.Module, dropout: bool) -> Iterator[None]:
    """Eval mode with dropout as asked and inference mode; the generator's modes restored
    after (for a generator a job owns, set them once with `_set_dropout` instead)."""
    modes = [m.training for m in generator.modules()]
    try:
        _set_dropout(generator, dropout)
        with torch.inference_mode():
            yield
    finally:
        for module, mode in zip(generator.modules(), modes):
            module.training = mode


def _devices(device: torch.device) -> list[torch.device]:
    """The devices whose generators fork_rng must save besides the CPU's."""
    return [device] if device.type == "cuda" else []


@dataclass(frozen=True)
class Tiling:
    """Tiled synthesis: `tile` px squares (a multiple of 256; the training crop by default),
    overlapping by `overlap` of a side, blended with `blend` weights (gaussian or constant)."""

    tile: int = SIDE_MULTIPLE
    overlap: float = TILE_OVERLAP
    blend: str = "gaussian"

    def __post_init__(self) -> None:
        if self.tile < SIDE_MULTIPLE or self.tile % SIDE_MULTIPLE:
            raise input_error("--tile", f"{self.tile} is not a multiple of {SIDE_MULTIPLE}",
                              f"use the training crop, e.g. --tile {SIDE_MULTIPLE}")
        if not 0.0 <= self.overlap < 1.0:
            raise input_error("--overlap", f"{self.overlap} is not in [0, 1)", "e.g. 0.25")


def training_crop(model: str | Path, metadata: dict | None = None) -> int:
    """The crop a generator was trained on: its metadata, else its run's config.yaml, else 256."""
    import yaml

    if metadata and metadata.get("crop"):
        return int(metadata["crop"])
    folder = Path(model) if Path(model).is_dir() else Path(model).parent
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
        return int(config["task"]["data"]["crop"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return SIDE_MULTIPLE


def choose_tiling(model: str | Path, metadata: dict | None, tile: int | None,
                  whole_slice: bool, overlap: float = TILE_OVERLAP) -> Tiling | None:
    """The CLI's choice: None (whole slices) with `whole_slice`, else tiles of `tile` px or of
    the generator's training crop."""
    if whole_slice and tile is not None:
        raise input_error("--whole-slice", "and --tile exclude each other", "pass one of them")
    return None if whole_slice else Tiling(tile or training_crop(model, metadata), overlap)


def tile_seed(seed: int, z: int, row: int, col: int) -> int:
    """The seed of one tile, from its global position: the same tile gets the same noise in
    any block layout."""
    return int(np.random.SeedSequence([seed, z, row, col]).generate_state(1, np.uint64)[0])


def synthesize_tiles(
    generator: nn.Module,
    read: Callable[[slice, slice], np.ndarray],
    out_y: tuple[int, int],
    out_x: tuple[int, int],
    size: tuple[int, int],
    z0: int,
    tiling: Tiling,
    *,
    seed: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> np.ndarray:
    """Synthetic values (z, h, w) float32 in [-1, 1] of out_y x out_x in slices of `size`,
    from the tiles touching it; read(ys, xs): encoded masks (z, C, ys, xs) of slices z0, ...
    Call in eval/inference mode (`synthesis_mode`); safe from several threads at once."""

    axes = grid_axes(size[0], size[1], (tiling.tile, tiling.tile), tiling.overlap)
    weights = importance_map((tiling.tile, tiling.tile), tiling.blend)

    def run(windows: np.ndarray, keys: list[tuple[int, int, int]]) -> np.ndarray:
        out = np.empty((len(windows), *windows.shape[-2:]), np.float32)
        for i, (z, row, col) in enumerate(keys):
            x = torch.from_numpy(np.ascontiguousarray(windows[i : i + 1])).to(device)
            with _RNG_LOCK, torch.random.fork_rng(devices=_devices(device)):
                torch.manual_seed(tile_seed(seed, z0 + z, row, col))
                with autocast():
                    y = generator(x)
            out[i] = y[0, 0].float().cpu().numpy()
        return out

    return blend_windows(read, out_y, out_x, axes, weights, run, batch=1, pad="reflect")


def synthesize_array(
    generator: nn.Module,
    masks: np.ndarray,
    *,
    dropout: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    progress: bool = False,
    tiling: Tiling | None = None,
) -> np.ndarray:
    """Encoded masks (Z, C, H, W) float32 -> synthetic slices (Z, H, W) float32 in [-1, 1];
    whole slices, or tiles with `tiling`."""
    device = torch.device(device) if device is not None else next(generator.parameters()).device
    autocast = autocast_factory(device, resolve_precision(precision, device))
    z, _, h, w = masks.shape
    pad_y, pad_x = padding_for(h), padding_for(w)
    out = np.empty((z, h, w), np.float32)
    with synthesis_mode(generator, dropout), torch.random.fork_rng(devices=_devices(device)), \
            Progress(disable=not progress, transient=True) as bar:
        torch.manual_seed(seed)
        job = bar.add_task("synthesising", total=z)
        for i in range(z):
            if tiling is not None:
                out[i] = synthesize_tiles(
                    generator, lambda ys, xs, i=i: masks[i : i + 1, :, ys, xs], (0, h), (0, w),
                    (h, w), i, tiling, seed=seed, device=device, autocast=autocast)[0]
            else:
                # numpy's reflect also covers pads wider than the slice (it reflects again).
                x = np.pad(masks[i], ((0, 0), pad_y, pad_x), mode="reflect")
                with autocast():
                    y = generator(torch.from_numpy(x)[None].to(device))
                out[i] = y[0, 0, pad_y[0]:pad_y[0] + h, pad_x[0]:pad_x[0] + w].float().cpu()
            bar.advance(job)
    return out


def check_conditioning(generator: nn.Module, conditioning: Conditioning, where: object) -> None:
    """A one-line error when the conditioning does not fit the generator's input count."""
    if len(conditioning.channels) != ckpt.unwrap(generator).in_channels:
        raise input_error(
            where, f"{len(conditioning.channels)} conditioning channels for a generator with "
            f"{ckpt.unwrap(generator).in_channels} inputs",
            "pass the conditioning the generator was trained with",
        )


#: Tags the pixel-noise random stream ("nois"), so it never coincides with a stream seeded by
#: (seed, z) alone elsewhere.
_PIXEL_NOISE_STREAM = 0x6E6F6973


def add_pixel_noise(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """uint8 (z, y, x) `image` plus white Gaussian noise of `sigma` grey levels, rounded and
    clipped; slice z's noise comes from (seed, z), so it does not depend on the other slices."""
    if sigma <= 0:
        return image
    noisy = np.empty_like(image)
    for z, plane in enumerate(image):
        noise = np.random.default_rng([seed, z, _PIXEL_NOISE_STREAM]).normal(0.0, sigma, plane.shape)
        noisy[z] = np.clip(np.rint(plane + noise), 0, 255)
    return noisy


def synthesize_volume(
    generator: nn.Module,
    masks: Volume,
    conditioning: Conditioning | None = None,
    *,
    dropout: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    progress: bool = False,
    tiling: Tiling | None = None,
    pixel_noise: float = 0.0,
) -> Volume:
    """A synthetic Volume: one generated image per slice of `masks`, which keeps its labels.
    tiling: crop-sized tiles (see `Tiling`); None = whole slices. pixel_noise: std (grey
    levels) of white noise added afterwards (see the module docstring); 0 = none.

    conditioning: the channels the generator was trained on (stored with an exported
    generator; `emsynth.gan.export.load_generator` returns it); None = the training default for its input count.
    precision: "fp32", "bf16" or "auto" (bf16 on CPU and bf16-capable GPUs).
    """
    net = ckpt.unwrap(generator)
    conditioning = conditioning or default_conditioning(net)
    conditioning.check(masks, "mask volume")
    check_conditioning(net, conditioning, masks.source or "mask volume")
    encoded = np.stack([conditioning.encode_slice(masks, z) for z in range(len(masks))])
    if isinstance(device, str):
        device = resolve_device(device)
    if device is not None:
        net.to(device)
    images = synthesize_array(net, encoded, dropout=dropout, seed=seed, device=device,
                              precision=precision, progress=progress, tiling=tiling)
    return Volume(
        image=add_pixel_noise(unit_to_image(images), pixel_noise, seed),
        labels={name: label.copy() for name, label in masks.labels.items()},
        pixel_size_nm=masks.pixel_size_nm,
        source=f"synthetic(seed={seed}, dropout={dropout}"
    f"{f', tile={tiling.tile}' if tiling else ''}"
    f"{f', pixel noise {pixel_noise:g}' if pixel_noise else ''}) from {masks.source or 'masks'}",
        slice_names=list(masks.slice_names),
    )


# --- blockwise: masks in an OME-Zarr -> a synthetic OME-Zarr ------------------------------------


def mask_arrays(path: str | Path, channels: Sequence[str]) -> dict[str, Any]:
    """The conditioning labels of an OME-Zarr, lazily: emsynth label name -> (z, y, x) view."""
    from emsynth.data.omezarr import open_ome_zarr

    image = open_ome_zarr(path)
    missing = [c for c in channels if c not in image.labels]
    if missing:
        raise input_error(path, f"has no labels/{missing[0]} (it has "
                          f"{sorted(image.labels) or 'none'}) but the generator is conditioned "
                          f"on {list(channels)}", "predict it first (emsynth membranes predict "
                          "-o NAME.ome.zarr writes labels/mito and labels/membrane)")
    arrays = {c: image.label(c).array for c in channels}
    shapes = {tuple(a.shape) for a in arrays.values()}
    if len(shapes) != 1:
        raise input_error(path, f"labels of different shapes {sorted(shapes)}",
                          "write every label at the same level-0 size")
    return arrays


def load_generator_only(path: str | Path, device: str) -> nn.Module:
    """The generator alone (what each dask worker loads)."""
    from emsynth.gan.export import load_generator

    return load_generator(path, resolve_device(device))[0]


@dataclass(eq=False)
class SynthesizeJob(BlockJob):
    """One block of synthetic EM from its masks (tiles of the global grid, read with their
    halo): written as the image (uint8) with the conditioning masks as labels (0/1).
    generator/masks may be `Lazy` (loaded on each dask worker)."""

    generator: nn.Module | Any
    masks: dict[str, Any] | Any  # conditioning channel -> (z, y, x) array (non-zero = label)
    conditioning: Conditioning
    tiling: Tiling
    dropout: bool = True
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def setup(self) -> tuple[nn.Module, dict[str, Any], torch.device, Callable, bool]:
        device = resolve_device(self.device) if isinstance(self.device, str) else self.device
        generator, own = owned(self.generator)
        generator = ckpt.unwrap(generator).to(device)
        if own:  # modes set once: threads sharing it never see them toggled
            _set_dropout(generator, self.dropout)
        return (generator, resolve(self.masks), device,
                autocast_factory(device, resolve_precision(self.precision, device)), own)

    def compute(self, state: tuple, block: Block) -> np.ndarray:
        generator, masks, device, autocast, own = state
        channels = self.conditioning.channels
        height, width = masks[channels[0]].shape[-2:]
        z0, z1 = block.z

        def read(ys: slice, xs: slice) -> np.ndarray:
            labels = [np.asarray(masks[c][z0:z1, ys, xs]) != 0 for c in channels]
            return self.conditioning.encode(labels).transpose(1, 0, 2, 3)

        mode = torch.inference_mode() if own else synthesis_mode(generator, self.dropout)
        with mode:
            return synthesize_tiles(generator, read, block.y, block.x, (height, width), z0,
                                    self.tiling, seed=self.seed, device=device, autocast=autocast)

    def outputs(self, state: tuple, block: Block, result: np.ndarray) -> dict[str, np.ndarray]:
        masks = state[1]
        out = {IMAGE: unit_to_image(result)}
        for c in self.conditioning.channels:
            out[c] = (np.asarray(masks[c][block.slices]) != 0).astype(np.uint8)
        return out


def synthesize_to_ome_zarr(
    generator: nn.Module | Any,
    masks: dict[str, Any] | Any,
    out: str | Path,
    conditioning: Conditioning,
    tiling: Tiling,
    *,
    shape: Sequence[int],
    block: Sequence[int],
    dropout: bool = True,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    scale_nm: Sequence[float] | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
    signature: dict | None = None,
    progress_factory: Callable[[int], contextlib.AbstractContextManager] | None = None,
    client: Any = None,
    pyramid_min: int = PYRAMID_MIN,
) -> dict:
    """Synthesise the volume of `masks` (conditioning channel -> (z, y, x) array, or `Lazy`)
    blockwise into the OME-Zarr `out`: image = synthetic EM, labels = the masks. Resumable,
    shardable and dask-able like every blockwise run (`emsynth.data.blocks.run_shard`)."""
    signature = {"channels": list(conditioning.channels), "mask_range": conditioning.mask_range,
                 "tile": tiling.tile, "overlap": tiling.overlap, "blend": tiling.blend,
                 "seed": seed, "dropout": dropout, **(signature or {})}
    output = open_output(out, shape, block, image_dtype=np.uint8, image_name="synthetic",
                         labels=conditioning.channels, scale_nm=scale_nm, signature=signature,
                         pyramid_min=pyramid_min)
    job = SynthesizeJob(generator, masks, conditioning, tiling, dropout, seed, device, precision)
    return run_shard(output, job, shard_id=shard_id, num_shards=num_shards, client=client,
                     progress_factory=progress_factory)
