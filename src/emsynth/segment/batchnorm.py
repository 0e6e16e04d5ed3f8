"""BatchNorm statistics re-estimated on chosen data (AdaBN, Li et al. 2016, used here without
domain adaptation): a segmenter trained on real and synthetic crops keeps running statistics of
that blend, while it is scored on real images. Re-estimating them on real crops, weights
untouched, makes the normalisation the real data's again.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from emsynth.segment.model import to_float
from emsynth.segment.sampling import PatchSampler

#: The BatchNorm layer types (also what blockwise inference folds into convolutions).
BATCHNORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def batchnorm_layers(net: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in net.modules() if isinstance(m, BATCHNORMS) and m.track_running_stats]


@torch.no_grad()
def reestimate_batchnorm(net: torch.nn.Module, sampler: PatchSampler, batches: int,
                         batch_size: int, device: torch.device, seed: int = 0,
                         autocast: Callable[[], AbstractContextManager] = nullcontext) -> int:
    """Replace every BatchNorm layer's running mean and variance by their average over
    `batches` batches of un-augmented crops from `sampler` (a cumulative average: momentum
    None); weights and the net's mode are left as they were. Returns the layers updated."""
    layers = batchnorm_layers(net)
    if not layers:
        return 0
    was_training = net.training
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    rng = np.random.default_rng(seed)
    try:
        for _ in range(batches):
            inputs, _ = sampler.sample(rng, batch_size)
            x = to_float(torch.from_numpy(inputs).to(device))
            with autocast():
                net(x)
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        net.train(was_training)
    return len(layers)
