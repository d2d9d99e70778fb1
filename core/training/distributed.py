"""Data-parallel training under ``torchrun``: which process this is, and the few collective steps the loop needs.

``make distil FOLD=0 GPUS=n`` starts n processes with ``torchrun --standalone``; each reads ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` from its environment. Every process trains the same model, wrapped in
:class:`torch.nn.parallel.DistributedDataParallel` (gradients averaged at each step, so the replicas stay
identical), on its own patches; process 0 alone validates, writes the run folder and prints. Backend: NCCL on
CUDA, gloo on CPU (which the tests use). Without ``torchrun`` (``WORLD_SIZE`` unset or 1) nothing changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Distributed", "average_gradients", "barrier", "broadcast_flag", "replicas_identical", "setup"]


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run (``world == 1``: a plain single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that validates, writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls) -> Distributed:
        """Read ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` as ``torchrun`` sets them."""
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            world=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )


def setup(ctx: Distributed, device: torch.device) -> torch.device:
    """Join the process group (once) and return this process's device (``cuda:LOCAL_RANK`` on CUDA)."""
    if not ctx.active:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def barrier(ctx: Distributed) -> None:
    if ctx.active:
        dist.barrier()


def broadcast_flag(ctx: Distributed, flag: bool, device: torch.device) -> bool:
    """Process 0's ``flag`` on every process (e.g. early stopping, decided where validation runs)."""
    if not ctx.active:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def average_gradients(params: list[nn.Parameter], ctx: Distributed) -> None:
    """Average gradients of parameters outside the DDP-wrapped model (learnable loss terms) over processes."""
    if not ctx.active:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= ctx.world


def replicas_identical(model: nn.Module, ctx: Distributed, device: torch.device) -> bool:
    """Whether every process holds bit-identical weights: each parameter and buffer is compared with process 0's."""
    if not ctx.active:
        return True
    same = torch.ones(1, device=device)
    for tensor in [*model.parameters(), *model.buffers()]:
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        if not torch.equal(reference, tensor.detach()):
            same.zero_()
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())
