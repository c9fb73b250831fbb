"""The training loop: one explicit loop that reads top to bottom.

    result = train(cfg, run=RunDir.create("runs/debug"))
    result.student, result.history, result.val

loss = ce_weight * CE(labels) + kd_weight * KD(student, teacher), where KD is the configured
divergence (``loss.kind``). By default the student's LM head is fused with the loss
(:func:`~distil.losses.fused_linear_kd_loss`), so the [tokens x vocab] logits of student and
teacher are never held whole. With ``loss.topk`` the student learns from the teacher's top-k
log-probs only, exactly as it would from a cache.

Everything the loop needs can be passed in (teacher, tokenizer, data, student), which is how the
demo trains several students on one prepared dataset; otherwise it is built from the config.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from distil.config import Config
from distil.data.dataset import TokenizedData, build_data, split_corpus
from distil.data.packing import WindowSampler, batch_tensors
from distil.data.tokenize import has_tokenizer, load_tokenizer, train_bpe_tokenizer
from distil.errors import DistilError
from distil.eval.perplexity import evaluate_lm
from distil.losses import cross_entropy, fused_linear_kd_loss, kd_loss, topk_kd_loss
from distil.losses.divergences import shared_vocab
from distil.models.transformer import ModelConfig, TransformerLM
from distil.train.run_dir import RunDir
from distil.train.schedule import lr_multiplier
from distil.train.teacher import Teacher, load_teacher

log = logging.getLogger("distil")


@dataclass
class TrainResult:
    student: TransformerLM
    tokenizer: object
    history: list[dict] = field(default_factory=list)  # one record per optimizer step
    val: dict = field(default_factory=dict)  # the final validation metrics
    tokens_per_second: float = 0.0
    seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DistilError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


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


def compute_loss(student, teacher: Teacher | None, batch: dict, loss_cfg) -> torch.Tensor:
    """ce_weight * CE + kd_weight * KD for one micro-batch (T^2-scaled when configured)."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    doc_ids = batch.get("attn_doc_ids")
    hidden = student(input_ids, doc_ids=doc_ids, return_hidden=True)  # [batch, seq, d_model]
    kd_weight = loss_cfg.kd_weight * (loss_cfg.temperature**2 if loss_cfg.t2_scale else 1.0)
    if teacher is None or kd_weight == 0:
        if loss_cfg.fused:
            return fused_linear_kd_loss(hidden, student.lm_head.weight, labels=labels, ce_weight=loss_cfg.ce_weight,
                                        kd_weight=0.0, chunk_size=loss_cfg.chunk_size)
        return loss_cfg.ce_weight * cross_entropy(student.lm_head(hidden), labels)
    common = dict(kind=loss_cfg.kind, temperature=loss_cfg.temperature)
    if loss_cfg.topk:
        # The teacher as a top-k cache would hold it: log-probs at the loss temperature.
        teacher_logits = teacher.logits(input_ids, doc_ids).float()
        logprobs, ids = torch.log_softmax(teacher_logits / loss_cfg.temperature, dim=-1).topk(loss_cfg.topk, dim=-1)
        if loss_cfg.fused:
            return fused_linear_kd_loss(hidden, student.lm_head.weight, teacher_topk=(ids, logprobs), labels=labels,
                                        ce_weight=loss_cfg.ce_weight, kd_weight=kd_weight, tail=loss_cfg.tail,
                                        chunk_size=loss_cfg.chunk_size, **common)
        logits = student.lm_head(hidden)
        loss = kd_weight * topk_kd_loss(logits, ids, logprobs, tail=loss_cfg.tail, **common)
    else:
        head = teacher.head_inputs(input_ids, doc_ids) if loss_cfg.fused else None
        if head is not None:
            teacher_hidden, teacher_weight, teacher_bias = head
            return fused_linear_kd_loss(hidden, student.lm_head.weight, teacher_hidden, teacher_weight,
                                        teacher_bias=teacher_bias, labels=labels, ce_weight=loss_cfg.ce_weight,
                                        kd_weight=kd_weight, chunk_size=loss_cfg.chunk_size, beta=loss_cfg.beta,
                                        skew=loss_cfg.skew, **common)
        logits = student.lm_head(hidden)
        teacher_logits = teacher.logits(input_ids, doc_ids)
        loss = kd_weight * kd_loss(logits, teacher_logits, beta=loss_cfg.beta, skew=loss_cfg.skew, **common)
    if loss_cfg.ce_weight:
        loss = loss + loss_cfg.ce_weight * cross_entropy(logits, labels)
    return loss


def prepare(cfg: Config, run: RunDir | None = None, *, teacher=None, tokenizer=None, data=None):
    """Load or build what the loop needs: (teacher, tokenizer, data)."""
    device = resolve_device(cfg.train.device)
    if teacher is None and cfg.teacher.source == "model":
        teacher = load_teacher(cfg.teacher.path, dtype=cfg.teacher.dtype, device=device)
    docs = None
    if tokenizer is None:
        if cfg.data.tokenizer:
            tokenizer = load_tokenizer(cfg.data.tokenizer)
        elif cfg.teacher.source == "model" and has_tokenizer(cfg.teacher.path):
            tokenizer = load_tokenizer(cfg.teacher.path)
        elif cfg.student.path and has_tokenizer(cfg.student.path):
            tokenizer = load_tokenizer(cfg.student.path)
        else:
            docs = split_corpus(cfg.data)
            log.info("training a %d-token byte-level BPE on the training documents", cfg.data.vocab_size)
            tokenizer = train_bpe_tokenizer(docs[0], cfg.data.vocab_size, run.path / "tokenizer" if run else None)
    if data is None:
        data = build_data(cfg.data, tokenizer, docs=docs)
    return teacher, tokenizer, data


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    # No weight decay on norms and biases (1-D parameters), as in nanoGPT and most LLM recipes.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                             foreach=False if not torch.cuda.is_available() else None)


def train(
    cfg: Config,
    *,
    run: RunDir | None = None,
    teacher: Teacher | None = None,
    tokenizer=None,
    data: TokenizedData | None = None,
    student: TransformerLM | None = None,
    desc: str = "train",
) -> TrainResult:
    device = resolve_device(cfg.train.device)
    teacher, tokenizer, data = prepare(cfg, run, teacher=teacher, tokenizer=tokenizer, data=data)
    if cfg.loss.kd_weight == 0:
        teacher = None
    teacher_vocab = teacher.vocab_size if teacher is not None else None
    torch.manual_seed(cfg.train.seed)
    if student is None:
        if cfg.student.path:
            from distil.models import load

            student = load(cfg.student.path)
        else:
            student = TransformerLM(student_model_config(cfg, teacher_vocab or len(tokenizer), tokenizer))
    if cfg.student.train_only_ssm:
        if not student.config.is_hybrid:
            raise DistilError("student.train_only_ssm is set but the student has no SSM layers")
        from distil.hybrid.progressive import freeze_all_but_ssm

        freeze_all_but_ssm(student)
    check_vocabularies(tokenizer, student.config.vocab_size, teacher_vocab)
    student.to(device).train()
    if teacher is not None:
        teacher.to(device)

    optimizer = build_optimizer(student, cfg)
    sampler = WindowSampler(len(data.train_windows), cfg.train.batch_size, seed=cfg.train.seed)
    use_bf16 = cfg.train.dtype == "bfloat16"
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    params = [p for p in student.parameters() if p.requires_grad]
    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf

    def validate() -> dict:
        return evaluate_lm(student, data.val_windows, batch_size=cfg.train.batch_size, max_batches=cfg.eval.val_batches,
                           teacher=teacher, device=device)

    history: list[dict] = []
    val: dict = {}
    tokens_seen = 0
    start_time = time.perf_counter()
    bar = tqdm(total=cfg.train.steps, desc=desc, disable=not cfg.train.progress, dynamic_ncols=True)
    for step in range(cfg.train.steps):
        lr = cfg.train.lr * lr_multiplier(step, total_steps=cfg.train.steps, warmup_steps=cfg.train.warmup_steps,
                                          schedule=cfg.train.schedule, min_ratio=cfg.train.min_lr_ratio,
                                          decay_fraction=cfg.train.decay_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for _ in range(cfg.train.grad_accum):
            batch = batch_tensors(data.train_windows, data.train_doc_ids, sampler.next_batch(), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = compute_loss(student, teacher, batch, cfg.loss)
            (loss / cfg.train.grad_accum).backward()
            step_loss += loss.item() / cfg.train.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_step
        elapsed = time.perf_counter() - start_time
        record = {"step": step + 1, "tokens": tokens_seen, "loss": step_loss, "lr": lr, "grad_norm": grad_norm}
        history.append(record)
        if run is not None and ((step + 1) % cfg.train.log_every == 0 or step == 0 or step + 1 == cfg.train.steps):
            for name in ("loss", "lr", "grad_norm"):
                run.log(step=step + 1, tokens=tokens_seen, split="train", name=name, value=record[name])
            run.log(step=step + 1, tokens=tokens_seen, split="train", name="tokens_per_second", value=tokens_seen / elapsed)
        is_last = step + 1 == cfg.train.steps
        if (cfg.train.val_every and (step + 1) % cfg.train.val_every == 0) or is_last:
            val = validate()
            record.update({f"val_{k}": v for k, v in val.items() if k != "tokens"})
            if run is not None:
                for name, value in val.items():
                    if name != "tokens":
                        run.log(step=step + 1, tokens=tokens_seen, split="val", name=name, value=value)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_seen / elapsed:,.0f}", **(
            {"val": f"{val['loss']:.3f}"} if val else {}))
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start_time
    result = TrainResult(student=student, tokenizer=tokenizer, history=history, val=val,
                         tokens_per_second=tokens_seen / seconds, seconds=seconds)
    if run is not None:
        from distil.models.io import save_native

        save_native(student, run.checkpoints / "final", tokenizer=tokenizer)
    return result


def history_losses(history: list[dict]) -> np.ndarray:
    return np.array([h["loss"] for h in history])
