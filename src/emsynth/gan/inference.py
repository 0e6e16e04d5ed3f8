"""Whole-slice synthesis: masks of any size -> synthetic EM slices, one generator pass each.

Each slice is reflect-padded (centred) to the next multiple of 256, run through the generator
once and cropped back. The generator is fully convolutional, so there are no tiles and no
seams by construction; InstanceNorm then normalises over the whole slice, as pix2pix does at
test time on its full-size inputs.

Dropout: pix2pix keeps dropout active at test time, as its only source of noise (Isola et al.
2017, sec. 3.1); `dropout=True` (the default) does the same, so two seeds give two different
images of one mask set; `dropout=False` gives the deterministic mean-like output. Either way
the result is a function of (weights, masks, seed).

Decoder noise (`model.decoder_noise`, Han et al. 2018) is part of the generator and stays on at
synthesis whatever `dropout` says; it is drawn from the same seeded generator, so `seed` fixes
it too. Both generator architectures (spec U-Net, SPADE) are fed the same way.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from emsynth.data.volume import LABEL_NAMES, Volume
from emsynth.engine import checkpoint as ckpt
from emsynth.engine.device import autocast_factory, resolve_device, resolve_precision
from emsynth.errors import input_error
from emsynth.gan.data import Conditioning, unit_to_image
from emsynth.gan.networks import SIDE_MULTIPLE


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


def synthesize_array(
    generator: nn.Module,
    masks: np.ndarray,
    *,
    dropout: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    progress: bool = False,
) -> np.ndarray:
    """Encoded masks (Z, C, H, W) float32 -> synthetic slices (Z, H, W) float32 in [-1, 1]."""
    device = torch.device(device) if device is not None else next(generator.parameters()).device
    autocast = autocast_factory(device, resolve_precision(precision, device))
    z, _, h, w = masks.shape
    pad_y, pad_x = padding_for(h), padding_for(w)
    modes = [m.training for m in generator.modules()]
    out = np.empty((z, h, w), np.float32)
    devices = [device] if device.type == "cuda" else []
    try:
        _set_dropout(generator, dropout)
        with torch.random.fork_rng(devices=devices), torch.inference_mode(), \
                Progress(disable=not progress, transient=True) as bar:
            torch.manual_seed(seed)
            job = bar.add_task("synthesising", total=z)
            for i in range(z):
                # numpy's reflect also covers pads wider than the slice (it reflects again).
                x = np.pad(masks[i], ((0, 0), pad_y, pad_x), mode="reflect")
                with autocast():
                    y = generator(torch.from_numpy(x)[None].to(device))
                out[i] = y[0, 0, pad_y[0]:pad_y[0] + h, pad_x[0]:pad_x[0] + w].float().cpu()
                bar.advance(job)
    finally:
        for module, mode in zip(generator.modules(), modes):
            module.training = mode
    return out


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
) -> Volume:
    """A synthetic Volume: one generated image per slice of `masks`, which keeps its labels.

    conditioning: the channels the generator was trained on (stored with an exported
    generator; `emsynth.gan.export.load_generator` returns it); None = the training default for its input count.
    precision: "fp32", "bf16" or "auto" (bf16 on CPU and bf16-capable GPUs).
    """
    net = ckpt.unwrap(generator)
    conditioning = conditioning or default_conditioning(net)
    conditioning.check(masks, "mask volume")
    if len(conditioning.channels) != net.in_channels:
        raise input_error(
            masks.source or "mask volume",
            f"{len(conditioning.channels)} conditioning channels for a generator with "
            f"{net.in_channels} inputs", "pass the conditioning the generator was trained with",
        )
    encoded = np.stack([conditioning.encode_slice(masks, z) for z in range(len(masks))])
    if isinstance(device, str):
        device = resolve_device(device)
    if device is not None:
        net.to(device)
    images = synthesize_array(net, encoded, dropout=dropout, seed=seed, device=device,
                              precision=precision, progress=progress)
    return Volume(
        image=unit_to_image(images),
        labels={name: label.copy() for name, label in masks.labels.items()},
        pixel_size_nm=masks.pixel_size_nm,
        source=f"synthetic(seed={seed}, dropout={dropout}) from {masks.source or 'masks'}",
        slice_names=list(masks.slice_names),
    )
