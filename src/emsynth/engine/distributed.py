"""Multi-process data parallelism (PyTorch DDP) when launched under torchrun.

`torchrun --nproc_per_node N` (or `python -m torch.distributed.run`) sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address; the engine then joins the process group (gloo on CPU,
NCCL on GPU), wraps the task's modules in DistributedDataParallel (gradients are averaged
across processes), gives each rank its own batch stream, and lets only rank 0 write files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when the engine created the process group (and ends it)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (keeps the ranks in lockstep)."""
        if not self.active:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def gather(self, obj: Any) -> list[Any]:
        """`obj` from every rank, in rank order (on every rank)."""
        if not self.active:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def finish(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(device_kind: str) -> Distributed:
    """Join the torchrun process group if there is one (NCCL for cuda, gloo for cpu)."""
    if not launched_by_torchrun():
        return Distributed()
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    owns_group = False
    if not dist.is_initialized():
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
        owns_group = True
    return Distributed(rank, world_size, local_rank, owns_group)


def wrap_module(
    module: nn.Module, *, distributed: Distributed, device: torch.device, **ddp_options: Any
) -> nn.Module:
    """DistributedDataParallel around `module` under torchrun; the module itself otherwise.

    A module without trainable parameters (a frozen feature extractor) is returned as is,
    since DDP has nothing to average for it."""
    if not distributed.active or not any(p.requires_grad for p in module.parameters()):
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **ddp_options)
