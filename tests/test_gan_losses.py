"""Adversarial losses, L1 and feature matching: finite values, known values, the right signs."""

from __future__ import annotations

import math

import pytest
import torch

from emsynth.gan.losses import (
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
)

MODES = ["lsgan", "vanilla", "hinge"]


def _maps(value: float, sizes=(30, 14, 6)) -> list[torch.Tensor]:
    return [torch.full((1, 1, s, s), value) for s in sizes]


@pytest.mark.parametrize("mode", MODES)
def test_discriminator_prefers_a_correct_discriminator(mode):
    """Logits high on real and low on fake must cost D less than the reverse."""
    right = discriminator_loss(_maps(2.0), _maps(-2.0), mode)
    wrong = discriminator_loss(_maps(-2.0), _maps(2.0), mode)
    assert math.isfinite(right) and math.isfinite(wrong)
    assert right < wrong


@pytest.mark.parametrize("mode", MODES)
def test_generator_wants_fakes_called_real(mode):
    fooled = generator_adversarial_loss(_maps(2.0), mode)
    caught = generator_adversarial_loss(_maps(-2.0), mode)
    assert math.isfinite(fooled) and math.isfinite(caught)
    assert fooled < caught


def test_known_values():
    # LSGAN: (D(real) - 1)^2 and D(fake)^2, halved; G: (D(fake) - 1)^2.
    assert discriminator_loss(_maps(1.0), _maps(0.0), "lsgan") == pytest.approx(0.0)
    assert discriminator_loss(_maps(0.0), _maps(1.0), "lsgan") == pytest.approx(1.0)
    assert generator_adversarial_loss(_maps(0.5), "lsgan") == pytest.approx(0.25)
    # Vanilla at logit 0: log 2 on either side.
    assert discriminator_loss(_maps(0.0), _maps(0.0), "vanilla") == pytest.approx(math.log(2))
    # Hinge: zero once real >= 1 and fake <= -1; G is -mean(D(fake)).
    assert discriminator_loss(_maps(1.5), _maps(-1.0), "hinge") == pytest.approx(0.0)
    assert discriminator_loss(_maps(0.0), _maps(0.0), "hinge") == pytest.approx(1.0)
    assert generator_adversarial_loss(_maps(0.7), "hinge") == pytest.approx(-0.7)


@pytest.mark.parametrize("mode", MODES)
def test_losses_are_float32_and_differentiable_from_bf16_logits(mode):
    logits = [torch.randn(2, 1, 6, 6, dtype=torch.bfloat16, requires_grad=True)]
    loss = discriminator_loss(logits, [x.detach() for x in logits], mode)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(logits[0].grad.float()).all() and logits[0].grad.abs().sum() > 0


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown adversarial loss"):
        discriminator_loss(_maps(0.0), _maps(0.0), "wasserstein")


def test_feature_matching():
    real = [[torch.ones(1, 4, 8, 8), torch.ones(1, 8, 4, 4), torch.zeros(1, 1, 3, 3)]]
    fake_feats = [[torch.zeros(1, 4, 8, 8, requires_grad=True),
                   torch.ones(1, 8, 4, 4) * 3, torch.full((1, 1, 3, 3), 9.0)]]
    loss = feature_matching_loss(real, fake_feats)
    assert loss.item() == pytest.approx(1.0 + 2.0)  # logits (last map) are not matched
    loss.backward()
    assert fake_feats[0][0].grad is not None
    assert feature_matching_loss(real, real).item() == 0.0
