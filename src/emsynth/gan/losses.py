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
    real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor], mode: AdversarialMode
) -> torch.Tensor:
    """D's loss: push real pairs to "real" and synthetic pairs to "fake"; halved as in pix2pix."""
    real, fake = _as_float(real_logits), _as_float(fake_logits)
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


def generator_adversarial_loss(fake_logits: list[torch.Tensor], mode: AdversarialMode
                               ) -> torch.Tensor:
    """G's adversarial loss: make D call the synthetic pairs real."""
    fake = _as_float(fake_logits)
    if mode == "lsgan":
        return _LSGAN(fake, target_is_real=True, for_discriminator=False)
    if mode == "vanilla":
        return _mean([_bce(x, 1.0) for x in fake])
    if mode == "hinge":
        return _mean([-x.mean() for x in fake])
    raise ValueError(f"unknown adversarial loss {mode!r}")


def feature_matching_loss(
    real_feats: list[list[torch.Tensor]], fake_feats: list[list[torch.Tensor]]
) -> torch.Tensor:
    """pix2pixHD feature matching: L1 between D's intermediate features on real and fake pairs.

    Summed over the layers before the logits, averaged over scales (pix2pixHD's weights for
    n_layers=3); the real features are targets, so no gradient flows into them.
    """
    per_scale = [
        sum(F.l1_loss(f.float(), r.detach().float()) for r, f in zip(real[:-1], fake[:-1]))
        for real, fake in zip(real_feats, fake_feats)
    ]
    return _mean(per_scale)


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _mean(losses: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(losses).mean()
