"""The study's data: loading sources, z-block splits and the real data of each regime and
seed. The masks the GAN turns into synthetic images come from `emsynth.synthesis.masks`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from emsynth.data.readers import read_volume
from emsynth.data.slices import split_blocks
from emsynth.data.volume import MITO, Volume
from emsynth.errors import EmsynthError, input_error
from emsynth.io import resolve_path
from emsynth.study.cache import hash_arrays
from emsynth.study.config import RegimeConfig, SourceConfig, StudyConfig

#: Random crop positions tried per slice before keeping the one with most mitochondria.
CROP_TRIES = 100


@dataclass
class Source:
    """A loaded annotated volume and the content hash that stands for it in cell keys."""

    volume: Volume
    key: str
    description: str


def load_source(cfg: SourceConfig, what: str = "data") -> Source:
    """Generate a phantom source or read a dataset; it must hold mitochondria labels."""
    if cfg.phantom is not None:
        volume, description = cfg.phantom.generate(), cfg.phantom.describe()
    else:
        path = resolve_path(cfg.source, f"{what} source",
                            f"set {what}.source to a dataset folder, or {what}.phantom")
        volume = read_volume(path, cfg.layout, mask_dir=cfg.mask_dir)
        description = f"{path} ({cfg.layout} layout): {len(volume)} slices of " \
                      f"{volume.shape[1]}x{volume.shape[2]} px"
    if MITO not in volume.labels:
        raise input_error(cfg.source or description, "has no mitochondria labels to train and score on",
                          "pass a dataset with mitochondria masks (masks/ folder)")
    labels = [volume.labels[name] for name in sorted(volume.labels)]
    return Source(volume, hash_arrays(volume.image, *labels), description)


@dataclass
class Blocks:
    """Slice indices of the contiguous training, validation and test blocks."""

    train: list[int]
    val: list[int]
    test: list[int]


def split(cfg: StudyConfig, n_slices: int) -> Blocks:
    """Training first, then validation, then test (the test block is carved out even when the
    test set is another volume, so that a different test set never changes the training)."""
    s = cfg.split
    if cfg.test is None and s.test_block == 0:
        raise EmsynthError("split.test_block=0 and no test volume: nothing to score on. Fix: "
                           "set split.test_block or pass --test-data")
    train, val, test = split_blocks(n_slices, s.val_block, s.test_block, s.gap,
                                    fix="lower split.val_block, split.test_block or split.gap")
    return Blocks(train, val, test)


@dataclass
class Selection:
    """The real annotated data of one regime and seed: slices and crop corners."""

    slices: list[int]
    corners: list[tuple[int, int]] | None
    crop: int | None

    def pixels(self, shape: tuple[int, int]) -> int:
        side = (self.crop, self.crop) if self.crop else shape
        return len(self.slices) * side[0] * side[1]

    def as_dict(self) -> dict:
        return {"slices": self.slices, "corners": self.corners, "crop": self.crop}

    def part_names(self) -> list[str]:
        """A file stem per selected slice or crop: z, with the crop's corner and side."""
        if self.corners is None:
            return [f"{z:05d}" for z in self.slices]
        return [f"{z:05d}_y{y}_x{x}_c{self.crop}"
                for z, (y, x) in zip(self.slices, self.corners, strict=True)]


def _stable_seed(seed: int, regime: RegimeConfig) -> list[int]:
    """A generator seed from the study seed and the regime's size (not its name or order)."""
    return [seed, zlib.crc32(f"{regime.slices}/{regime.crop}".encode())]


def select(regime: RegimeConfig, train: list[int], seed: int, mito: np.ndarray) -> Selection:
    """`regime.slices` slices evenly spaced over the training block, the grid shifted by a
    seeded offset; crops (when asked) at seeded random positions holding at least
    `regime.min_foreground` mitochondria (`mito`: the volume's (z, y, x) labels). The seed is
    the study seed, or the regime's data_seed for every study seed; with all slices the offset
    changes nothing, so every seed gets the same data."""
    count = len(train) if regime.slices == "all" else regime.slices
    if count > len(train):
        raise EmsynthError(
            f"regime {regime.name!r} wants {count} slices but the training block has "
            f"{len(train)}. Fix: lower regimes.slices or the validation/test blocks"
        )
    rng = np.random.default_rng(_stable_seed(
        seed if regime.data_seed is None else regime.data_seed, regime))
    stride = len(train) / count
    offset = rng.uniform(0, stride)
    slices = [train[min(int(offset + i * stride), len(train) - 1)] for i in range(count)]
    if regime.crop is None:
        return Selection(slices, None, None)
    c, (height, width) = regime.crop, mito.shape[1:]
    if c > min(height, width):
        raise EmsynthError(
            f"regime {regime.name!r}: crop {c} is larger than the {height}x{width} slices. "
            "Fix: use a smaller regimes.crop"
        )
    corners = []
    for z in slices:
        best, best_share = (0, 0), -1.0
        for _ in range(CROP_TRIES):
            y, x = int(rng.integers(0, height - c + 1)), int(rng.integers(0, width - c + 1))
            share = float(mito[z, y:y + c, x:x + c].mean())
            if share > best_share:
                best, best_share = (y, x), share
            if share >= regime.min_foreground:
                break
        corners.append(best)
    return Selection(slices, corners, c)


def cut(volume: Volume, selection: Selection, labels: dict[str, np.ndarray] | None = None
        ) -> Volume:
    """The selected slices (cropped) of `volume`; `labels` (full selected slices, in selection
    order) replace or add label channels."""
    part = volume.select(selection.slices)
    channels = dict(part.labels)
    channels.update(labels or {})
    if selection.corners is None:
        return Volume(part.image, channels, part.pixel_size_nm, part.source, part.slice_names)
    c = selection.crop

    def crop(stack: np.ndarray) -> np.ndarray:
        return np.stack([plane[y:y + c, x:x + c]
                         for plane, (y, x) in zip(stack, selection.corners, strict=True)])

    return Volume(crop(part.image), {k: crop(v) for k, v in channels.items()},
                  part.pixel_size_nm, f"{part.source} (crops of {c} px)", part.slice_names)
