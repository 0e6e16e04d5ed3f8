"""The networks an export hands to other tools: a trained model plus emsynth's inference.

`ExportedSegmenter` is what a bioimage.io package's `pytorch_state_dict` weights rebuild
(`architecture: {import_from: emsynth.export.modules, callable: ExportedSegmenter, kwargs}`):
the U-Net of `emsynth.segment.model.build_model` under the name `net`, applied exactly as
`emsynth segment predict` applies it (Gaussian-blended sliding windows, optional 8-way TTA,
sigmoid), after the model's own intensity normalisation (membrane models). Its input is the
float scale of `emsynth.segment.model.to_float` (uint8 / 255), its output the foreground
probability per pixel, so `ExportedSegmenter(...)(to_float(x))` equals `predict_with` on `x`.

`ExportedGenerator` does the same for a GAN generator: the network of
`emsynth.gan.networks.build_generator` under the name `net`, fed as `emsynth gan synthesize`
feeds it (`Conditioning` encoding, and `synthesize_array`: reflect padding to multiples of 256,
one pass per slice, crop back), with dropout and decoder noise drawn from a generator seeded
with a fixed `seed` at every call, so the package is deterministic.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from emsynth.gan.data import Conditioning
from emsynth.gan.inference import synthesize_array
from emsynth.gan.networks import build_generator
from emsynth.segment.config import InferConfig, ModelConfig
from emsynth.segment.infer import sliding_probs
from emsynth.segment.model import build_model


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """`numpy.interp` for increasing `xp` (values beyond the ends take the end values)."""
    if len(xp) == 1:
        return fp.expand_as(x).clone()
    idx = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    out = f0 + (x - x0) * (f1 - f0) / (x1 - x0)
    return torch.where(x <= xp[0], fp[0], torch.where(x >= xp[-1], fp[-1], out))


def normalize_levels(levels: torch.Tensor, normalizer: dict) -> torch.Tensor:
    """`emsynth.membranes.normalize.Normalizer` on one (h, w) slice of grey levels 0-255
    (float tensor of whole numbers); returns grey levels 0-255 (whole numbers)."""
    method = normalizer.get("method", "none")
    if method == "standardize":
        x = levels.double()
        mean = float(normalizer.get("mean", 128.0))
        std = float(normalizer.get("std", 48.0))
        s = x.std(unbiased=False)
        if s <= 0:
            scaled = torch.full_like(x, mean)
        else:
            scaled = (x - x.mean()) / torch.clamp(s, min=1e-6) * std + mean
        return torch.clamp(torch.round(scaled), 0, 255).to(levels.dtype)
    if method == "histmatch":
        ref = torch.as_tensor(normalizer["reference"], dtype=torch.float64, device=levels.device)
        ref_levels = torch.nonzero(ref > 0)[:, 0].double()
        ref_cdf = (torch.cumsum(ref, 0) - 0.5 * ref)[ref_levels.long()]
        idx = levels.long().flatten()
        src = torch.bincount(idx, minlength=256).double()
        src = src / src.sum()
        lut = _interp(torch.cumsum(src, 0) - 0.5 * src, ref_cdf, ref_levels)
        lut = torch.clamp(torch.round(lut), 0, 255)
        return lut[idx].reshape(levels.shape).to(levels.dtype)
    return levels


class ExportedSegmenter(nn.Module):
    """A saved emsynth segmenter as one module: float inputs (b, c, y, x) in 0-1 ->
    probabilities (b, 1, y, x). Keyword arguments are JSON-plain (what the package stores).

    model / infer: the sidecar's ModelConfig / InferConfig mappings; in_channels: inputs;
    tta: 8-way TTA (None = the model's default); normalizer: a membrane model's
    `Normalizer.as_dict()`, applied to channel 0 (the EM image) slice by slice.
    """

    def __init__(self, model: dict, in_channels: int, infer: dict | None = None,
                 tta: bool | None = None, normalizer: dict | None = None) -> None:
        super().__init__()
        self.model_cfg = ModelConfig.model_validate(model)
        self.infer = InferConfig.model_validate(infer or {})
        self.tta = self.infer.tta if tta is None else bool(tta)
        self.normalizer = normalizer if normalizer and normalizer.get("method") != "none" else None
        self.net = build_model(self.model_cfg, in_channels)
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.normalizer is not None:
            x = x.clone()
            for b in range(x.shape[0]):
                levels = torch.round(x[b, 0] * 255.0)
                x[b, 0] = normalize_levels(levels, self.normalizer) / 255.0
        return sliding_probs(self.net, x, self.infer, self.model_cfg.divisor, tta=self.tta)


class ExportedGenerator(nn.Module):
    """A saved emsynth generator as one module: masks (b, c, y, x), any value > 0 = the label
    -> synthetic EM (b, 1, y, x) in 0-1, any y, x. Keyword arguments are JSON-plain.

    arch / in_channels / ngf / decoder_noise / upsample: the generator (`build_generator`);
    channels / mask_range: its `Conditioning`; dropout / seed: as `emsynth gan synthesize
    --dropout --seed`.
    Dropout and decoder noise are random, so every call re-seeds them with `seed` (through
    `synthesize_array`): the same input gives the same output, call after call. The output is
    `(synthesize_array(...) + 1) / 2`, in fp32; round(255 x output) is the image of
    `emsynth gan synthesize --precision fp32`.
    """

    def __init__(self, arch: str, in_channels: int, ngf: int, channels: list[str],
                 mask_range: str = "-1,1", decoder_noise: float = 0.0, dropout: bool = True,
                 seed: int = 0, upsample: str = "transpose") -> None:
        super().__init__()
        if len(channels) != in_channels:
            raise ValueError(f"{len(channels)} conditioning channels for {in_channels} inputs")
        self.conditioning = Conditioning(tuple(channels), mask_range)
        self.dropout = bool(dropout)
        self.seed = int(seed)
        self.net = build_generator(arch, in_channels, ngf, decoder_noise, upsample)
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masks = x.detach().cpu().numpy() > 0
        encoded = np.stack([self.conditioning.encode(list(m)) for m in masks])
        images = synthesize_array(self.net, encoded, dropout=self.dropout, seed=self.seed,
                                  device=x.device, precision="fp32")
        return torch.from_numpy((images + 1.0) / 2.0)[:, None].to(x.device)
