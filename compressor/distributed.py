"""Data-parallel calibration over torch.distributed (gloo on CPUs, NCCL on GPUs): each process takes every
world-size-th batch of calibration windows, and the statistics are summed across processes before a layer is
changed, so every process changes it identically and the result equals one process's on the same batches.

Start the processes with `torchrun` (which sets the rendezvous variables) or call
`torch.distributed.init_process_group` yourself; without an initialized process group everything is one process.
"""
from __future__ import annotations

import torch


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """This process's batches: every world-size-th one, starting at its rank."""
    rank, size = world()
    return batches[rank::size]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all processes, in place (a no-op for one process)."""
    if world()[1] > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def init_from_env() -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL with GPUs, else gloo."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
