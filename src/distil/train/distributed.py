"""torch.distributed set-up for torchrun, and ``parallelize`` applied to a model from outside.

    info = init_distributed("auto")          # reads RANK / WORLD_SIZE / LOCAL_RANK from torchrun
    model = parallelize(model, cfg.train, info)   # DDP or FSDP2; compile; activation checkpointing

At world size 1 ``parallelize`` wraps nothing. The model itself knows nothing of distribution.
Backends: gloo on CPU, NCCL on CUDA. Multi-node runs use torchrun's own rendezvous.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distil.errors import DistilError

log = logging.getLogger("distil")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str = "auto") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise DistilError("train.device is 'cuda' but no CUDA device is available")
    if world <= 1:
        return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return DistInfo(rank, world, local_rank, device)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def all_reduce_mean(value: float, info: DistInfo, device) -> float:
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / info.world_size


def parallelize(model: torch.nn.Module, train_cfg, info: DistInfo, *, data_parallel: bool = True) -> torch.nn.Module:
    """Activation checkpointing, torch.compile and DDP / FSDP2, from outside the model.
    ``data_parallel=False`` (a tensor-parallel head; every rank sees the same batch) wraps neither."""
    if train_cfg.activation_checkpointing:
        from torch.utils.checkpoint import checkpoint

        for block in model.layers:
            forward = block.forward
            block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    if train_cfg.compile:
        if info.device.type == "cpu":
            log.warning("train.compile is a fast path; the CPU always runs the eager reference, so it is ignored")
        else:
            log.info("compiling the student with torch.compile")
            model = torch.compile(model)
    if info.world_size == 1 or not data_parallel:
        return model
    if train_cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
