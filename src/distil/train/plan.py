"""The parallel plan: how the student is spread over processes, and all that depends on it, chosen once.

    plan = ParallelPlan(cfg, info)
    plan.shard(student)                           # tp: the LM head split over the vocabulary
    state = plan.restore(path, student, optimizer)   # a checkpoint, before wrapping
    model, optimizer = plan.wrap(student, optimizer, make_optimizer)
    grad_norm = plan.clip(params, max_norm)
    plan.save(run, step, student, optimizer, extra=..., keep=2)

Kinds (``plan.kind``):

* ``single``: one process;
* ``ddp``: DistributedDataParallel (``train.parallel: ddp``), every rank its slice of the batch;
* ``fsdp``: FSDP2 ``fully_shard`` per block (``train.parallel: fsdp``);
* ``tp``: ``loss.parallel: vocab`` at world size > 1: the LM head's rows (the vocabulary) are split
  over the processes with torch's ColwiseParallel, the rest is replicated, and every rank sees the
  same batch (no data parallelism).

Sharded kinds (fsdp, tp) gather full state dicts for checkpoints, roll back in place, validate and
score on every rank (a sharded forward needs them all) and hand out an unsharded copy of the model
at the end. torch.compile and activation checkpointing are applied by ``parallelize`` too.
"""

from __future__ import annotations

import logging
import math

import torch

from distil.errors import DistilError
from distil.models.io import load_state
from distil.train.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from distil.train.distributed import DistInfo, barrier, parallelize

log = logging.getLogger("distil")


class ParallelPlan:
    def __init__(self, cfg, info: DistInfo):
        self.info = info
        self.train_cfg = cfg.train
        world = info.world_size
        if cfg.loss.parallel == "vocab" and world > 1:
            self.kind = "tp"
        elif world > 1:
            self.kind = "fsdp" if cfg.train.parallel == "fsdp" else "ddp"
        else:
            self.kind = "single"
        if cfg.train.batch_size % world and self.kind != "tp":
            raise DistilError(f"train.batch_size = {cfg.train.batch_size} (the global micro-batch) is not divisible "
                              f"by the {world} processes")
        local = cfg.train.batch_size if self.kind == "tp" else cfg.train.batch_size // world
        first = 0 if self.kind == "tp" else info.rank * local
        self.local_rows = slice(first, first + local)  # this rank's rows of each global batch
        self.sharded = False  # the parameters are DTensors (tp from shard(), fsdp from wrap())
        self.tp_group = None
        self._pending_optimizer = None  # fsdp: optimizer state read before the optimizer exists
        if cfg.loss.parallel == "vocab" and world == 1:
            log.info("loss.parallel = 'vocab' at world size 1 is the plain loss")
        if cfg.loss.parallel == "sequence" and world == 1:
            log.info("loss.parallel = 'sequence' at world size 1 is the plain loss")

    @property
    def gathers(self) -> bool:
        """Sharded: checkpoints gather, and every rank validates and scores."""
        return self.kind in ("fsdp", "tp")

    def shard(self, student, teacher_vocab: int | None) -> None:
        """tp: split the LM head over the processes (before the optimizer is built)."""
        if self.kind != "tp":
            return
        if teacher_vocab is not None and teacher_vocab != student.config.vocab_size:
            raise DistilError(f"loss.parallel 'vocab' needs the same vocabulary on both sides: student "
                              f"{student.config.vocab_size}, teacher {teacher_vocab}")
        self.tp_group = shard_lm_head(student, self.info.device, self.info.world_size)
        self.sharded = True
        if self.info.is_main:
            log.info("LM head sharded over %d processes (vocabulary parallel); loss.parallel = vocab",
                     self.info.world_size)

    def restore(self, path, student, optimizer) -> dict:
        """Load a checkpoint into the student and optimizer; returns the trainer state it holds."""
        if self.sharded:
            return _load_sharded(path, student, optimizer)
        if self.kind == "fsdp":  # before sharding: weights now, optimizer state once wrap() rebuilds it
            model_state, state = read_checkpoint(path)
            load_state(student, model_state, source=str(path))
            self._pending_optimizer = state.pop("optimizer")
            return state
        return load_checkpoint(path, student, optimizer)

    def wrap(self, student, optimizer, make_optimizer):
        """(the model the step calls, the optimizer): DDP / FSDP2 / compile from outside the model."""
        model = parallelize(student, self.train_cfg, self.info, data_parallel=self.kind != "tp")
        if self.kind == "fsdp":  # FSDP2 replaced the parameters with sharded ones: the optimizer must hold those
            self.sharded = True
            optimizer = make_optimizer(student)
            if self._pending_optimizer is not None:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(student, optimizer, self._pending_optimizer,
                                         options=StateDictOptions(full_state_dict=True))
                self._pending_optimizer = None
        return model, optimizer

    def clip(self, params: list, max_norm: float) -> float:
        return clip_grad_norm(params, max_norm)

    def save(self, run, step: int, student, optimizer, *, extra: dict, keep: int) -> None:
        """A checkpoint in ``run.checkpoints`` (every rank calls it; rank 0 writes)."""
        model_state = optimizer_state = None
        if self.gathers:  # every rank takes part in gathering the full state dicts
            model_state, optimizer_state = _gather_full_state(student, optimizer)
        if self.info.is_main:
            save_checkpoint(run.checkpoints, step, student, optimizer_state if self.gathers else optimizer.state_dict(),
                            model_state=model_state, keep=keep, extra=extra)
        barrier(self.info)

    def full_state(self, student, optimizer) -> dict | None:
        """fsdp: the gathered model state dict for the final save (a collective); else None."""
        return _gather_full_state(student, optimizer)[0] if self.kind == "fsdp" else None

    def plain(self, student):
        """The student itself, or under tp a whole (unsharded) copy; a collective under tp."""
        return _unsharded_copy(student, self.info.device) if self.kind == "tp" else student


def shard_lm_head(student, device: torch.device, world_size: int):
    """Tensor-parallel LM head: the rows (vocabulary) of ``student.lm_head`` split over the
    processes with torch's ColwiseParallel; each rank's head returns its columns of the logits and
    the hidden states' gradient is all-reduced. Returns the process group for the parallel loss."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    if student.config.tie_embeddings:
        raise DistilError("loss.parallel 'vocab' shards the LM head but keeps the embedding whole: the student's "
                          "head is tied to its embedding (student.tie_embeddings: false, or an untied checkpoint)")
    mesh = init_device_mesh(device.type, (world_size,))
    parallelize_module(student, mesh, {"lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=True)})
    return mesh.get_group()


def clip_grad_norm(params: list, max_norm: float) -> float:
    """``clip_grad_norm_`` for parameters that may include DTensor shards (a sharded LM head):
    the squared norms of the shards are summed over their ranks. Returns the total norm."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    squared = torch.zeros((), dtype=torch.float64)
    for g in grads:
        part = g.detach().double().pow(2).sum()
        squared += (part.full_tensor() if isinstance(part, DTensor) else part).cpu()
    total = math.sqrt(squared.item())
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


def _unsharded_copy(student, device):
    """A plain copy of a model with sharded (DTensor) parameters; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True))
    copy = type(student)(student.config)
    copy.load_state_dict(state)
    return copy.to(device).train(student.training)


def _gather_full_state(student, optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts of an FSDP2 or TP model, on CPU; a collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(student, options=options), get_optimizer_state_dict(student, optimizer, options=options)


def _load_sharded(path, student, optimizer) -> dict:
    """Roll an FSDP2 or TP model and its optimizer back to a checkpoint, in place."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model_state, state = read_checkpoint(path)
    if student.config.tie_embeddings:
        model_state["lm_head.weight"] = model_state["embed_tokens.weight"]
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(student, model_state, options=options)
    set_optimizer_state_dict(student, optimizer, state.pop("optimizer"), options=options)
    return state
