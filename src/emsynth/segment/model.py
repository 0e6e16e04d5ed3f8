"""The segmentation network and its saved form.

A trained segmenter is two files in one folder, `run_dir/model`: `model.safetensors` (the
weights, in the engine's one weights format: `emsynth.engine.checkpoint.save_weights`, module
"net") and `model.json` (the model, data and inference config plus the chosen threshold), so it
can be rebuilt without the run that made it and without pickles. `model_folder` is the one
place that turns "a run folder or its model/" into the model folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import BasicUNet, UNet
from torch import nn

from emsynth.engine.checkpoint import load_weights, save_weights
from emsynth.errors import input_error
from emsynth.io import atomic_write_text
from emsynth.segment.config import InferConfig, ModelConfig

#: The exported model's folder inside a run folder (segment, membranes, study cells).
MODEL_DIR = "model"
WEIGHTS = "model.safetensors"
SIDECAR = "model.json"
FORMAT = "emsynth-segmenter-1"
#: Name of the network in the weights file (`save_weights` names tensors `<module>.<param>`).
NET = "net"


def model_folder(path: str | Path) -> Path:
    """The model folder of `path`: a run folder (holding model/) or the model folder itself
    (a path to one of its files gives its folder)."""
    path = Path(path)
    if path.is_file():
        return path.parent
    return path / MODEL_DIR if (path / MODEL_DIR / SIDECAR).is_file() else path


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
        save_weights(out_dir / WEIGHTS, {NET: self.net}, {"format": FORMAT})
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
        """Load from a folder holding model.safetensors + model.json, its run folder, or either
        file's path. Weights that do not fit the sidecar's model are a one-line EmsynthError
        naming the file. Weights files written before the engine format was shared (plain
        parameter names) still load."""
        folder = model_folder(path)
        weights, sidecar_path = folder / WEIGHTS, folder / SIDECAR
        if not weights.is_file() or not sidecar_path.is_file():
            raise input_error(
                folder,
                f"no trained segmenter here (need {WEIGHTS} and {SIDECAR})",
                "pass the run folder written by `emsynth segment train` or its model/",
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
        load_weights(weights, {NET: net}, plain_module=NET,
                     fix=f"pass the {WEIGHTS} exported together with this {SIDECAR}")
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
