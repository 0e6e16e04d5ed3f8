"""Inference on slices of any size: overlapping sliding windows, optional 8-way TTA, bf16
where the hardware has it.

Windows are blended with MONAI's Gaussian weighting so window borders (where the network sees
zero padding) count less. Windows larger than a slice shrink to the slice rounded up to the
network's divisor, so small or odd-sized slices (100 x 130) need only a few pixels of padding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from emsynth.engine.device import autocast_factory, resolve_precision
from emsynth.io import atomic_path
from emsynth.segment.augment import dihedral, inverse_dihedral
from emsynth.segment.config import InferConfig
from emsynth.segment.model import Segmenter, to_float


def window_size(height: int, width: int, window: int, divisor: int) -> tuple[int, int]:
    """The configured window, shrunk to the slice rounded up to a multiple of `divisor`."""

    def side(n: int) -> int:
        return min(window, math.ceil(n / divisor) * divisor)

    return side(height), side(width)


@torch.no_grad()
def sliding_probs(
    net: nn.Module,
    x: torch.Tensor,
    infer: InferConfig,
    divisor: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    tta: bool | None = None,
) -> torch.Tensor:
    """Foreground probabilities (n, 1, h, w) float32 of float inputs (n, c, h, w)."""
    use_tta = infer.tta if tta is None else tta

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        with autocast():
            return net(windows).float()

    def one_view(view: torch.Tensor) -> torch.Tensor:
        roi = window_size(view.shape[-2], view.shape[-1], infer.window, divisor)
        logits = sliding_window_inference(
            view,
            roi_size=roi,
            sw_batch_size=infer.sw_batch_size,
            predictor=predictor,
            overlap=infer.overlap,
            mode=infer.blend,
            padding_mode="replicate",
        )
        return torch.sigmoid(logits.float())

    if not use_tta:
        return one_view(x)
    total = torch.zeros((x.shape[0], 1, *x.shape[-2:]), dtype=torch.float32, device=x.device)
    for k in range(8):
        total += inverse_dihedral(one_view(dihedral(x, k)), k)
    return total / 8.0


def predict_probs(
    net: nn.Module,
    inputs: np.ndarray,
    infer: InferConfig,
    divisor: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    tta: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Probabilities (z, y, x) float32 for uint8 inputs (z, c, y, x), a few slices at a time.

    `progress(n)` is called with the number of slices finished after each chunk.
    """
    was_training = net.training
    net.eval()
    out = np.empty((inputs.shape[0], *inputs.shape[-2:]), dtype=np.float32)
    step = infer.slices_per_batch
    try:
        for start in range(0, inputs.shape[0], step):
            chunk = to_float(torch.from_numpy(inputs[start : start + step]).to(device))
            probs = sliding_probs(net, chunk, infer, divisor, autocast, tta)
            out[start : start + len(chunk)] = probs[:, 0].cpu().numpy()
            if progress is not None:
                progress(len(chunk))
    finally:
        net.train(was_training)
    return out


def predict_with(
    segmenter: Segmenter,
    inputs: np.ndarray,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    tta: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """A saved segmenter's probabilities for uint8 inputs (z, c, y, x) or images (z, y, x).

    precision: auto (bf16 only where native), bf16 or fp32; see `engine.device`."""
    device = torch.device(device)
    if inputs.ndim == 3:
        inputs = inputs[:, None]
    if inputs.shape[1] != len(segmenter.channel_names):
        raise ValueError(
            f"model expects {len(segmenter.channel_names)} input channels "
            f"({segmenter.channel_names}), got {inputs.shape[1]}"
        )
    segmenter.net.to(device)
    return predict_probs(
        segmenter.net,
        inputs,
        segmenter.infer,
        segmenter.model.divisor,
        device,
        autocast_factory(device, resolve_precision(precision, device)),
        tta,
        progress,
    )


def probability_to_uint8(prob: np.ndarray) -> np.ndarray:
    """0-1 float probabilities to 0-255 uint8 (rounded)."""
    return np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)


def write_tiff_stack(path: str | Path, stack: np.ndarray) -> Path:
    """Write a (z, y, x) stack as one multi-page TIFF, atomically, zlib-compressed."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, stack, compression="zlib", photometric="minisblack")
    return path
