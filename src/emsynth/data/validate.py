"""Per-file and per-volume checks that turn raw arrays into clean uint8 images and bool masks.

Every problem a user can cause raises `input_error(file, problem, fix)`; harmless conversions
(equal-channel RGB to grey, an 8-bit range stored in 16 bits) return a note that the reader
reports once per folder as an `InputWarning`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from emsynth.errors import input_error

#: Masks may hold this fraction of intermediate (anti-aliased) values before they count as
#: greyscale. Real anti-aliased masks stay far below it (drosophila_vnc mitochondria: < 0.01%).
MAX_INTERMEDIATE_FRACTION = 0.05
#: A label covering more than this share of a volume is implausible for mito, membrane or
#: synapse (drosophila_vnc membranes, the densest, cover about 20%).
MAX_PLAUSIBLE_FRACTION = 0.5

TO_GREY_FIX = (
    "convert it to 8-bit greyscale, e.g. Pillow `Image.open(f).convert('L').save(f)` "
    "or Fiji Image > Type > 8-bit"
)
MASK_FIX = "save a single-channel 8-bit mask with 0 = background and 255 = foreground"


class InputWarning(UserWarning):
    """An input was accepted after a conversion the user should know about."""


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _present_values(arr: np.ndarray) -> np.ndarray:
    """Sorted distinct values; bincount for uint8 because it is much faster than a sort."""
    if arr.dtype == np.uint8:
        return np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
    return np.unique(arr)


def to_single_channel(raw: np.ndarray, path: Path, what: str) -> tuple[np.ndarray, str | None]:
    """Reduce (y, x, c) colour data to (y, x) when every channel holds the same values.

    what: "image" or "mask", used in messages. Returns the array and a note when converted.
    """
    if raw.ndim == 2:
        return raw, None
    if raw.ndim != 3 or raw.shape[-1] not in (2, 3, 4):
        raise input_error(
            path,
            f"{what} has shape {_shape_text(raw.shape)}, expected one 2-D greyscale slice",
            "give one 2-D slice per file (for a multipage TIFF stack use layout epfl-tiff)",
        )
    n_colour = 1 if raw.shape[-1] == 2 else 3
    colour, alpha = raw[..., :n_colour], raw[..., n_colour:]
    if alpha.size and (alpha != alpha.max()).any():
        raise input_error(
            path,
            f"{what} has a transparency (alpha) channel with varying values",
            "flatten it onto an opaque background and save without alpha"
            + (f"; {TO_GREY_FIX}" if what == "image" else f"; {MASK_FIX}"),
        )
    grey = colour[..., 0]
    for c in range(1, n_colour):
        if not np.array_equal(colour[..., c], grey):
            raise input_error(
                path,
                f"{what} is a colour (RGB) image whose channels differ, so there is no single "
                "obvious greyscale version",
                TO_GREY_FIX if what == "image" else MASK_FIX,
            )
    if n_colour == 1:
        return np.ascontiguousarray(grey), f"grey+alpha {what}s with opaque alpha read as greyscale"
    return np.ascontiguousarray(grey), f"RGB {what}s with identical channels read as greyscale"


def to_uint8_image(raw: np.ndarray, path: Path) -> tuple[np.ndarray, str | None]:
    """A (y, x) uint8 EM image from whatever a file held, or an error saying how to convert."""
    arr, note = to_single_channel(raw, path, "image")
    if arr.dtype == bool:
        raise input_error(
            path,
            "image is 1-bit (black and white), which looks like a mask, not an EM image",
            "point the images folder at the greyscale EM slices (masks go in masks/)",
        )
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise input_error(
                path,
                f"{arr.dtype} image contains NaN or infinite values",
                "replace or crop the invalid pixels and save as 8-bit greyscale",
            )
        raise input_error(
            path,
            f"{arr.dtype} image (values {arr.min():.4g}..{arr.max():.4g}); emsynth reads 8-bit EM",
            "scale to 0-255 and save as uint8, e.g. numpy "
            "`((a - a.min()) / (a.max() - a.min()) * 255).astype('uint8')`",
        )
    if arr.dtype == np.uint8:
        return arr, note
    if arr.dtype.kind not in "iu":
        raise input_error(path, f"unsupported image data type {arr.dtype}", TO_GREY_FIX)
    lo, hi = int(arr.min()), int(arr.max())
    bits = arr.dtype.itemsize * 8
    if lo >= 0 and hi <= 255:
        return arr.astype(np.uint8), f"{bits}-bit images holding 8-bit values (0..255) read as-is"
    if lo >= 0 and hi <= 65535 and not (arr % 257).any():
        # 8-bit data stretched to 16 bits by x257 (what most converters do): exact inverse.
        return (arr // 257).astype(np.uint8), (
            f"{bits}-bit images of 8-bit values x 257 divided by 257"
        )
    raise input_error(
        path,
        f"{bits}-bit image with values {lo}..{hi}; a contrast stretch to 8 bits is a choice "
        "emsynth will not make for you",
        "convert the stack to 8-bit with one window for all slices, e.g. Fiji Image > Type > "
        "8-bit on the whole stack, or numpy `np.clip((a - lo) / (hi - lo) * 255, 0, 255)"
        ".astype('uint8')` with lo/hi taken over the whole stack",
    )


def to_bool_mask(
    raw: np.ndarray, path: Path, foreground_black: bool = False
) -> tuple[np.ndarray, str | None]:
    """A (y, x) bool mask from a binary or lightly anti-aliased mask file, thresholded at 128.

    A mask with exactly two values {0, v} is binary whatever v is (0/1 and 0/255 conventions);
    foreground_black flips the result (ISBI-style masks where 0 = foreground).
    """
    arr, note = to_single_channel(raw, path, "mask")
    if arr.dtype == bool:
        # 1-bit PNG decoders can hand back bools stored as byte 255; re-derive canonical 0/1
        # bools so that C code reading the bytes (e.g. skimage's skeletonize) sees valid data.
        white = arr.view(np.uint8) != 0
    else:
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise input_error(path, "mask contains NaN or infinite values", MASK_FIX)
        if arr.dtype.kind not in "iuf":
            raise input_error(path, f"unsupported mask data type {arr.dtype}", MASK_FIX)
        values = _present_values(arr)
        if len(values) == 1 or (len(values) == 2 and values[0] == 0):
            white = arr == values[-1] if values[-1] != 0 else np.zeros(arr.shape, bool)
        elif arr.dtype.kind == "f":
            raise input_error(
                path,
                f"{arr.dtype} mask with {len(values)} distinct values (not binary)",
                "threshold it and " + MASK_FIX,
            )
        elif values[0] < 0 or values[-1] > 255:
            raise input_error(
                path,
                f"{arr.dtype} mask with {len(values)} values up to {values[-1]}: "
                "looks like an instance label image",
                "save `(labels > 0) * 255` as an 8-bit PNG",
            )
        else:
            intermediate = float(((arr > 0) & (arr < 255)).mean())
            if values[-1] < 128:
                raise input_error(
                    path,
                    f"mask holds small values {values[1]}..{values[-1]} and none >= 128: "
                    "looks like an instance label image or a dimmed mask",
                    "save `(labels > 0) * 255` as an 8-bit PNG",
                )
            if intermediate > MAX_INTERMEDIATE_FRACTION:
                raise input_error(
                    path,
                    f"mask is not binary: {intermediate:.0%} of pixels hold values between 1 and "
                    f"254 ({len(values)} distinct values), which looks like a greyscale image",
                    "check this is the mask, not an EM image; threshold soft masks and "
                    + MASK_FIX,
                )
            white = arr >= 128
    return (~white if foreground_black else white), note


def largest_component_share(mask: np.ndarray) -> float:
    """Share of foreground pixels in the largest 8-connected component (1.0 for a network)."""
    labelled, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return 0.0
    sizes = np.bincount(labelled.ravel())[1:]
    return float(sizes.max() / sizes.sum())


def check_label_plausibility(
    name: str, label: np.ndarray, files: Sequence[Path], folder: Path, polarity_given: bool
) -> None:
    """Reject labels that are surely inverted or wrong; warn when every slice is empty.

    Skipped (except the empty-volume warning) when the user stated the polarity: then a dense
    label is their call. An empty label volume is only a warning because it can be legitimate
    (a crop without mitochondria, negatives for evaluation), while training on it cannot work.
    """
    if not polarity_given:
        per_slice = np.count_nonzero(label.reshape(len(label), -1), axis=1) / label[0].size
        full = np.flatnonzero(per_slice == 1.0)
        if full.size:
            raise input_error(
                files[full[0]],
                f"{name} mask is foreground everywhere (every pixel is {name})",
                "check the file; if the foreground is dark in your masks pass "
                "--polarity foreground-black",
            )
        fraction = float(per_slice.mean())
        if fraction > MAX_PLAUSIBLE_FRACTION:
            raise input_error(
                folder,
                f"{name} masks cover {fraction:.0%} of pixels, which looks inverted "
                f"(a {name} label rarely covers more than half of an EM image)",
                "use --polarity foreground-black if the foreground is dark in your masks (for "
                "ISBI 2012 membrane masks use --layout isbi), or --polarity foreground-white "
                "if the masks really are this dense",
            )
    if len(label) > 1 and not label.any():
        warnings.warn(
            f"{folder}: all {len(label)} {name} masks are empty; reading is fine but a model "
            "cannot learn this label from them (check the threshold: foreground must be >= 128, "
            "or use 0/1 masks)",
            InputWarning,
            stacklevel=3,
        )
