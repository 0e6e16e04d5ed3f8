"""`SegmentTask`: a binary U-Net segmenter as an engine `Task`.

Data come in as `SegmentData` (stacked input channels + target), so the same task trains the
mitochondria segmenter (inputs ["image"], target "mito") and the membrane model (inputs
["image", "mito"], target "membrane").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import torch
from monai.losses import DiceCELoss, SoftclDiceLoss

from emsynth.engine.checkpoint import unwrap
from emsynth.engine.task import StepContext, Task
from emsynth.io import atomic_path
from emsynth.segment import augment
from emsynth.segment.config import LossConfig, SegmentConfig
from emsynth.segment.infer import predict_probs
from emsynth.segment.metrics import counts
from emsynth.segment.model import Segmenter, build_model, to_float
from emsynth.segment.sampling import IMAGE, PatchSampler, SegmentData
from emsynth.segment.threshold import ThresholdChoice, choose_threshold


class WarmupCosine:
    """Learning-rate factor: linear warm-up, then cosine decay to `min_ratio` over the run.

    Progress is step / total_steps; when `max_time` is given it is the larger of that and
    training time / max_time, so a run stopped by its wall-clock budget still ends annealed
    whatever the machine's speed (at the price of bitwise repeatability across machines).
    Training time is summed between `step` calls and checkpointed, so resumes continue it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        min_ratio: float = 0.01,
        max_time: float | None = None,
    ):
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.total_steps = max(total_steps, 1)
        self.warmup_steps = warmup_steps
        self.min_ratio = min_ratio
        self.max_time = max_time
        self.step_count = 0
        self.elapsed = 0.0
        self._last_tick: float | None = None
        self._apply()

    def progress(self) -> float:
        done = self.step_count / self.total_steps
        if self.max_time:
            done = max(done, self.elapsed / self.max_time)
        return min(done, 1.0)

    def factor(self) -> float:
        warm = min(1.0, (self.step_count + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        cosine = 0.5 * (1.0 + math.cos(math.pi * self.progress()))
        return warm * (self.min_ratio + (1.0 - self.min_ratio) * cosine)

    def _apply(self) -> None:
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step(self) -> None:
        now = time.monotonic()
        if self._last_tick is not None:
            self.elapsed += now - self._last_tick
        self._last_tick = now
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "elapsed": self.elapsed, "base_lrs": self.base_lrs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.elapsed = float(state["elapsed"])
        self.base_lrs = [float(v) for v in state["base_lrs"]]
        self._last_tick = None
        self._apply()


class SegmentLoss(torch.nn.Module):
    """DiceCE on logits, plus `cldice_weight` x soft clDice on their sigmoid when that weight
    is > 0 (for thin structures whose connectivity matters: membranes). With the weight at 0
    the loss is DiceCE alone, computed exactly as before the term existed."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.dice_ce = DiceCELoss(
            sigmoid=True, batch=cfg.batch_dice, lambda_dice=cfg.dice_weight,
            lambda_ce=cfg.ce_weight,
        )
        self.cldice_weight = cfg.cldice_weight
        self.cldice = SoftclDiceLoss(iter_=cfg.cldice_iters, sigmoid=True) \
            if cfg.cldice_weight > 0 else None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.dice_ce(logits, target)
        if self.cldice is not None:
            loss = loss + self.cldice_weight * self.cldice(logits, target)
        return loss


@dataclass
class SegmentBatch:
    inputs: np.ndarray  # (b, c, p, p) uint8
    target: np.ndarray  # (b, 1, p, p) uint8 0/1
    params: augment.AugmentParams


class SegmentTask(Task):
    """Trains `build_model(cfg.model)` on random crops of `train`; validates on `val`."""

    def __init__(self, cfg: SegmentConfig, train: SegmentData, val: SegmentData | None = None):
        self.cfg = cfg
        self.train_data = train
        self.val_data = val if val is not None and len(val) else None
        self.sampler = PatchSampler(
            train, cfg.sampling.patch_size, cfg.sampling.foreground_fraction
        )
        self.batch_size = cfg.sampling.batch_size
        self.intensity_channels = [i for i, n in enumerate(train.channel_names) if n == IMAGE]
        self.threshold = 0.5
        self.threshold_choice: ThresholdChoice | None = None
        self._preview: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def task_config(self) -> dict[str, Any]:
        return self.cfg.model_dump(mode="json", exclude={"engine", "infer", "threshold"})

    def setup(self, ctx: StepContext) -> None:
        cfg = self.cfg
        net = build_model(cfg.model, len(self.train_data.channel_names)).to(ctx.device)
        self.modules = {"net": ctx.wrap(net)}
        opt_cls = torch.optim.AdamW if cfg.optim.name == "adamw" else torch.optim.Adam
        optimizer = opt_cls(net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.optimizers = {"net": optimizer}
        self.schedulers = {
            "net": WarmupCosine(
                optimizer,
                total_steps=cfg.engine.steps,
                warmup_steps=cfg.optim.warmup_steps,
                min_ratio=cfg.optim.min_lr_ratio,
                max_time=cfg.engine.max_time,
            )
        }
        self.loss = SegmentLoss(cfg.loss)

    @property
    def net(self) -> torch.nn.Module:
        """The plain network (no DDP wrapper)."""
        return unwrap(self.modules["net"])

    def sample_batch(self, rng: np.random.Generator) -> SegmentBatch:
        p = self.cfg.sampling
        inputs, target = self.sampler.sample(rng, p.batch_size)
        params = augment.draw_params(rng, self.cfg.augment, p.batch_size, p.patch_size)
        return SegmentBatch(inputs, target, params)

    def augmented(
        self, batch: SegmentBatch, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float inputs and target on `device` after augmentation (subclasses add their own)."""
        x = to_float(torch.from_numpy(batch.inputs).to(device, non_blocking=True))
        y = torch.from_numpy(batch.target).to(device, non_blocking=True).float()
        return augment.apply(x, y, batch.params, self.intensity_channels)

    def train_step(self, batch: SegmentBatch, ctx: StepContext) -> dict[str, float]:
        x, y = self.augmented(batch, ctx.device)
        with ctx.autocast():
            logits = self.modules["net"](x)
        loss = self.loss(logits.float(), y)
        optimizer = self.optimizers["net"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach()}

    def predict(self, data: SegmentData, ctx: StepContext, tta: bool = False) -> np.ndarray:
        """Probabilities (z, y, x) for `data` with the current weights."""
        return predict_probs(
            self.net,
            data.inputs,
            self.cfg.infer,
            self.cfg.model.divisor,
            ctx.device,
            ctx.autocast,
            tta=tta,
        )

    def evaluate(self, ctx: StepContext, tta: bool = False) -> dict[str, float]:
        """Validation foreground scores (whole val block) at 0.5 and at the chosen threshold."""
        if self.val_data is None:
            return {}
        truth = self.val_data.target
        prob = self.predict(self.val_data, ctx, tta=tta)
        at_half = counts(prob >= 0.5, truth)
        metrics = {"fg_iou@0.5": at_half.iou, "fg_dice@0.5": at_half.dice}
        t = self.cfg.threshold
        if t.choose:
            self.threshold_choice = choose_threshold(
                prob, truth, low=t.low, high=t.high, tolerance=t.tolerance, shrink=t.shrink
            )
            self.threshold = self.threshold_choice.threshold
        chosen = counts(prob >= self.threshold, truth)
        metrics.update(
            fg_iou=chosen.iou,
            fg_dice=chosen.dice,
            precision=chosen.precision,
            recall=chosen.recall,
            threshold=self.threshold,
        )
        middle = len(truth) // 2
        self._preview = (self.val_data.inputs[middle, 0], truth[middle], prob[middle])
        return metrics

    def validate(self, ctx: StepContext) -> dict[str, float]:
        return self.evaluate(ctx, tta=False)

    def log_images(self, step: int, writer: Any, out_dir: Any, ctx: StepContext) -> None:
        """A validation slice: input | truth | probability, as PNG and in TensorBoard."""
        if self._preview is None:
            return
        image, truth, prob = self._preview
        grid = np.concatenate(
            [image, truth.astype(np.uint8) * 255, np.rint(prob * 255).astype(np.uint8)], axis=1
        )
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / f"val_{step:08d}.png") as tmp:
            iio.imwrite(tmp, grid, extension=".png")
        if writer is not None:
            writer.add_image("val/input_truth_prob", grid, global_step=step, dataformats="HW")

    def extra_state(self) -> dict[str, Any]:
        return {"threshold": float(self.threshold)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.threshold = float(state.get("threshold", 0.5))

    def segmenter(self, meta: dict | None = None) -> Segmenter:
        """The trained network with its threshold and inference settings, ready to save."""
        return Segmenter(
            net=self.net,
            model=self.cfg.model,
            channel_names=list(self.train_data.channel_names),
            target_name=self.train_data.target_name,
            threshold=self.threshold,
            infer=self.cfg.infer,
            meta=dict(meta or {}),
        )
