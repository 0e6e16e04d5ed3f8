"""The segment loss: DiceCE alone by default (recorded configs unchanged), and the optional
soft clDice term (loss.cldice_weight) that rewards thin, connected predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from monai.losses import DiceCELoss, SoftclDiceLoss
from tiny import UNET_SMALL
from typer.testing import CliRunner

from emsynth.cli import app
from emsynth.config import dump_config, load_config
from emsynth.membranes.config import MembraneConfig
from emsynth.segment.config import LossConfig, SegmentConfig
from emsynth.segment.task import SegmentLoss


def test_default_configs_dump_as_before_the_cldice_keys_existed():
    """Run records, study cell keys and TSTR's cached reference hash the dumped config: at
    the defaults the new keys are absent, so those keys and records do not change."""
    assert SegmentConfig().model_dump()["loss"] == {"dice_weight": 1.0, "ce_weight": 1.0,
                                                    "batch_dice": True}
    assert "cldice" not in SegmentConfig().model_dump_json()
    assert "cldice" not in dump_config(MembraneConfig())
    on = load_config(SegmentConfig, None, ["loss.cldice_weight=0.5", "loss.cldice_iters=5"])
    assert on.model_dump(mode="json")["loss"]["cldice_weight"] == 0.5
    assert on.model_dump(mode="json")["loss"]["cldice_iters"] == 5
    assert SegmentConfig.model_validate(on.model_dump()) == on  # round trip
    with pytest.raises(Exception, match="cldice_weight"):
        LossConfig(cldice_weight=-1.0)


def test_default_loss_is_dicece_bitwise():
    torch.manual_seed(0)
    logits = torch.randn(4, 1, 32, 32)
    target = (torch.rand(4, 1, 32, 32) > 0.7).float()
    expected = DiceCELoss(sigmoid=True, batch=True)(logits, target)
    loss = SegmentLoss(LossConfig())
    assert loss.cldice is None
    assert torch.equal(loss(logits, target), expected)


def _grid(half: int = 1, gap: int = 0) -> torch.Tensor:
    """A 64 px square crossed by lines 2 half + 1 px wide every 16 px (a membrane network);
    `gap` > 0 cuts a gap that long into every line segment between two crossings."""
    image = np.zeros((64, 64), bool)
    for c in range(8, 64, 16):
        image[c - half:c + half + 1, :] = True
        image[:, c - half:c + half + 1] = True
    for c in range(8, 64, 16):
        for start in range(15, 64, 16) if gap else ():
            image[c - half:c + half + 1, start:start + gap] = False
            image[start:start + gap, c - half:c + half + 1] = False
    return torch.from_numpy(image)[None, None].float()


def _logits(mask: torch.Tensor) -> torch.Tensor:
    return (mask * 2 - 1) * 8.0  # confident: +8 on the lines, -8 elsewhere


def test_cldice_prefers_a_thin_connected_prediction_to_a_broken_one():
    """Target: 3 px lines. A 1 px line along their centre (their skeleton) is connected; the
    broken prediction has the full width but 4 px gaps. Dice prefers the broken one (more
    pixels right), clDice the connected one: it scores skeletons, not pixels."""
    target = _grid()
    thin, broken = _logits(_grid(half=0)), _logits(_grid(gap=4))
    cldice = SoftclDiceLoss(iter_=3, sigmoid=True)
    on_thin, on_broken = cldice(thin, target), cldice(broken, target)
    assert torch.isfinite(on_thin) and torch.isfinite(on_broken)
    assert on_thin < 0.01 and on_broken > 0.1  # measured 0.0002 and 0.164
    dice = DiceCELoss(sigmoid=True, lambda_ce=0.0)
    assert dice(thin, target) > dice(broken, target) + 0.3  # 0.475 against 0.127


def test_cldice_term_adds_to_dicece_and_is_differentiable():
    target = _grid()
    broken = _logits(_grid(gap=4))
    logits = broken.clone().requires_grad_(True)
    total = SegmentLoss(LossConfig(cldice_weight=0.5))(logits, target)
    expected = (DiceCELoss(sigmoid=True, batch=True)(broken, target)
                + 0.5 * SoftclDiceLoss(iter_=3, sigmoid=True)(broken, target))
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert torch.isfinite(logits.grad).all()
    # Raising the logits inside a gap lowers the loss: the gradient points there.
    gaps = (target - _grid(gap=4)).bool()
    assert gaps.sum() > 0 and (logits.grad[gaps] < 0).all()


@pytest.mark.slow
def test_tiny_membrane_training_with_cldice(tmp_path):
    run = tmp_path / "run"
    sets = ["engine.steps=6", "engine.log_every=3", "engine.checkpoint_every=0",
            "engine.num_threads=1", "engine.device=cpu", "engine.val_every=0",
            "engine.image_every=0", "data.phantom.slices=4", "data.phantom.size=128",
            "data.train_slices=0-2", "data.val_slices=3", "data.val_gap=0",
            "sampling.patch_size=64", "sampling.batch_size=2", *UNET_SMALL, "infer.window=64",
            "loss.cldice_weight=0.5"]
    result = CliRunner().invoke(app, ["membranes", "train", "--phantom", "vnc", "-o", str(run),
                                      *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    recorded = yaml.safe_load((run / "config.yaml").read_text())["task"]["loss"]
    assert recorded["cldice_weight"] == 0.5 and recorded["cldice_iters"] == 3
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    losses = [float(r[3]) for r in rows if r[2] == "train/loss"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert (run / "model").is_dir()
