"""Training: ``setup()`` resolves every choice once, then ``train()`` runs a short loop.

    result = train(cfg, run=RunDir.create("runs/debug"))
    result.student, result.history, result.val

loss = ce_weight * CE(labels) + kd_weight * KD(student, teacher), where KD is the configured
divergence (``loss.kind``). ``setup()`` turns the config into four objects:

* ``teacher``: a distil.teachers teacher (a model, a cache, an API, or none);
* ``batches``: a BatchSource (concat windows, stream packing with carried state, cache-fed);
* ``loss``: a DistillLoss, which chose fused / materialised / top-k / vocabulary- or
  sequence-parallel at construction and knows what to ask the teacher for;
* ``plan``: a ParallelPlan, which owns wrapping (DDP / FSDP2 / TP head), clipping, gathering and
  checkpoints.

The loop then reads top to bottom: step, guard, log, validate, checkpoint. Everything setup needs
can be passed in (teacher, tokenizer, data, student), which is how the demo trains several
students on one prepared dataset; otherwise it is built from the config.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distil.config import Config
from distil.data.dataset import TokenizedData, build_data, split_corpus
from distil.data.tokenize import has_tokenizer, load_tokenizer, tokenizer_hash, train_bpe_tokenizer
from distil.errors import DistilError
from distil.eval.multiple_choice import load_items, score_multiple_choice
from distil.eval.perplexity import evaluate_lm
from distil.fsutil import atomic_write_text
from distil.hybrid.progressive import freeze_all_but_ssm
from distil.losses.fused import default_chunk_size
from distil.losses.objective import DistillLoss
from distil.models.io import save_native
from distil.models.loading import load
from distil.models.transformer import ModelConfig, TransformerLM
from distil.run_dir import RunDir
from distil.runtime import adapt_threads, set_threads
from distil.spec import shared_vocab
from distil.teachers import CacheTeacher, Teacher, build_teacher, load_teacher
from distil.train.batches import BatchSource, build_batches
from distil.train.checkpoint import latest_checkpoint
from distil.train.distributed import DistInfo, all_reduce_mean, barrier, init_distributed
from distil.train.guard import SpikeGuard
from distil.train.plan import ParallelPlan
from distil.train.profile import StepProfile, current_rss, format_summary, no_phase, profile_json, state_floor
from distil.train.schedule import lr_multiplier

log = logging.getLogger("distil")
# Testing hook: DISTIL_KILL_AT_STEP=N makes a run SIGKILL itself once step N is logged and checkpointed.
KILL_AT_STEP = int(os.environ.get("DISTIL_KILL_AT_STEP") or 0) or None


@dataclass
class TrainResult:
    student: TransformerLM
    tokenizer: object
    history: list[dict] = field(default_factory=list)  # one record per optimizer step
    val: dict = field(default_factory=dict)  # the final validation metrics
    val_start: dict = field(default_factory=dict)  # validation before the first step (empty when resumed)
    tokens_per_second: float = 0.0
    seconds: float = 0.0


def student_model_config(cfg: Config, vocab_size: int, tokenizer=None) -> ModelConfig:
    s = cfg.student
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=s.d_model,
        n_layers=s.n_layers,
        n_heads=s.n_heads,
        n_kv_heads=s.n_kv_heads,
        head_dim=s.head_dim,
        intermediate_size=s.intermediate_size,
        rope_theta=s.rope_theta,
        max_seq_len=max(s.max_seq_len, cfg.data.seq_len),
        tie_embeddings=s.tie_embeddings,
        qkv_bias=s.qkv_bias,
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
    )


def check_vocabularies(tokenizer, student_vocab: int, teacher_vocab: int | None) -> None:
    """The tokenizer must fit both models; the models may differ only by padding rows."""
    if len(tokenizer) > student_vocab:
        raise DistilError(f"the tokenizer has {len(tokenizer)} tokens but the student's vocabulary has only {student_vocab}")
    if teacher_vocab is None:
        return
    if len(tokenizer) > teacher_vocab:
        raise DistilError(f"the tokenizer has {len(tokenizer)} tokens but the teacher's vocabulary has only {teacher_vocab}")
    shared_vocab(student_vocab, teacher_vocab)


def compute_loss(student, teacher: Teacher | None, batch: dict, loss: DistillLoss, *, head=None,
                 phase=no_phase) -> torch.Tensor:
    """The loss of one micro-batch. ``student`` may be wrapped (DDP); ``head`` is the plain model's
    LM head (default ``student.lm_head``). With stream packing (``batch["stream"]``) the student's
    and a stateful teacher's states are read from and written back to that dict, and labels of
    -100 (padding) count in neither term. ``phase`` marks the parts for ``--profile``."""
    stream = batch.get("stream")
    input_ids = batch["input_ids"]
    with phase("student"):
        if stream is not None:
            hidden, stream["student"] = student(input_ids, positions=batch.get("positions"), states=stream["student"],
                                                return_states=True, return_hidden=True)
        else:
            hidden = student(input_ids, doc_ids=batch.get("attn_doc_ids"), positions=batch.get("positions"),
                             return_hidden=True)  # [batch, seq, d_model]
    with phase("teacher"):
        signal = teacher.signal(batch, loss.request, stream) if loss.request is not None else None
    # Stream padding and rollouts' prompt / padding positions (labels -100) count in no term. A rollout
    # micro-batch's mean is rescaled by its share of the step's counted tokens, so k micro-batches of
    # B/k rows give the same gradient as one of B rows (batch["loss_scale"]).
    mask = batch["labels"] != -100 if stream is not None or "loss_scale" in batch else None
    with phase("loss"):
        value = loss(hidden, head if head is not None else student.lm_head, batch["labels"], signal, mask,
                     sample_logprobs=batch.get("sample_logprobs"))
    return value * batch["loss_scale"] if "loss_scale" in batch else value


def prepare(cfg: Config, run: RunDir | None = None, *, teacher=None, tokenizer=None, data=None, info=None,
            need_val: bool = True):
    """Load or build what the loop needs: (teacher, tokenizer, data)."""
    info = info or init_distributed(cfg.train.device)
    device = info.device
    if teacher is None and cfg.teacher.source == "model":
        teacher = load_teacher(cfg.teacher.path, dtype=cfg.teacher.dtype, device=device)
    docs = None
    cross = cfg.loss.cross_tokenizer.mode  # a teacher with another tokenizer: the data is in the student's
    if tokenizer is None:
        if cfg.data.tokenizer:
            tokenizer = load_tokenizer(cfg.data.tokenizer)
        elif cfg.teacher.source == "cache" and has_tokenizer(Path(cfg.teacher.cache) / "tokenizer"):
            tokenizer = load_tokenizer(Path(cfg.teacher.cache) / "tokenizer")
        elif cfg.teacher.source == "model" and cross == "off" and has_tokenizer(cfg.teacher.path):
            tokenizer = load_tokenizer(cfg.teacher.path)
        elif cfg.student.path and has_tokenizer(cfg.student.path):
            tokenizer = load_tokenizer(cfg.student.path)
        else:
            docs = split_corpus(cfg.data)
            log.info("training a %d-token byte-level BPE on the training documents", cfg.data.vocab_size)
            tokenizer = train_bpe_tokenizer(docs[0], cfg.data.vocab_size, run.path / "tokenizer" if run else None)
    if not cfg.teacher.allow_tokenizer_mismatch:
        if cross == "off" and cfg.teacher.source == "model" and cfg.teacher.path and has_tokenizer(cfg.teacher.path):
            check_same_tokenizer(tokenizer, load_tokenizer(cfg.teacher.path), f"the teacher's ({cfg.teacher.path})")
        if cfg.student.path and has_tokenizer(cfg.student.path):
            check_same_tokenizer(tokenizer, load_tokenizer(cfg.student.path), f"the student's ({cfg.student.path})")
    if data is None:
        data = build_data(cfg.data, tokenizer, docs=docs, need_val=need_val)
    return teacher, tokenizer, data


def check_same_tokenizer(tokenizer, other, whose: str) -> None:
    """The training tokenizer must be the one a model was trained with: same vocabulary (hash) and
    special tokens. Otherwise the model would read another tokenizer's ids, silently."""
    if tokenizer_hash(tokenizer) == tokenizer_hash(other) and tokenizer.all_special_tokens == other.all_special_tokens:
        return

    def describe(t):
        return f"{len(t)} tokens, hash {tokenizer_hash(t)[:8]}, specials {t.all_special_tokens}"

    raise DistilError(f"{whose} tokenizer ({describe(other)}) is not the data's ({describe(tokenizer)}); a model fed "
                      "another tokenizer's ids learns or teaches nonsense. Use its tokenizer (unset data.tokenizer), "
                      "distil across tokenizers with loss.cross_tokenizer.mode: hybrid (or uld), or set "
                      "teacher.allow_tokenizer_mismatch: true if you mean it")


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    # No weight decay on norms and biases (1-D parameters), as in nanoGPT and most LLM recipes.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                             foreach=False if not torch.cuda.is_available() else None)


@dataclass
class Setup:
    """Everything the loop needs, resolved once from the config."""

    cfg: Config
    info: DistInfo
    run: RunDir | None
    tokenizer: object
    data: TokenizedData
    student: TransformerLM  # the plain module (its LM head sharded under a tp plan)
    model: torch.nn.Module  # what the step calls: the student wrapped by the plan
    teacher: Teacher | None
    batches: BatchSource
    loss: DistillLoss
    plan: ParallelPlan
    optimizer: torch.optim.Optimizer
    guard: SpikeGuard
    step: int = 0
    tokens: int = 0
    history: list[dict] = field(default_factory=list)  # one record per optimizer step
    val_start: dict = field(default_factory=dict)
    val_teacher: Teacher | None = None  # scores KL to the teacher at validation (default: a logits teacher)
    profile: StepProfile | None = None  # --profile: time and peak memory per phase (train/profile.py)

    def phase(self, name: str):
        return self.profile.phase(name) if self.profile is not None else no_phase(name)

    def restore(self, path) -> dict:
        """Roll student, optimizer, data position and progress back to a checkpoint."""
        state = self.plan.restore(path, self.student, self.optimizer)
        self.batches.load_state_dict(state["batches"])
        self.step, self.tokens, self.history = state["step"], state["tokens"], state["history"]
        return state

    def checkpoint(self, step: int) -> None:
        if self.run is not None:
            self.plan.save(self.run, step, self.student, self.optimizer, keep=self.cfg.train.keep_checkpoints, extra={
                "step": step, "tokens": self.tokens, "batches": self.batches.state_dict(),
                "guard": self.guard.state_dict(), "history": self.history})

    def validate(self) -> dict:
        # The global batch size: every world size validates on the same windows.
        teacher = self.val_teacher
        if teacher is None and self.teacher is not None and "logits" in self.teacher.gives:
            teacher = self.teacher
        return evaluate_lm(self.plan.plain(self.student), self.data.val_windows, batch_size=self.cfg.train.batch_size,
                           max_batches=self.cfg.eval.val_batches, teacher=teacher, device=self.info.device)


def setup(cfg: Config, *, run: RunDir | None = None, teacher: Teacher | None = None, tokenizer=None,
          data: TokenizedData | None = None, student: TransformerLM | None = None, resume: bool = True,
          val_teacher: Teacher | None = None) -> Setup:
    """Teacher, batches, loss and parallel plan from the config (or passed in), the student and
    optimizer, and the latest checkpoint of ``run`` restored (unless ``resume=False``).
    ``val_teacher`` (one that gives logits) scores KL to the teacher at validation when the training
    teacher cannot (a cache, an API, or none for a CE-only run)."""
    info = init_distributed(cfg.train.device)
    set_threads(cfg.train.threads)
    plan = ParallelPlan(cfg, info)
    model_teacher, tokenizer, data = prepare(cfg, run, teacher=teacher, tokenizer=tokenizer, data=data, info=info)
    teacher = build_teacher(cfg, tokenizer, data, info.device, model_teacher=model_teacher)
    teacher_vocab = teacher.vocab_size if teacher is not None else None
    if teacher is not None and "groups" in teacher.gives:  # another tokenizer: its vocabulary is its own
        teacher_vocab = None
    torch.manual_seed(cfg.train.seed)
    if student is None:
        student = load(cfg.student.path) if cfg.student.path else TransformerLM(
            student_model_config(cfg, teacher_vocab or len(tokenizer), tokenizer))
    if student.config.logit_softcap is not None:
        raise DistilError("the student soft-caps its logits (final_logit_softcapping), which distil's losses, reading "
                          "its LM head directly, do not apply; train a student without it")
    if student.config.max_seq_len < cfg.data.seq_len:
        raise DistilError(f"data.seq_len = {cfg.data.seq_len} is longer than the student's max_seq_len "
                          f"({student.config.max_seq_len}, {cfg.student.path or 'the given student'})")
    if cfg.student.train_only_ssm:
        if not student.config.is_hybrid:
            raise DistilError("student.train_only_ssm is set but the student has no SSM layers")
        freeze_all_but_ssm(student)
    if isinstance(teacher, CacheTeacher):
        teacher.cache.check_against(tokenizer_hash=tokenizer_hash(tokenizer), vocab_size=student.config.vocab_size,
                                    temperature=cfg.loss.temperature)
    check_vocabularies(tokenizer, student.config.vocab_size, teacher_vocab)
    student.to(info.device).train()
    plan.shard(student, teacher_vocab)
    loss = DistillLoss.from_config(cfg.loss, teacher_gives=teacher.gives if teacher is not None else (),
                                   teacher_k=getattr(teacher, "k", None),
                                   tp_group=plan.tp_group, sequence_world=info.world_size if
                                   cfg.loss.parallel == "sequence" else 1, rollout=cfg.rollout)
    optimizer = build_optimizer(student, cfg)
    batches = build_batches(cfg, data, info, tokenizer, local_rows=plan.local_rows, teacher=teacher, student=student)
    guard = SpikeGuard(factor=cfg.train.spike_factor, patience=cfg.train.spike_patience, window=cfg.train.spike_window,
                       lr_factor=cfg.train.spike_lr_factor)
    if val_teacher is not None and "logits" not in val_teacher.gives:
        raise DistilError("val_teacher must give logits (a model teacher)")
    s = Setup(cfg, info, run, tokenizer, data, student, student, teacher, batches, loss, plan, optimizer, guard,
              val_teacher=val_teacher)
    latest = latest_checkpoint(run.checkpoints) if run is not None and resume else None
    if latest is not None:
        guard.load_state_dict(s.restore(latest)["guard"])
        if info.is_main:
            log.info("resuming from %s (step %d)", latest, s.step)
            run.truncate_metrics(s.step)
    s.model, s.optimizer = plan.wrap(student, optimizer, lambda m: build_optimizer(m, cfg))
    if info.is_main:
        log.info("loss: %s; parallel plan: %s", loss.describe(), plan.kind)
    return s


def train_step(s: Setup, lr: float) -> tuple[float, float]:
    """One optimizer step's forward and backward over ``train.grad_accum`` micro-batches; returns
    (the loss averaged over micro-batches and ranks, the gradient norm before clipping)."""
    cfg = s.cfg
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    step_loss = 0.0
    for _ in range(cfg.train.grad_accum):
        with s.phase("data"):
            batch = s.batches.next_batch()
        with torch.autocast(s.info.device.type, dtype=torch.bfloat16, enabled=cfg.train.dtype == "bfloat16"):
            loss = compute_loss(s.model, s.teacher, batch, s.loss, head=s.student.lm_head, phase=s.phase)
        with s.phase("backward"):
            (loss / cfg.train.grad_accum).backward()
        step_loss += loss.item() / cfg.train.grad_accum
    step_loss = all_reduce_mean(step_loss, s.info, s.info.device)
    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
    with s.phase("optimizer"):
        return step_loss, s.plan.clip([p for p in s.student.parameters() if p.requires_grad], clip)


def train(cfg: Config, *, run: RunDir | None = None, teacher: Teacher | None = None, tokenizer=None,
          data: TokenizedData | None = None, student: TransformerLM | None = None, desc: str = "train",
          resume: bool = True, val_teacher: Teacher | None = None) -> TrainResult:
    """Train ``student`` (built from the config when not given). With a run folder: metrics,
    checkpoints every ``train.checkpoint_every`` steps and at the end, and automatic resumption from
    the folder's latest checkpoint (``resume=False`` starts over). With ``train.profile``, time and
    peak memory per phase go to the log and to ``profile.json`` / ``profile.md`` in the run folder."""
    runtime_rss = current_rss()  # the process before this run's models are loaded: the floor's runtime part
    s = setup(cfg, run=run, teacher=teacher, tokenizer=tokenizer, data=data, student=student, resume=resume,
              val_teacher=val_teacher)
    if cfg.train.profile:
        s.profile = StepProfile(s.info.device)
    t, info, main = cfg.train, s.info, s.info.is_main
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_len
    val: dict = {}
    session_start, session_tokens = time.perf_counter(), 0
    if s.step == 0 and t.val_every and (main or s.plan.gathers):  # where the run starts, for the report
        with s.phase("validation"):
            s.val_start = _validate(s, {})
    bar = tqdm(total=t.steps, initial=s.step, desc=desc, disable=not (t.progress and main), dynamic_ncols=True)
    while s.step < t.steps:
        adapt_threads()  # fewer torch threads while other processes take cores (distil/runtime.py)
        lr = t.lr * s.guard.lr_scale * lr_multiplier(s.step, total_steps=t.steps, warmup_steps=t.warmup_steps,
                                                     schedule=t.schedule, min_ratio=t.min_lr_ratio,
                                                     decay_fraction=t.decay_fraction)
        step_loss, grad_norm = train_step(s, lr)
        action = s.guard.check(step_loss, grad_norm)
        if action == "rollback" and _roll_back(s, step_loss):
            bar.n = s.step
            continue
        if action == "skip":
            s.optimizer.zero_grad(set_to_none=True)  # a non-finite step changes nothing
            if main:
                log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s); skipped", s.step + 1,
                            step_loss, grad_norm)
                if run is not None:
                    run.log(step=s.step + 1, tokens=s.tokens, split="train", name="skipped_step", value=1.0)
        else:
            with s.phase("optimizer"):
                s.optimizer.step()
                s.optimizer.zero_grad(set_to_none=True)
        if s.profile is not None:
            s.profile.step_done()
        s.step += 1
        step_tokens = getattr(s.batches, "step_tokens", None) or tokens_per_step  # rollouts: the rows' real tokens
        s.tokens += step_tokens
        session_tokens += step_tokens
        elapsed = time.perf_counter() - session_start
        record = {"step": s.step, "tokens": s.tokens, "loss": step_loss, "lr": lr, "grad_norm": grad_norm}
        s.history.append(record)
        if run is not None and main and (s.step % t.log_every == 0 or s.step == 1 or s.step == t.steps):
            for name in ("loss", "lr", "grad_norm"):
                run.log(step=s.step, tokens=s.tokens, split="train", name=name, value=record[name])
            run.log(step=s.step, tokens=s.tokens, split="train", name="tokens_per_second", value=session_tokens / elapsed)
        if (t.val_every and s.step % t.val_every == 0) or s.step == t.steps:
            with s.phase("validation"):
                val = _validate(s, record) if main or s.plan.gathers else val
            barrier(info)
        if t.checkpoint_every and s.step % t.checkpoint_every == 0 and s.step != t.steps:
            with s.phase("checkpoint"):
                s.checkpoint(s.step)
        if s.step == KILL_AT_STEP:  # a test's fixed point for a SIGKILL (tests/test_engine.py)
            os.kill(os.getpid(), signal.SIGKILL)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{session_tokens / elapsed:,.0f}",
                        **({"val": f"{val['loss']:.3f}"} if val else {}))
        bar.update(1)
    bar.close()
    result = _finish(s, val, session_start, session_tokens)
    if s.profile is not None and main:
        _write_profile(s, runtime_rss)
    return result


def _write_profile(s: Setup, runtime_rss: int) -> None:
    cfg = s.cfg
    vocab = s.student.config.vocab_size
    chunk = cfg.loss.chunk_size or default_chunk_size(vocab, s.info.device)
    floor = state_floor(runtime_rss, getattr(s.teacher, "model", None), s.student, chunk, vocab)
    summary = s.profile.summary(floor)
    table = format_summary(summary)
    log.info("profile (time and peak memory per phase):\n%s", table)
    if s.run is not None:
        atomic_write_text(s.run.path / "profile.json", profile_json(summary))
        atomic_write_text(s.run.path / "profile.md", f"# Profile of {s.run.path.name}\n\n{table}\n")


def _roll_back(s: Setup, step_loss: float) -> bool:
    """A sustained spike: back to the latest checkpoint (the guard has lowered the LR scale).
    False when there is none to go back to (the step then stands)."""
    latest = latest_checkpoint(s.run.checkpoints) if s.run is not None else None
    if latest is None:
        return False
    s.optimizer.zero_grad(set_to_none=True)
    s.guard.rolled_back(s.restore(latest)["guard"])
    if s.info.is_main:
        log.warning("loss %.4g spiked for %d steps: rolled back to step %d, LR scale now %.3g", step_loss,
                    s.cfg.train.spike_patience, s.step, s.guard.lr_scale)
        s.run.truncate_metrics(s.step)
        s.run.log(step=s.step, tokens=s.tokens, split="train", name="rollback", value=s.guard.lr_scale)
    return True


def _validate(s: Setup, record: dict) -> dict:
    val = s.validate()
    if s.info.is_main:
        record.update({f"val_{k}": v for k, v in val.items() if k != "tokens"})
        if s.run is not None:
            for name, value in val.items():
                if name != "tokens":
                    s.run.log(step=s.step, tokens=s.tokens, split="val", name=name, value=value)
    return val


def _finish(s: Setup, val: dict, session_start: float, session_tokens: int) -> TrainResult:
    """Close the sources, score multiple choice, write the final checkpoint and model."""
    cfg, info, run = s.cfg, s.info, s.run
    s.batches.close()
    if s.teacher is not None:
        s.teacher.close()
    if not val and (info.is_main or s.plan.gathers):  # resumed at the last step: nothing trained now, still report
        val = s.validate()
    whole = s.plan.plain(s.student)  # under tp an unsharded copy: results, multiple choice, the final model
    if cfg.eval.multiple_choice and (info.is_main or s.plan.kind == "fsdp"):
        mc = score_multiple_choice(whole, s.tokenizer, load_items(cfg.eval.multiple_choice), device=info.device)
        val.update({"mc_acc": mc["acc"], "mc_acc_norm": mc["acc_norm"]})
        if run is not None and info.is_main:
            for name in ("mc_acc", "mc_acc_norm"):
                run.log(step=cfg.train.steps, tokens=s.tokens, split="val", name=name, value=val[name])
    seconds = time.perf_counter() - session_start
    result = TrainResult(student=whole, tokenizer=s.tokenizer, history=s.history, val=val, val_start=s.val_start,
                         tokens_per_second=session_tokens / seconds if seconds > 0 else 0.0, seconds=seconds)
    if run is not None:
        with s.phase("checkpoint"):
            s.checkpoint(cfg.train.steps)
        final_state = s.plan.full_state(s.student, s.optimizer)
        if info.is_main:
            save_native(whole, run.checkpoints / "final", tokenizer=s.tokenizer, state=final_state)
        barrier(info)
    return result
