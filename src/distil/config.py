"""Typed run configuration: one dataclass per concern, loaded from YAML with dotted overrides.

    cfg = load_config("configs/debug.yaml", overrides=["train.steps=20", "loss.kind=reverse_kl"])
    save_config(cfg, run_dir / "config.yaml")

Unknown keys and wrong types are rejected with the dotted path and the allowed keys; value checks
live in each dataclass's ``__post_init__`` and raise :class:`~distil.errors.DistilError`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from distil.errors import DistilError
from distil.spec import ALL_KINDS, KINDS, TAILS, TOPK_KINDS

log = logging.getLogger("distil")


def _choices(tp: Any) -> tuple | None:
    """The values of a ``Literal[...]`` annotation (None for any other type)."""
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


@functools.cache
def _literal_fields(cls: type) -> dict[str, tuple]:
    return {name: choices for name, tp in typing.get_type_hints(cls).items() if (choices := _choices(tp))}


def choices_of(section: type, name: str) -> tuple:
    """The allowed values of a config field (its ``Literal[...]``), e.g. for a CLI option's choices."""
    return _literal_fields(section)[name]


def default_of(section: type, name: str):
    return next(f.default for f in dataclasses.fields(section) if f.name == name)


def _check_literals(section) -> None:
    """Every ``Literal[...]`` field of a config section holds one of its values: the one check of
    every choice in the config, for sections built from YAML and in Python alike."""
    name_of_section = {"AlignConfig": "hybrid.align"}.get(type(section).__name__,
                                                           type(section).__name__.removesuffix("Config").lower())
    for name, choices in _literal_fields(type(section)).items():
        value = getattr(section, name)
        if value not in choices:
            raise DistilError(f"{name_of_section}.{name} = {value!r} is not one of {', '.join(map(str, choices))}")


def _check_positive(section: str, name: str, value: float | int | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise DistilError(f"{section}.{name} = {value!r} must be {bound}")


@dataclass
class TeacherConfig:
    """Where the teacher's signal comes from."""

    source: Literal["model", "cache", "api", "none"] = "model"
    path: str | None = None  # model: a transformers checkpoint dir (or hub id), or a distil checkpoint
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    cache: str | None = None  # cache: a folder written by `distil cache-teacher` or `distil import-logprobs`
    # api: the endpoint is the `api` section
    allow_tokenizer_mismatch: bool = False  # train although the teacher's (or student's) tokenizer is not the data's

    def __post_init__(self):
        _check_literals(self)
        if self.source == "model" and not self.path:
            raise DistilError(f"teacher.path is required when teacher.source is {self.source!r}")
        if self.source == "cache" and not self.cache:
            raise DistilError("teacher.cache (a cache folder) is required when teacher.source is 'cache'")


@dataclass
class ApiConfig:
    """An OpenAI-compatible endpoint as the teacher (``teacher.source: api``)."""

    base: str | None = None  # the base URL, e.g. http://localhost:8000/v1
    model: str | None = None  # the served model's name
    key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (unset: no key sent)
    topk: int = 20  # top_logprobs asked for at each position (loss.topk, when set, takes precedence)
    concurrency: int = 8  # requests in flight at once
    retries: int = 5  # retries of a failed request (429, 5xx, timeouts), with exponential backoff
    timeout: float = 120.0  # seconds per request
    cache: str | None = "~/.cache/distil/api"  # answers kept on disk and reused (null: off)

    def __post_init__(self):
        for name in ("topk", "concurrency", "timeout"):
            _check_positive("api", name, getattr(self, name))
        _check_positive("api", "retries", self.retries, allow_zero=True)


@dataclass
class StudentConfig:
    """The student's architecture, or a checkpoint to start from."""

    path: str | None = None  # start from this checkpoint (e.g. a `distil hybridize` output) instead of a fresh model
    train_only_ssm: bool = False  # with a hybrid student: freeze everything but the SSM mixers
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    head_dim: int | None = None  # None: d_model // n_heads
    intermediate_size: int | None = None  # None: the SwiGLU size 8/3 * d_model, rounded up to 64
    tie_embeddings: bool = True
    qkv_bias: bool = False
    rope_theta: float = 10000.0
    max_seq_len: int = 2048

    def __post_init__(self):
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "intermediate_size", "max_seq_len"):
            _check_positive("student", name, getattr(self, name))
        if self.head_dim is None and self.d_model % self.n_heads:
            raise DistilError(f"student.d_model = {self.d_model} is not divisible by student.n_heads = {self.n_heads}")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise DistilError(f"student.n_heads = {self.n_heads} is not a multiple of student.n_kv_heads = {kv}")


@dataclass
class DataConfig:
    """The training text, its tokenizer and how it is cut into sequences."""

    source: Literal["embedded", "text", "jsonl", "parquet", "hf"] = "embedded"  # embedded: Python's own docs
    path: str | None = None  # file or folder (text, jsonl, parquet), or a dataset dir / hub id (hf)
    text_field: str = "text"  # the field (JSONL, Parquet, dataset column) holding each document
    split: str = "train"  # hf: the dataset split to read
    tokenizer: str | None = None  # a tokenizer dir or hub id; None: the teacher's, else a BPE trained here
    vocab_size: int = 4096  # size of the BPE trained when there is no tokenizer
    seq_len: int = 256  # window length (concat) or chunk length (stream)
    packing: Literal["concat", "stream"] = "concat"
    document_attention: bool = False  # concat: attention does not cross document boundaries
    stream_kv_window: int | None = 4096  # stream: attention keys carried across chunks (null: the whole document)
    val_fraction: float = 0.05  # share of documents held out for validation
    max_docs: int | None = None
    seed: int = 0
    token_cache: str | None = "~/.cache/distil/tokens"  # memory-mapped token files, reused across runs (null: off)
    num_workers: int = 0  # DataLoader worker processes reading a teacher cache (teacher.source: cache)

    def __post_init__(self):
        _check_literals(self)
        if self.source != "embedded" and not self.path:
            raise DistilError(f"data.path is required when data.source is {self.source!r}")
        _check_positive("data", "seq_len", self.seq_len)
        _check_positive("data", "stream_kv_window", self.stream_kv_window)
        _check_positive("data", "vocab_size", self.vocab_size)
        _check_positive("data", "max_docs", self.max_docs)
        _check_positive("data", "num_workers", self.num_workers, allow_zero=True)
        if not 0.0 < self.val_fraction < 1.0:
            raise DistilError(f"data.val_fraction = {self.val_fraction!r} must lie strictly between 0 and 1")


@dataclass
class CrossTokenizerConfig:
    """A teacher with another tokenizer (docs/cross-tokenizer.md): the text is re-tokenised for the
    teacher, aligned by bytes, and the two sides compared group by group."""

    mode: Literal["off", "uld", "hybrid"] = "off"  # uld: sorted L1 only; hybrid: loss.kind on matched entries + sorted L1
    merge: Literal["first", "last"] = "first"  # which position scores a multi-token group
    matched_weight: float | None = None  # hybrid: the matched part's weight (null: share of the teacher's vocabulary matched)
    teacher_tokenizer: str | None = None  # the teacher's tokenizer (null: the one in teacher.path)

    def __post_init__(self):
        _check_literals(self)
        if self.matched_weight is not None and not 0.0 <= self.matched_weight <= 1.0:
            raise DistilError(f"loss.cross_tokenizer.matched_weight = {self.matched_weight!r} must lie in [0, 1]")


@dataclass
class LossConfig:
    """loss = ce_weight * CE(labels) + kd_weight * KD(student, teacher)."""

    kind: Literal[ALL_KINDS] = "forward_kl"  # see distil.losses.kd_loss (top-k: TOPK_KINDS)
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    t2_scale: bool = False  # multiply the KD term by T^2 (Hinton et al. 2015)
    beta: float = 0.5  # jsd only
    skew: float = 0.1  # skew_* only
    fused: bool = True  # fuse the LM head with the loss, chunked over tokens
    chunk_size: int | None = None  # tokens per chunk of the fused loss (None: from the vocabulary)
    topk: int | None = None  # train on the teacher's top-k only (as a cache would hold)
    tail: Literal[TAILS] = "bucket"  # top-k only
    parallel: Literal["none", "vocab", "sequence"] = "none"
    # On-policy distillation (docs/on-policy.md; needs rollout.prompts): off (train on given text),
    # gkd (student samples with probability rollout.lmbda, the divergence above on them),
    # on_policy_rkl (per-token reverse KL on student samples), minillm (MiniLLM's policy gradient).
    policy: Literal["off", "gkd", "on_policy_rkl", "minillm"] = "off"
    cross_tokenizer: CrossTokenizerConfig = field(default_factory=CrossTokenizerConfig)

    def __post_init__(self):
        _check_literals(self)
        # soft_ce needs top-k log-probs (loss.topk, or a cache / API teacher: checked in Config)
        if self.topk and self.kind not in TOPK_KINDS:
            raise DistilError(f"loss.kind = {self.kind!r} is not one of {', '.join(TOPK_KINDS)} (with loss.topk)")
        _check_positive("loss", "kd_weight", self.kd_weight, allow_zero=True)
        _check_positive("loss", "ce_weight", self.ce_weight, allow_zero=True)
        _check_positive("loss", "temperature", self.temperature)
        _check_positive("loss", "chunk_size", self.chunk_size)
        _check_positive("loss", "topk", self.topk)
        if self.kind == "jsd" and not 0.0 < self.beta < 1.0:
            raise DistilError(
                f"loss.beta = {self.beta!r} must lie strictly in (0, 1); "
                "use kind forward_kl for beta=1 or reverse_kl for beta=0"
            )
        if not 0.0 <= self.skew < 1.0:
            raise DistilError(f"loss.skew = {self.skew!r} must lie in [0, 1)")
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise DistilError("loss.kd_weight and loss.ce_weight are both 0: nothing to train on")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = 200
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 20
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying at the end
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: autocast
    log_every: int = 10
    val_every: int = 50  # 0 disables periodic validation
    progress: bool = True
    threads: int | None = None  # torch threads, fixed (null: $DISTIL_NUM_THREADS, else follow the load)
    profile: bool = False  # time and peak memory per phase, and the memory floor (distil train --profile)
    checkpoint_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun
    compile: bool = False  # torch.compile the student (CUDA only; the CPU runs the eager reference)
    activation_checkpointing: bool = False
    spike_factor: float = 0.0  # spike guard: roll back when loss > factor x running median (0: off)
    spike_patience: int = 3  # ... for this many consecutive steps
    spike_window: int = 50  # steps in the running median
    spike_lr_factor: float = 0.5  # LR multiplier after each rollback

    def __post_init__(self):
        _check_literals(self)
        for name in ("steps", "batch_size", "grad_accum", "lr", "log_every", "spike_patience", "spike_window",
                     "threads"):
            _check_positive("train", name, getattr(self, name))
        for name in ("warmup_steps", "weight_decay", "grad_clip", "val_every", "checkpoint_every", "spike_factor",
                     "keep_checkpoints"):
            _check_positive("train", name, getattr(self, name), allow_zero=True)
        if not 0.0 < self.spike_lr_factor <= 1.0:
            raise DistilError(f"train.spike_lr_factor = {self.spike_lr_factor!r} must lie in (0, 1]")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise DistilError(f"train.min_lr_ratio = {self.min_lr_ratio!r} must lie in [0, 1]")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise DistilError(f"train.decay_fraction = {self.decay_fraction!r} must lie in (0, 1]")


@dataclass
class RolloutConfig:
    """Prompts and sampling for on-policy distillation (loss.policy); docs/on-policy.md."""

    prompts: str | None = None  # a JSONL of {prompt[, completion]} or {messages}; or corpus:topics, corpus:passages
    prompt_tokens: int = 32  # corpus:passages: tokens of each passage's start
    max_prompt_tokens: int = 256  # longer prompts keep their last tokens
    completion_tokens: int = 128  # corpus sources: tokens of the dataset completion kept
    max_new_tokens: int = 64
    temperature: float = 1.0  # on_policy_rkl / minillm are unbiased at 1 (and top_p 1)
    top_p: float = 1.0
    num_generations: int = 1  # samples per prompt (train.batch_size * grad_accum rows a step must divide by it)
    lmbda: float = 1.0  # gkd: probability that a step trains on student samples
    seq_kd: bool = False  # gkd: the other steps train on teacher samples instead of the dataset's completions
    mix_alpha: float = 0.2  # minillm: teacher-mixed sampling, p = alpha * teacher + (1 - alpha) * student
    exact: bool = False  # on_policy_rkl: the full-vocabulary reverse KL at each sampled position
    max_weight: float = 5.0  # minillm: importance weights q / p_mix are clipped at this
    limit: int | None = None  # use only the first N prompts

    def __post_init__(self):
        _check_literals(self)
        for name in ("prompt_tokens", "max_prompt_tokens", "completion_tokens", "max_new_tokens", "num_generations",
                     "temperature", "max_weight", "limit"):
            _check_positive("rollout", name, getattr(self, name))
        for name in ("top_p", "lmbda", "mix_alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DistilError(f"rollout.{name} = {getattr(self, name)!r} must lie in [0, 1]")
        if self.top_p == 0:
            raise DistilError("rollout.top_p = 0 keeps no token; use a value in (0, 1]")


@dataclass
class EvalConfig:
    """Held-out evaluation during and after training."""

    val_batches: int = 8  # batches of validation sequences per evaluation
    multiple_choice: str | None = None  # a JSONL of multiple-choice items to score at the end

    def __post_init__(self):
        _check_positive("eval", "val_batches", self.val_batches)


@dataclass
class AlignConfig:
    """Stage 2 of a conversion (distil.hybrid.align): before each stage's KD steps, every newly
    converted layer's mixer is trained alone to reproduce the attention output it replaces."""

    steps: int = 0  # optimizer steps per new layer; 0: no alignment
    lr: float = 1e-3
    loss: Literal["mse", "nmse", "cosine"] = "nmse"  # nmse: MSE / the target's mean square
    batch_size: int = 4  # recorded windows per step
    samples: int = 32  # training windows the original model runs over once, to record the targets
    checkpoint_every: int = 50  # steps between saved alignment states (a killed run resumes exactly)

    def __post_init__(self):
        _check_literals(self)
        _check_positive("hybrid.align", "steps", self.steps, allow_zero=True)
        for name in ("lr", "batch_size", "samples"):
            _check_positive("hybrid.align", name, getattr(self, name))
        _check_positive("hybrid.align", "checkpoint_every", self.checkpoint_every, allow_zero=True)


@dataclass
class HybridConfig:
    """Convert a model into an attention / SSM hybrid while training, in stages (docs/models.md).

    With ``stages`` set, ``distil train`` takes ``student.path`` (else the teacher's checkpoint),
    turns ``stages[0]`` of its attention layers into SSM layers, distils for ``train.steps`` steps,
    then goes on to ``stages[1]`` layers from that trained model, and so on. One stage is one-shot
    conversion. The ``student`` architecture keys are then unused.
    """

    stages: list[int] = field(default_factory=list)  # SSM layers after each stage, e.g. [1, 5, 25, 45]; []: off
    placement: Literal["uniform", "importance", "first", "last"] = "uniform"
    layers: list[int] | None = None  # an explicit layer list instead (one stage of that many layers)
    # importance score: local (the MIL SSM's output error against the attention's, one model pass) |
    # mil (end-to-end KL with the layer as its MIL SSM) | leave_one_out (KL with the layer removed)
    score: Literal["local", "mil", "leave_one_out"] = "local"
    score_samples: int = 16  # held-out windows the layers are scored on (and training windows MIL calibrates on)
    mixer: Literal["mamba2", "discrete_mamba2"] = "mamba2"
    init: Literal["mil", "mil_plain", "random"] = "mil"  # mil: calibrated, from the attention weights
    d_state: int = 16
    expand: float | None = None  # d_inner / d_model; None: n_heads * head_dim / d_model
    width: Literal["heads", "kv"] = "heads"  # kv: one SSM head per KV head, the size-matched layout (mamba2)
    chunk_size: int = 128  # SSD scan chunk
    align: AlignConfig = field(default_factory=AlignConfig)  # stage 2: layer alignment before each stage's KD

    def __post_init__(self):
        _check_literals(self)
        if self.layers is not None:
            if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
                raise DistilError(f"hybrid.layers = {self.layers!r} should list distinct layer indices >= 0")
            if self.stages and self.stages != [len(self.layers)]:
                raise DistilError("hybrid.layers fixes one stage; leave hybrid.stages empty or set it to "
                                  f"[{len(self.layers)}]")
            self.stages = [len(self.layers)]
        if any(n <= 0 for n in self.stages) or any(b <= a for a, b in zip(self.stages, self.stages[1:])):
            raise DistilError(f"hybrid.stages = {self.stages!r} should be increasing positive numbers of SSM layers")
        for name in ("score_samples", "d_state", "expand", "chunk_size"):
            _check_positive("hybrid", name, getattr(self, name))


@dataclass
class OutputConfig:
    """Where the run folder goes."""

    run_dir: str = "runs"
    name: str | None = None  # None: the config file's name
    overwrite: bool = False  # replace an existing run folder of the same name
    tensorboard: bool = False  # also log metrics to <run>/tensorboard (needs distil[tb])
    wandb_project: str | None = None  # also log metrics to this Weights & Biases project (needs wandb)


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self):
        self._check_policy()
        self._check_cross_tokenizer()
        if self.teacher.source == "api" and not (self.api.base and self.api.model):
            raise DistilError("api.base and api.model are required when teacher.source is 'api'")
        if self.teacher.source == "none" and self.loss.kd_weight > 0:
            raise DistilError("teacher.source is 'none' but loss.kd_weight > 0: set loss.kd_weight=0 or give a teacher")
        if self.loss.topk and self.loss.kind == "mse":
            raise DistilError("loss.kind 'mse' needs full teacher logits; it cannot be used with loss.topk")
        if self.loss.kind == "soft_ce" and not self.loss.topk and self.teacher.source not in ("cache", "api"):
            raise DistilError("loss.kind 'soft_ce' needs top-k teacher log-probs: set loss.topk, or use "
                              "teacher.source cache or api")
        if self.teacher.source in ("cache", "api"):
            if self.loss.kd_weight and self.loss.kind not in TOPK_KINDS:
                raise DistilError(f"teacher.source {self.teacher.source!r} gives top-k log-probs: loss.kind must be one "
                                  f"of {', '.join(TOPK_KINDS)}, not {self.loss.kind!r}")
            if self.data.packing == "stream":
                raise DistilError(f"teacher.source {self.teacher.source!r} is aligned to concat windows; it cannot be "
                                  "used with data.packing 'stream'")
            if self.loss.parallel == "vocab":
                raise DistilError(f"loss.parallel 'vocab' is not available with teacher.source {self.teacher.source!r}")
        if self.loss.parallel == "vocab":
            if self.data.packing == "stream":
                raise DistilError("loss.parallel 'vocab' gives every process the same batch; data.packing 'stream' "
                                  "splits documents over processes: use concat packing")
            if self.student.tie_embeddings and not self.student.path:
                raise DistilError("loss.parallel 'vocab' shards the LM head over the processes but keeps the "
                                  "embedding whole: set student.tie_embeddings: false")
        if self.hybrid.stages:
            if not self.student.path and self.teacher.source != "model":
                raise DistilError("hybrid.stages converts student.path or the teacher's checkpoint: set student.path, "
                                  "or use teacher.source 'model'")
            if self.loss.parallel == "vocab":
                raise DistilError("hybrid.stages cannot be combined with loss.parallel 'vocab' yet")
        if self.teacher.source == "api" and self.loss.temperature != 1.0:
            raise DistilError("an API teacher gives log-probs at temperature 1; set loss.temperature = 1")

    def _check_cross_tokenizer(self) -> None:
        cross = self.loss.cross_tokenizer
        if cross.mode == "off":
            return
        if self.teacher.source == "none":
            raise DistilError("loss.cross_tokenizer needs a teacher (teacher.source 'model', 'cache' or 'api')")
        if self.teacher.source == "api" and not cross.teacher_tokenizer:
            raise DistilError("loss.cross_tokenizer with an API teacher needs the teacher's tokenizer: set "
                              "loss.cross_tokenizer.teacher_tokenizer (a folder or hub id of the served model's tokenizer)")
        if self.loss.kd_weight == 0:
            raise DistilError("loss.cross_tokenizer is set but loss.kd_weight is 0: nothing is distilled")
        if self.loss.topk or self.loss.kind not in KINDS or self.loss.kind == "mse":
            raise DistilError("loss.cross_tokenizer compares full distributions: unset loss.topk and use a loss.kind "
                              "among forward_kl, reverse_kl, jsd, skew_*, tvd")
        if self.data.packing == "stream" or self.data.document_attention or self.loss.parallel != "none" \
                or self.hybrid.stages:
            raise DistilError("loss.cross_tokenizer works with concat packing without document_attention, no "
                              "loss.parallel and no hybrid.stages")
        if self.loss.policy == "minillm" or self.rollout.seq_kd or (self.loss.policy == "on_policy_rkl"
                                                                   and self.rollout.exact):
            raise DistilError("loss.cross_tokenizer on-policy: use loss.policy gkd or on_policy_rkl (sampled, without "
                              "rollout.exact), without rollout.seq_kd; minillm's teacher-mixed sampling and the exact "
                              "and seq_kd forms need the teacher's distribution over the student's tokens")

    def _check_policy(self) -> None:
        policy, rollout = self.loss.policy, self.rollout
        if rollout.prompts and self.teacher.source == "cache":
            raise DistilError("rollout.prompts: a cache holds the teacher's answers on fixed windows, not on completions "
                              "made during training; use teacher.source 'model' or 'api'")
        if policy == "off":
            return
        if not rollout.prompts:
            raise DistilError(f"loss.policy {policy!r} needs prompts: set rollout.prompts (a JSONL, corpus:topics or "
                              "corpus:passages)")
        if self.teacher.source not in ("model", "api"):
            raise DistilError(f"loss.policy {policy!r} has the teacher grade the student's samples as they are "
                              f"written: teacher.source must be 'model' or 'api', not {self.teacher.source!r}")
        if self.teacher.source == "api":
            # A server gives top-k log-probs and the sampled tokens' own: no logits, no sampling from it.
            if policy == "minillm" or rollout.seq_kd or (policy == "on_policy_rkl" and rollout.exact):
                raise DistilError("with teacher.source 'api' use loss.policy gkd (forward KL on top-k + tail) or "
                                  "on_policy_rkl (the sampled tokens' log-probs); minillm, rollout.seq_kd and "
                                  "rollout.exact need a model teacher")
            if policy == "gkd" and self.loss.kind == "reverse_kl":
                raise DistilError("reverse KL on a server's top-k is unstable (the student escapes the set): use "
                                  "loss.policy on_policy_rkl, which needs only the sampled tokens' log-probs")
        if self.loss.kd_weight == 0:
            raise DistilError(f"loss.policy {policy!r} distils from the teacher: loss.kd_weight must be > 0")
        if self.data.packing == "stream" or self.loss.parallel != "none" or self.hybrid.stages:
            raise DistilError(f"loss.policy {policy!r} works with concat packing, no loss.parallel and no hybrid.stages")
        if policy != "gkd" and self.loss.ce_weight:
            raise DistilError(f"loss.policy {policy!r}: loss.ce_weight has no labels to use on student samples; set 0")
        if policy in ("on_policy_rkl", "minillm") and self.loss.temperature != 1.0:
            raise DistilError(f"loss.policy {policy!r} grades samples at temperature 1; set loss.temperature = 1")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow int -> float. Raise with the dotted path."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except DistilError as e:
                errors.append(e)
        raise DistilError(f"{path} = {value!r} should be {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise DistilError(f"{path} = {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise DistilError(f"{path} = {value!r} should be a list")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `1e-3` (no dot) as a string; take it as the float the user meant.
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise DistilError(f"{path} = {value!r} should be a finite number")
    if tp is bool and not isinstance(value, bool):
        raise DistilError(f"{path} = {value!r} should be true or false")
    if tp in (int, float) and isinstance(value, bool):
        raise DistilError(f"{path} = {value!r} should be {tp.__name__}")
    if tp in (int, float, str) and not isinstance(value, tp):
        raise DistilError(f"{path} = {value!r} should be {tp.__name__}")
    return value


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DistilError(f"{path or 'config'} should be a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else key
        if key not in fields:
            raise DistilError(f"unknown config key {dotted!r}; allowed keys: {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted)
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - dataclass signature errors are internal
        raise DistilError(f"{path or 'config'}: {e}") from e


def _apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise DistilError(f"--set {override!r} should look like section.key=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    if len(keys) not in (2, 3) or not all(keys):
        raise DistilError(f"--set {override!r}: the key should be section.key, e.g. train.steps=100 "
                          "(or section.sub.key, e.g. hybrid.align.steps=100)")
    section = keys[0]
    sections = {f.name for f in dataclasses.fields(Config)}
    if section not in sections:
        raise DistilError(f"unknown config section {section!r} in --set {override!r}; allowed: {', '.join(sections)}")
    # YAML parses the value, so `3` is an int, `1e-3` a float, `true` a bool and `null` None.
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise DistilError(f"--set {override!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    target = data
    for key in keys[:-1]:
        if not isinstance(target.get(key), dict):
            target[key] = {}
        else:
            target[key] = dict(target[key])
        target = target[key]
    target[keys[-1]] = value


def config_from_dict(data: dict | None, overrides: list[str] | None = None) -> Config:
    data = dict(data or {})
    for section, value in list(data.items()):
        if isinstance(value, dict):
            data[section] = dict(value)
    for override in overrides or []:
        _apply_override(data, override)
    _move_old_api_keys(data)
    return _build(Config, data, "")


def _move_old_api_keys(data: dict) -> None:
    """``teacher.api_base`` and the other flat ``teacher.api_*`` keys of earlier versions: moved to
    the ``api`` section (``api.base`` ...), with a warning."""
    teacher = data.get("teacher")
    if not isinstance(teacher, dict):
        return
    for key in [k for k in teacher if isinstance(k, str) and k.startswith("api_")]:
        new = key.removeprefix("api_")
        if not isinstance(data.get("api"), dict):
            data["api"] = {}
        api = data["api"]
        if new in api:
            raise DistilError(f"teacher.{key} and api.{new} are both set; keep api.{new}")
        api[new] = teacher.pop(key)
        log.warning("teacher.%s is now api.%s; the old key still works but will go", key, new)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply ``--set`` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DistilError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise DistilError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
        except yaml.YAMLError as e:
            raise DistilError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from e
        if not isinstance(data, dict):
            raise DistilError(f"config file {path} should hold a mapping of sections")
    cfg = config_from_dict(data, overrides)
    if cfg.output.name is None and path is not None:
        cfg.output.name = Path(path).stem
    return cfg


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
