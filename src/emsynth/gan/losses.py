"""GAN objectives: LSGAN (default), vanilla (BCE) and hinge adversarial losses, feature matching.

Every adversarial loss takes the logits maps of the PatchGANs (one tensor per scale, raw, no
activation) and averages over scales, so its weight relative to L1 (100 in pix2pix, which has
one scale) keeps its meaning with three.

LSGAN uses MONAI's `PatchAdversarialLoss` (least squares without its extra activation, i.e.
(D - 1)^2 and D^2 as in Mao et al. and pix2pix). The other two are written here because
MONAI's variants differ from the standard ones: its BCE applies a sigmoid then `BCELoss`
(saturates, and is refused under CUDA autocast) where BCE-with-logits is stable, and its hinge
squashes the logits through tanh first, which is not the hinge loss of Lim & Ye / SAGAN.
Losses are computed in float32 whatever the autocast precision of the forward pass.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss

AdversarialMode = Literal["lsgan", "vanilla", "hinge"]

_LSGAN = PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)


def _as_float(logits: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x.float() for x in logits]


def discriminator_loss(
    real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor], mode: AdversarialMode,
    weights: list[float] | None = None,
) -> torch.Tensor:
    """D's loss: push real pairs to "real" and synthetic pairs to "fake"; halved as in pix2pix.

    weights: one per scale, replacing the mean over scales (None = the mean)."""
    real, fake = _as_float(real_logits), _as_float(fake_logits)
    if weights is not None:
        return _weighted([discriminator_loss([r], [f], mode) for r, f in zip(real, fake)],
                         weights)
    if mode == "lsgan":
        loss_real = _LSGAN(real, target_is_real=True, for_discriminator=True)
        loss_fake = _LSGAN(fake, target_is_real=False, for_discriminator=True)
    elif mode == "vanilla":
        loss_real = _mean([_bce(x, 1.0) for x in real])
        loss_fake = _mean([_bce(x, 0.0) for x in fake])
    elif mode == "hinge":
        loss_real = _mean([F.relu(1.0 - x).mean() for x in real])
        loss_fake = _mean([F.relu(1.0 + x).mean() for x in fake])
    else:
        raise ValueError(f"unknown adversarial loss {mode!r}")
    return 0.5 * (loss_real + loss_fake)


def generator_adversarial_loss(fake_logits: list[torch.Tensor], mode: AdversarialMode,
                               weights: list[float] | None = None) -> torch.Tensor:
    """G's adversarial loss: make D call the synthetic pairs real (weights: per scale)."""
    fake = _as_float(fake_logits)
    if weights is not None:
        return _weighted([generator_adversarial_loss([f], mode) for f in fake], weights)
    if mode == "lsgan":
        return _LSGAN(fake, target_is_real=True, for_discriminator=False)
    if mode == "vanilla":
        return _mean([_bce(x, 1.0) for x in fake])
    if mode == "hinge":
        return _mean([-x.mean() for x in fake])
    raise ValueError(f"unknown adversarial loss {mode!r}")


def feature_matching_loss(
    real_feats: list[list[torch.Tensor]], fake_feats: list[list[torch.Tensor]],
    weights: list[float] | None = None,
) -> torch.Tensor:
    """pix2pixHD feature matching: L1 between D's intermediate features on real and fake pairs.

    Summed over the layers before the logits, averaged over scales (pix2pixHD's weights for
    n_layers=3); the real features are targets, so no gradient flows into them.
    """
    per_scale = [
        sum(F.l1_loss(f.float(), r.detach().float()) for r, f in zip(real[:-1], fake[:-1]))
        for real, fake in zip(real_feats, fake_feats)
    ]
    return _mean(per_scale) if weights is None else _weighted(per_scale, weights)


def weighted_l1(fake: torch.Tensor, real: torch.Tensor, weight_map: torch.Tensor
                ) -> torch.Tensor:
    """Mean of weight_map x |fake - real| (the per-class L1 of Han et al.; not renormalised,
    so a class weight of 4 makes that class's pixels count 4 times)."""
    return (weight_map * (fake.float() - real.float()).abs()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice between probabilities and a binary target, over the whole batch."""
    prob, target = prob.float(), target.float()
    inter = (prob * target).sum()
    return 1 - (2 * inter + eps) / (prob.sum() + target.sum() + eps)


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _mean(losses: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(losses).mean()


def _weighted(losses: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    if len(weights) != len(losses):
        raise ValueError(f"{len(weights)} scale weights for {len(losses)} scales")
    return sum(w * x for w, x in zip(weights, losses))
