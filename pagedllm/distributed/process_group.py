"""Joining and leaving the torch.distributed process group of the tensor-parallel ranks.

All ranks rendezvous through a TCP store hosted by rank 0 (`tcp://host:port`); the group
uses NCCL on CUDA and gloo on the CPU. A process belongs to at most one group, so one
tensor-parallel engine runs per process at a time.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pagedllm.distributed.group import TensorParallelGroup

if TYPE_CHECKING:
    from pagedllm.distributed.nccl import NcclCommunicator

logger = logging.getLogger(__name__)

# Bounds a rendezvous and any single collective: model loading and warm-up of the slowest
# rank happen between collectives, so this must cover them.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)


def backend_for(device: str) -> str:
    """torch.distributed backend of a device type: NCCL on CUDA, gloo on the CPU."""
    return "nccl" if device == "cuda" else "gloo"


def check_no_process_group() -> None:
    """Refuse a second tensor-parallel engine in a process whose group is taken."""
    if dist.is_initialized():
        raise RuntimeError(
            "This process already belongs to a torch.distributed process group: only one "
            "tensor-parallel engine runs per process. Shut the other one down first "
            "(engine.shutdown(), or delete its LLM)."
        )


def init_tensor_parallel(device: str, init_method: str, rank: int,
                         world_size: int) -> TensorParallelGroup:
    """Join the tensor-parallel process group (blocks until every rank has joined)."""
    check_no_process_group()
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank,
                            world_size=world_size, timeout=PROCESS_GROUP_TIMEOUT)
    communicator = None
    if device == "cuda":
        try:
            communicator = _direct_communicator(rank, world_size)
        except BaseException:
            dist.destroy_process_group()
            raise
    return TensorParallelGroup(rank, world_size, dist.group.WORLD, communicator)


def _direct_communicator(rank: int, world_size: int) -> NcclCommunicator | None:
    """A NCCL communicator called directly (CUDA-graph safe), or None when a rank cannot
    load libnccl: the ranks then use the process group's collectives, without graphs."""
    from pagedllm.distributed.nccl import NcclCommunicator, load_nccl

    lib, problem = None, None
    try:
        lib = load_nccl()
    except RuntimeError as e:
        problem = str(e)
    problems: list[str | None] = [None] * world_size
    dist.all_gather_object(problems, problem, group=dist.group.WORLD)
    missing = [(r, p) for r, p in enumerate(problems) if p is not None]
    if missing:
        if rank == 0:
            logger.warning("Tensor-parallel steps run without CUDA graphs: rank %d %s",
                           *missing[0])
        return None
    assert lib is not None
    return NcclCommunicator(rank, world_size, dist.group.WORLD, lib)


def destroy_tensor_parallel(group: TensorParallelGroup | None = None) -> None:
    """Free the group's NCCL communicator and leave the process group (no-op when this
    process has none)."""
    if group is not None and group.communicator is not None:
        group.communicator.abort()  # frees it without waiting for ranks that have left
    if dist.is_initialized():
        dist.destroy_process_group()


def abort_tensor_parallel(communicator: NcclCommunicator | None = None) -> None:
    """Abort this process's NCCL communicators (the direct one, then the process group's)
    so that a collective blocked on a dead peer returns. (gloo needs nothing: a peer's exit
    closes its sockets.)"""
    if communicator is not None:
        try:
            communicator.abort()
        except Exception:  # noqa: BLE001 - best effort while failing anyway
            logger.warning("Could not abort the NCCL communicator", exc_info=True)
    try:
        if not dist.is_initialized() or dist.get_backend() != "nccl":
            return
        group = dist.group.WORLD
        for target in (group, group._get_backend(torch.device("cuda"))):
            for name in ("abort", "_abort"):  # the name differs between torch versions
                abort = getattr(target, name, None)
                if abort is not None:
                    abort()
                    return
        logger.warning("This torch cannot abort NCCL communicators: a collective waiting on a "
                       "dead worker ends only at the process group timeout.")
    except Exception:  # noqa: BLE001 - best effort while failing anyway
        logger.warning("Could not abort the NCCL process group", exc_info=True)
