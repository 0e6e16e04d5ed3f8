"""`emsynth doctor`: what this machine is, what `auto` picks on it, and a measured reason why.

The micro-benchmark is one training step of a small MONAI U-Net (the segmenter's family) in
fp32 and under bf16 autocast, best of a few repeats, so a user sees on their own CPU the ratio
that decides the precision. It stays under ~5 s even where bf16 is emulated (~20x slower), by
using a small batch and giving the bf16 side at most a few repeats.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch

from emsynth.engine.device import (
    autocast_factory,
    choose_precision,
    cpu_bf16_native,
    cpu_capability,
    cpu_model,
    resolve_device,
    thread_count,
    time_call,
    usable_cores,
)
from emsynth.engine.runinfo import versions


@dataclass(frozen=True)
class StepTiming:
    """Images per second of one U-Net training step in each precision on one device."""

    fp32: float
    bf16: float

    @property
    def bf16_speedup(self) -> float:
        return self.bf16 / self.fp32


def unet_step_timing(device: torch.device, batch: int = 1, size: int = 128) -> StepTiming:
    """Time one training step (forward, loss, backward, Adam) of a MONAI U-Net 16-128."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(2, 1, 1, (16, 32, 64, 128), (2, 2, 2), num_res_units=2).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, size, size, device=device)
    target = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()

    def step(precision: str):
        autocast = autocast_factory(device, precision)

        def call() -> None:
            with autocast():
                logits = net(x)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        return call

    fp32 = time_call(step("fp32"), repeats=3)
    # Where bf16 is emulated one step takes ~20x the fp32 one: fewer repeats keep it short.
    bf16 = time_call(step("bf16"), repeats=1 if fp32 > 0.05 and not cpu_bf16_native() else 3)
    return StepTiming(fp32=batch / fp32, bf16=batch / bf16)


def doctor_report(device: str = "auto", benchmark: bool = True) -> dict[str, object]:
    """Everything `emsynth doctor` prints, as a plain dict (also for tests and run records)."""
    dev = resolve_device(device)
    choice = choose_precision("auto", dev)
    report: dict[str, object] = {
        "versions": versions(),
        "platform": platform.platform(),
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "cpu": cpu_model(),
        "cpu_capability": cpu_capability(),
        "cpu_bf16_native": cpu_bf16_native(),
        "usable_cores": usable_cores(),
        "threads": thread_count(None),
        "auto_precision": choice.precision,
        "auto_reason": choice.reason,
    }
    if benchmark:
        before = torch.get_num_threads()
        torch.set_num_threads(thread_count(None))
        try:
            timing = unet_step_timing(dev)
        finally:
            torch.set_num_threads(before)
        report.update(unet_fp32_img_s=timing.fp32, unet_bf16_img_s=timing.bf16,
                      bf16_speedup=timing.bf16_speedup)
    return report
