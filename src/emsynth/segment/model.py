"""The segmentation network and its saved form.

A trained segmenter is two files in one folder: `model.safetensors` (weights) and
`model.json` (the model, data and inference config plus the chosen threshold), so it can be
rebuilt without the run that made it and without pickles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import BasicUNet, UNet
from safetensors.torch import load_file, save_file
from torch import nn

from emsynth.errors import input_error
from emsynth.io import atomic_path, atomic_write_text
from emsynth.segment.config import InferConfig, ModelConfig

WEIGHTS = "model.safetensors"
SIDECAR = "model.json"
FORMAT = "emsynth-segmenter-1"


def build_model(cfg: ModelConfig, in_channels: int) -> nn.Module:
    """A 2D MONAI U-Net with one output channel (a logit per pixel)."""
    if cfg.arch == "basicunet":
        return BasicUNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=1,
            features=tuple(cfg.channels),
            norm=cfg.norm,
            dropout=cfg.dropout,
        )
    return UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=1,
        channels=tuple(cfg.channels),
        strides=tuple(cfg.strides),
        num_res_units=cfg.num_res_units,
        norm=cfg.norm,
        dropout=cfg.dropout,
    )


def to_float(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 inputs to the network's float scale (0-1); one place so train and predict agree.

    Pass uint8 tensors already on the device: the transfer then moves a quarter of the bytes.
    """
    t = torch.as_tensor(x)
    return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()


@dataclass
class Segmenter:
    """A trained network with what is needed to apply it: channel names, threshold, inference."""

    net: nn.Module
    model: ModelConfig
    channel_names: list[str]
    target_name: str
    threshold: float = 0.5
    infer: InferConfig = field(default_factory=InferConfig)
    meta: dict = field(default_factory=dict)

    def save(self, out_dir: str | Path) -> Path:
        """Write weights and sidecar atomically into `out_dir`; returns the folder."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        with atomic_path(out_dir / WEIGHTS) as tmp:
            save_file(state, str(tmp), metadata={"format": FORMAT})
        sidecar = {
            "format": FORMAT,
            "model": self.model.model_dump(mode="json"),
            "channel_names": self.channel_names,
            "target_name": self.target_name,
            "threshold": self.threshold,
            "infer": self.infer.model_dump(mode="json"),
            "meta": self.meta,
        }
        atomic_write_text(out_dir / SIDECAR, json.dumps(sidecar, indent=2))
        return out_dir

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Segmenter:
        """Load from a folder holding model.safetensors + model.json (or either file's path)."""
        path = Path(path)
        folder = path.parent if path.is_file() else path
        weights, sidecar_path = folder / WEIGHTS, folder / SIDECAR
        if not weights.is_file() or not sidecar_path.is_file():
            raise input_error(
                folder,
                f"no trained segmenter here (need {WEIGHTS} and {SIDECAR})",
                "pass the model folder written by `emsynth segment train` (run_dir/model)",
            )
        try:
            sidecar = json.loads(sidecar_path.read_text())
        except json.JSONDecodeError:
            raise input_error(sidecar_path, "not valid JSON", "re-export the model") from None
        if sidecar.get("format") != FORMAT:
            raise input_error(
                sidecar_path,
                f"format is {sidecar.get('format')!r}, not {FORMAT}",
                "use a model written by this version of emsynth",
            )
        model_cfg = ModelConfig.model_validate(sidecar["model"])
        net = build_model(model_cfg, len(sidecar["channel_names"]))
        net.load_state_dict(load_file(str(weights), device="cpu"))
        net.to(device).eval()
        return cls(
            net=net,
            model=model_cfg,
            channel_names=list(sidecar["channel_names"]),
            target_name=sidecar["target_name"],
            threshold=float(sidecar["threshold"]),
            infer=InferConfig.model_validate(sidecar["infer"]),
            meta=dict(sidecar.get("meta", {})),
        )
