"""`GanTask`: pix2pix training (U-Net generator, three-scale PatchGAN) as an engine `Task`.

One step = one discriminator update then one generator update on the same batch, as in
pix2pix. The step is arranged to do no redundant work (see `train_step`); its output is the
same as the textbook sequence (D on fake and real, D update, D on fake again, G update).

Options beyond the spec (all off by default, see `GanConfig`): `optim.g_steps_per_d` generator
updates per D update, per-class L1 weights, per-scale D weights, DiffAugment on D's inputs, and
the mask-consistency loss through a frozen mito segmenter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F

from emsynth.data.volume import Volume
from emsynth.engine.checkpoint import unwrap
from emsynth.engine.task import StepContext, Task
from emsynth.errors import EmsynthError
from emsynth.gan.augment import diff_augment
from emsynth.gan.config import GanConfig, stored_config
from emsynth.gan.data import Conditioning, PairSampler, unit_to_image
from emsynth.gan.losses import (
    dice_loss,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    weighted_l1,
)
from emsynth.gan.networks import (
    MultiScaleDiscriminator,
    build_generator,
    frozen,
    patch_logits,
    split_pairs,
)
from emsynth.io import atomic_write_bytes

#: Fixed crops scored by `validate` and shown by `log_images`.
VAL_CROPS = 8
GRID_CROPS = 4
#: The step's losses in the order returned (the progress line shows the first four).
LOSS_NAMES = ("fm", "d", "g_adv", "l1", "g", "d_real", "d_fake", "l1_weighted", "consistency")


def linear_decay(total_steps: int, decay_start: float):
    """LambdaLR factor: 1 until `decay_start * total_steps`, then linearly down towards 0."""
    start = int(decay_start * total_steps)
    span = max(total_steps - start, 1)

    def factor(step: int) -> float:
        return 1.0 if step < start else max(0.0, (total_steps - step) / span)

    return factor


class GanTask(Task):
    """Train G: masks -> EM image against D: (masks, image) -> real/fake patch maps."""

    def __init__(self, cfg: GanConfig, train_volumes: list[Volume],
                 val_volumes: list[Volume] | None = None) -> None:
        self.cfg = cfg
        self.batch_size = cfg.data.batch_size
        self.conditioning = Conditioning(tuple(cfg.data.channels), cfg.data.mask_range)
        self.sampler = PairSampler(train_volumes, self.conditioning, cfg.data.crop,
                                   cfg.data.augment)
        val_sampler = (PairSampler(val_volumes, self.conditioning, cfg.data.crop, augment=False)
                       if val_volumes else None)
        self.val_crops = val_sampler.fixed(VAL_CROPS) if val_sampler else None
        shown = val_sampler or self.sampler
        self.grid_crops = shown.fixed(GRID_CROPS, seed=1)

    def task_config(self) -> dict[str, Any]:
        return stored_config(self.cfg)

    # --- engine hooks -----------------------------------------------------------------------

    def setup(self, ctx: StepContext) -> None:
        model, optim = self.cfg.model, self.cfg.optim
        channels = len(self.conditioning.channels)
        generator = build_generator(model.arch, channels, model.ngf, model.decoder_noise,
                                    model.upsample).to(ctx.device)
        discriminator = MultiScaleDiscriminator(channels + 1, model.ndf, model.n_scales,
                                                downsample=model.d_downsample,
                                                spectral_norm=model.spectral_norm)
        self.modules = {
            "generator": ctx.wrap(generator),
            "discriminator": ctx.wrap(discriminator.to(ctx.device)),
        }
        betas = (optim.beta1, optim.beta2)
        # The fused Adam kernel: the same update, but one pass over all parameters instead of
        # a chain of per-tensor ops; on CPU the for-loop default took a third of a step.
        self.optimizers = {
            name: torch.optim.Adam(module.parameters(), lr=optim.lr, betas=betas,
                                   fused=ctx.device.type in ("cpu", "cuda"))
            for name, module in self.modules.items()
        }
        decay = linear_decay(self.cfg.engine.steps, optim.decay_start)
        self.schedulers = {
            name: torch.optim.lr_scheduler.LambdaLR(opt, decay)
            for name, opt in self.optimizers.items()
        }
        self.consistency_net = None
        if self.cfg.loss.consistency_weight > 0:
            self.consistency_net = self._frozen_segmenter(ctx.device)

    def _frozen_segmenter(self, device: torch.device) -> Any:
        """The consistency loss's mito segmenter: loaded once, eval mode, no parameter ever
        requires a gradient, and not one of `modules` (not trained, not checkpointed)."""
        from emsynth.segment.model import Segmenter

        segmenter = Segmenter.load(self.cfg.loss.consistency_segmenter, device)
        unknown = [c for c in segmenter.channel_names
                   if c != "image" and c not in self.conditioning.channels]
        if unknown:
            raise EmsynthError(
                f"{self.cfg.loss.consistency_segmenter}: the consistency segmenter reads "
                f"{unknown[0]!r}, which the GAN does not condition on. Fix: use a segmenter of "
                f"the image (and conditioning masks) only"
            )
        segmenter.net.eval().requires_grad_(False)
        return segmenter

    def _segmenter_inputs(self, masks: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """The segmenter's input channels (0-1 scale) from the synthetic image and masks."""
        channels = []
        for name in self.consistency_net.channel_names:
            if name == "image":
                channels.append((fake + 1) / 2)
            else:
                channels.append(self._label(masks, name))
        return torch.cat(channels, 1)

    def _label(self, masks: torch.Tensor, name: str) -> torch.Tensor:
        """Conditioning channel `name` as a 0/1 float map (N, 1, H, W)."""
        index = self.conditioning.channels.index(name)
        threshold = 0.0 if self.conditioning.mask_range == "-1,1" else 0.5
        return (masks[:, index:index + 1] > threshold).float()

    def class_weight_map(self, masks: torch.Tensor) -> torch.Tensor:
        """Per-pixel L1 weight (N, 1, H, W): the largest `loss.class_l1_weights` entry among the
        classes the pixel belongs to, 1 outside all of them."""
        weight = torch.ones_like(masks[:, :1])
        for name, value in self.cfg.loss.class_l1_weights.items():
            weight = torch.where(self._label(masks, name) > 0,
                                 torch.maximum(weight, torch.full_like(weight, value)), weight)
        return weight

    def _augment(self, pairs: torch.Tensor) -> torch.Tensor:
        """DiffAugment on D's input pairs when configured (the identity otherwise)."""
        aug = self.cfg.diffaugment
        if not aug.policy:
            return pairs
        return diff_augment(pairs, aug.policy, aug.translation, aug.cutout)

    def sample_batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.sample(rng, self.cfg.data.batch_size)

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor], ctx: StepContext
                   ) -> dict[str, float]:
        """G forward, then D step, then G step (pix2pix `optimize_parameters`), under the
        engine's autocast. Savings over the textbook step, none changing the result: the fake
        image is computed once and reused; D sees the fake and the real pairs as one batch of
        2B (InstanceNorm is per sample, so this equals two passes); gradients are freed, not
        zeroed; in the G step D's weights are frozen (no weight gradients) and the plain D is
        called, outside data-parallel wrapping, since it is not updated there; Adam runs fused
        (see `setup`).
        """
        masks, real = (t.to(ctx.device, non_blocking=True) for t in batch)
        with ctx.autocast():
            fake = self.modules["generator"](masks)
        d_terms = self.update_discriminator(masks, real, fake, ctx)
        g_terms = self.update_generator(masks, real, fake, ctx)
        # optim.g_steps_per_d > 1: more G updates against the same D, each with a fresh G
        # pass (new dropout and noise draws) on the same batch; the last one's losses are logged.
        for _ in range(self.cfg.optim.g_steps_per_d - 1):
            with ctx.autocast():
                fake = self.modules["generator"](masks)
            g_terms = self.update_generator(masks, real, fake, ctx)
        terms = {**d_terms, **g_terms}
        return {name: terms[name].item() for name in LOSS_NAMES if name in terms}

    def update_discriminator(self, masks: torch.Tensor, real: torch.Tensor, fake: torch.Tensor,
                             ctx: StepContext) -> dict[str, torch.Tensor]:
        """D step (pix2pix `backward_D`): real pairs towards "real", fake pairs towards "fake",
        with G cut off (`fake` detached). Returns `d` and the mean logits `d_real`, `d_fake`."""
        with ctx.autocast():
            pairs = torch.cat([torch.cat([masks, fake.detach()], 1), torch.cat([masks, real], 1)])
            feats = self.modules["discriminator"](self._augment(pairs))
        fake_feats, real_feats = split_pairs(feats, masks.shape[0])
        real_logits, fake_logits = patch_logits(real_feats), patch_logits(fake_feats)
        loss_d = discriminator_loss(real_logits, fake_logits, self.cfg.loss.adversarial,
                                    self.cfg.loss.scale_weights)
        self._update("discriminator", loss_d)
        return {"d": loss_d, "d_real": _mean_logit(real_logits),
                "d_fake": _mean_logit(fake_logits)}

    def update_generator(self, masks: torch.Tensor, real: torch.Tensor, fake: torch.Tensor,
                         ctx: StepContext) -> dict[str, torch.Tensor]:
        """G step (pix2pix `backward_G`): make the updated D call the fake pair real, plus
        `l1_weight` x L1 to the real image (per-class weighted when `class_l1_weights` are
        set: then `l1_weighted` is the loss term and `l1` stays the plain L1, for comparison),
        plus `feature_matching_weight` x feature matching (pix2pixHD) when on, plus
        `consistency_weight` x (1 - Dice) of the frozen segmenter's mito on the synthetic image
        when on. D is frozen: gradients flow through it to G only; the segmenter is never
        updated. Returns `g_adv`, `l1`, `fm`, `l1_weighted`, `consistency` (when on) and `g`."""
        loss_cfg = self.cfg.loss
        use_fm = loss_cfg.feature_matching_weight > 0
        discriminator = unwrap(self.modules["discriminator"])
        with frozen(discriminator):
            with ctx.autocast():
                fake_pair = torch.cat([masks, fake], 1)
                # Feature matching compares with the real pair's features under the updated D.
                d_in = torch.cat([fake_pair, torch.cat([masks, real], 1)]) if use_fm else fake_pair
                feats = discriminator(self._augment(d_in))
            fake_feats, real_feats = split_pairs(feats, masks.shape[0])
            terms = {
                "g_adv": generator_adversarial_loss(patch_logits(fake_feats),
                                                    loss_cfg.adversarial, loss_cfg.scale_weights),
                "l1": F.l1_loss(fake.float(), real),
            }
            if loss_cfg.class_l1_weights:
                terms["l1_weighted"] = weighted_l1(fake, real, self.class_weight_map(masks))
                loss_g = terms["g_adv"] + loss_cfg.l1_weight * terms["l1_weighted"]
            else:
                loss_g = terms["g_adv"] + loss_cfg.l1_weight * terms["l1"]
            if use_fm:
                terms["fm"] = feature_matching_loss(real_feats, fake_feats,
                                                    loss_cfg.scale_weights)
                loss_g = loss_g + loss_cfg.feature_matching_weight * terms["fm"]
            if self.consistency_net is not None:
                with ctx.autocast():
                    logits = self.consistency_net.net(self._segmenter_inputs(masks, fake))
                terms["consistency"] = dice_loss(torch.sigmoid(logits.float()),
                                                 self._label(masks, "mito"))
                loss_g = loss_g + loss_cfg.consistency_weight * terms["consistency"]
            self._update("generator", loss_g)
        return {**terms, "g": loss_g}

    def _update(self, name: str, loss: torch.Tensor) -> None:
        """Backward `loss` into module `name` and step its optimiser (old gradients freed)."""
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def _generate(self, masks: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """G without dropout (eval), batch by batch: deterministic, comparable across steps.
        Decoder noise, when on, stays on (as at synthesis) with a fixed seed, drawn from a
        forked generator so that the training stream does not depend on validation."""
        generator = unwrap(self.modules["generator"])
        generator.eval()
        outs = []
        noisy = self.cfg.model.decoder_noise > 0
        devices = [ctx.device] if noisy and ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=noisy):
            if noisy:
                torch.manual_seed(0)
            for start in range(0, masks.shape[0], self.cfg.data.batch_size):
                with ctx.autocast():
                    outs.append(generator(masks[start:start + self.cfg.data.batch_size]
                                          .to(ctx.device)).float().cpu())
        return torch.cat(outs)

    def validate(self, ctx: StepContext) -> dict[str, float]:
        """L1 (in [-1, 1] units, the training loss) and PSNR (dB) on fixed validation crops."""
        if self.val_crops is None:
            return {}
        masks, real = self.val_crops
        fake = self._generate(masks, ctx)
        mse = float(((fake - real) / 2).pow(2).mean())  # in [0, 1] intensity units
        return {"l1": float((fake - real).abs().mean()),
                "psnr": 10 * float(np.log10(1.0 / max(mse, 1e-12)))}

    def log_images(self, step: int, writer: Any, out_dir: Any, ctx: StepContext) -> None:
        """One row per fixed crop: each mask channel | real image | synthetic image."""
        masks, real = self.grid_crops
        fake = self._generate(masks, ctx)
        grid = sample_rows(masks, real, fake, self.conditioning.mask_range)
        buffer = iio.imwrite("<bytes>", grid, extension=".png")
        atomic_write_bytes(Path(out_dir) / f"samples_{step:08d}.png", buffer)
        if writer is not None:
            writer.add_image("samples", grid, global_step=step, dataformats="HW")


def sample_rows(masks: torch.Tensor, real: torch.Tensor, fake: torch.Tensor,
               mask_range: str, gap: int = 4) -> np.ndarray:
    """uint8 grid, one row per sample: masks (white = label) | real | synthetic."""
    mask_img = masks.float() if mask_range == "-1,1" else masks.float() * 2 - 1
    rows = []
    for i in range(masks.shape[0]):
        tiles = [*mask_img[i], real[i, 0], fake[i, 0]]
        row = [unit_to_image(t) for t in tiles]
        rows.append(_join(row, gap, axis=1))
    return _join(rows, gap, axis=0)


def _mean_logit(logits: list[torch.Tensor]) -> torch.Tensor:
    """Mean of the logits maps over pixels, then over scales."""
    return torch.stack([x.detach().float().mean() for x in logits]).mean()


def _join(arrays: list[np.ndarray], gap: int, axis: int) -> np.ndarray:
    shape = list(arrays[0].shape)
    shape[axis] = gap
    spacer = np.full(shape, 255, np.uint8)
    parts = [p for a in arrays for p in (a, spacer)][:-1]
    return np.concatenate(parts, axis=axis)
