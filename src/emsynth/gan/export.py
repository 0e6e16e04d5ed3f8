"""The trained generator as a file: export after training, load for synthesis.

`run_dir/generator.safetensors` holds the generator's weights with what is needed to rebuild
and feed it (architecture, width, decoder noise, upsampling, conditioning channels, mask
range); `load_generator` also accepts a GAN run folder, falling back to its latest checkpoint
while no export exists. Files written before `arch`, `decoder_noise` and `upsample` existed
load as the spec U-Net without noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from emsynth.engine import checkpoint as ckpt
from emsynth.errors import input_error
from emsynth.gan.data import Conditioning
from emsynth.gan.networks import build_generator

#: File name of the exported generator inside a GAN run folder.
GENERATOR_FILE = "generator.safetensors"
_FORMAT = "emsynth-gan-generator"


def export_generator(path: str | Path, generator: nn.Module, conditioning: Conditioning,
                     info: dict[str, Any] | None = None) -> Path:
    """Write the generator's weights with what is needed to rebuild and feed it."""
    net = ckpt.unwrap(generator)
    metadata = {
        "format": _FORMAT,
        "arch": getattr(net, "arch", "unet"),
        "decoder_noise": float(getattr(net, "noise", 0.0)),
        "upsample": getattr(net, "upsample", "transpose"),
        "ngf": net.ngf,
        "in_channels": net.in_channels,
        "channels": list(conditioning.channels),
        "mask_range": conditioning.mask_range,
        **(info or {}),
    }
    ckpt.save_weights(path, {"generator": net}, metadata)
    return Path(path)


def load_generator(path: str | Path, device: str | torch.device = "cpu"
                   ) -> tuple[nn.Module, Conditioning, dict[str, Any]]:
    """(generator, conditioning, metadata) from a generator file or a GAN run folder.

    A run folder gives its exported generator.safetensors, or, for a run still in progress
    or stopped before export, the generator of its latest checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        if (path / GENERATOR_FILE).is_file():
            path = path / GENERATOR_FILE
        else:
            latest = ckpt.latest_checkpoint(path)
            if latest is None:
                raise input_error(path, f"no {GENERATOR_FILE} and no checkpoint in this folder",
                                  "pass a GAN run folder (emsynth gan train) or a generator file")
            return _from_checkpoint(latest, device)
    state, metadata = ckpt.load_weights(path)
    if metadata.get("format") != _FORMAT or "generator" not in state:
        raise input_error(path, "not an emsynth GAN generator file",
                          f"pass the {GENERATOR_FILE} of a GAN run")
    generator = build_generator(metadata.get("arch", "unet"), int(metadata["in_channels"]),
                                int(metadata["ngf"]), float(metadata.get("decoder_noise", 0.0)),
                                metadata.get("upsample", "transpose"))
    ckpt.load_weights(path, {"generator": generator})
    conditioning = Conditioning(tuple(metadata["channels"]), metadata["mask_range"])
    return generator.to(device), conditioning, metadata


def _from_checkpoint(path: Path, device: str | torch.device
                     ) -> tuple[nn.Module, Conditioning, dict[str, Any]]:
    state = ckpt.load_checkpoint(path)
    try:
        task_cfg = state["task_config"]
        channels = tuple(task_cfg["data"]["channels"])
        conditioning = Conditioning(channels, task_cfg["data"]["mask_range"])
        model = task_cfg["model"]
        generator = build_generator(model.get("arch", "unet"), len(channels), int(model["ngf"]),
                                    float(model.get("decoder_noise", 0.0)),
                                    model.get("upsample", "transpose"))
        generator.load_state_dict(state["modules"]["generator"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise input_error(path, f"not a GAN checkpoint ({type(err).__name__}: {err})"[:200],
                          "pass the run folder of emsynth gan train") from None
    info = {"checkpoint": str(path), "step": int(state["step"])}
    return generator.to(device), conditioning, info
