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
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distil.config import Config
from distil.data.dataset import TokenizedData, build_data, split_corpus
from distil.data.packing import StreamBatcher, WindowSampler, batch_tensors, stream_tensors
from distil.data.tokenize import has_tokenizer, load_tokenizer, tokenizer_hash, train_bpe_tokenizer
from distil.errors import DistilError
from distil.eval.perplexity import evaluate_lm
from distil.losses import cross_entropy, fused_linear_kd_loss, kd_loss, topk_kd_loss
from distil.losses.divergences import shared_vocab
from distil.losses.topk import teacher_topk
from distil.models.io import load_state
from distil.models.state import carry, empty_states
from distil.models.transformer import ModelConfig, TransformerLM
from distil.train.checkpoint import latest_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from distil.train.distributed import all_reduce_mean, barrier, init_distributed, parallelize
from distil.train.guard import SpikeGuard
from distil.run_dir import RunDir
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


def compute_loss(student, teacher: Teacher | None, batch: dict, loss_cfg, *, head=None, stream: dict | None = None,
                 tp_group=None):
    """ce_weight * CE + kd_weight * KD for one micro-batch (T^2-scaled when configured).

    ``student`` may be wrapped (DDP); ``head`` is the plain model's LM head (default: student.lm_head).
    With ``tp_group`` the head is vocabulary-sharded (each rank's output is its columns of the logits)
    and the loss is the vocabulary-parallel one (distil.losses.parallel).
    With ``stream`` (stream packing) the student's and a native teacher's states are read from and
    written back to that dict, and the batch carries per-token ``positions``; labels of -100 (padding)
    count in neither term.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    doc_ids = batch.get("attn_doc_ids")
    positions = batch.get("positions")
    if stream is not None:
        hidden, stream["student"] = student(input_ids, positions=positions, states=stream["student"],
                                            return_states=True, return_hidden=True)
    else:
        hidden = student(input_ids, doc_ids=doc_ids, positions=positions, return_hidden=True)  # [batch, seq, d_model]
    head = head if head is not None else student.lm_head
    mask = labels != -100 if stream is not None else None
    if teacher is not None and stream is not None and teacher.native:
        with torch.no_grad():
            teacher_hidden, stream["teacher"] = teacher.model(input_ids, positions=positions, states=stream["teacher"],
                                                              return_states=True, return_hidden=True)
        teacher = _FixedTeacher(teacher_hidden, teacher.model.lm_head.weight)
    kd_weight = loss_cfg.kd_weight * (loss_cfg.temperature**2 if loss_cfg.t2_scale else 1.0)
    if tp_group is not None:
        return _vocab_parallel_loss(hidden, head, teacher, batch, loss_cfg, kd_weight, mask, tp_group)
    if (teacher is None and "teacher_topk" not in batch) or kd_weight == 0:
        if loss_cfg.fused:
            return fused_linear_kd_loss(hidden, head.weight, labels=labels, ce_weight=loss_cfg.ce_weight,
                                        kd_weight=0.0, chunk_size=loss_cfg.chunk_size, mask=mask)
        return loss_cfg.ce_weight * cross_entropy(head(hidden), labels)
    common = dict(kind=loss_cfg.kind, temperature=loss_cfg.temperature, mask=mask)
    if loss_cfg.topk or "teacher_topk" in batch:
        if "teacher_topk" in batch:  # from a cache or an API teacher
            ids, logprobs, tail_lp = batch["teacher_topk"]
            # Positions without any teacher entry (an imported prompt, padding) count in neither term.
            counted = (labels != -100) & (ids >= 0).any(-1)
            if not bool(counted.all()):
                common["mask"] = counted
        else:  # the teacher as a top-k cache would hold it: log-probs at the loss temperature
            ids, logprobs, tail_lp = teacher_topk(teacher.logits(input_ids, doc_ids, positions), loss_cfg.topk,
                                                  temperature=loss_cfg.temperature)
        if loss_cfg.fused:
            return fused_linear_kd_loss(hidden, head.weight, teacher_topk=(ids, logprobs, tail_lp), labels=labels,
                                        ce_weight=loss_cfg.ce_weight, kd_weight=kd_weight, tail=loss_cfg.tail,
                                        chunk_size=loss_cfg.chunk_size, **common)
        logits = head(hidden)
        loss = kd_weight * topk_kd_loss(logits, ids, logprobs, tail=loss_cfg.tail, teacher_tail_logprob=tail_lp,
                                        **common)
    else:
        teacher_head = teacher.head_inputs(input_ids, doc_ids, positions) if loss_cfg.fused else None
        if teacher_head is not None:
            teacher_hidden, teacher_weight, teacher_bias = teacher_head
            return fused_linear_kd_loss(hidden, head.weight, teacher_hidden, teacher_weight,
                                        teacher_bias=teacher_bias, labels=labels, ce_weight=loss_cfg.ce_weight,
                                        kd_weight=kd_weight, chunk_size=loss_cfg.chunk_size, beta=loss_cfg.beta,
                                        skew=loss_cfg.skew, **common)
        logits = head(hidden)
        teacher_logits = teacher.logits(input_ids, doc_ids, positions)
        loss = kd_weight * kd_loss(logits, teacher_logits, beta=loss_cfg.beta, skew=loss_cfg.skew, **common)
    if loss_cfg.ce_weight:
        loss = loss + loss_cfg.ce_weight * cross_entropy(logits, labels)
    return loss


class _FixedTeacher:
    """A teacher whose outputs for this micro-batch are already computed (stream packing)."""

    native = True

    def __init__(self, hidden, weight):
        self.hidden, self.weight = hidden, weight

    def head_inputs(self, *args):
        return self.hidden, self.weight, None

    def logits(self, *args):
        return self.hidden @ self.weight.t()


def prepare(cfg: Config, run: RunDir | None = None, *, teacher=None, tokenizer=None, data=None, info=None,
            need_val: bool = True):
    """Load or build what the loop needs: (teacher, tokenizer, data)."""
    info = info or init_distributed(cfg.train.device)
    device = info.device
    if teacher is None and cfg.teacher.source == "model":
        teacher = load_teacher(cfg.teacher.path, dtype=cfg.teacher.dtype, device=device)
    docs = None
    if tokenizer is None:
        if cfg.data.tokenizer:
            tokenizer = load_tokenizer(cfg.data.tokenizer)
        elif cfg.teacher.source == "cache" and has_tokenizer(Path(cfg.teacher.cache) / "tokenizer"):
            tokenizer = load_tokenizer(Path(cfg.teacher.cache) / "tokenizer")
        elif cfg.teacher.source == "model" and has_tokenizer(cfg.teacher.path):
            tokenizer = load_tokenizer(cfg.teacher.path)
        elif cfg.student.path and has_tokenizer(cfg.student.path):
            tokenizer = load_tokenizer(cfg.student.path)
        else:
            docs = split_corpus(cfg.data)
            log.info("training a %d-token byte-level BPE on the training documents", cfg.data.vocab_size)
            tokenizer = train_bpe_tokenizer(docs[0], cfg.data.vocab_size, run.path / "tokenizer" if run else None)
    if data is None:
        data = build_data(cfg.data, tokenizer, docs=docs, need_val=need_val)
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
    resume: bool = True,
) -> TrainResult:
    """Train ``student`` (built from the config when not given). With a run folder: metrics,
    checkpoints every ``train.checkpoint_every`` steps and at the end, and automatic resumption from
    the folder's latest checkpoint (``resume=False`` starts over)."""
    info = init_distributed(cfg.train.device)
    device = info.device
    is_main = info.is_main
    # loss.parallel = vocab: the LM head is sharded over all processes (tensor parallel), which all
    # see the same batch; the rest of the student is replicated.
    tp = cfg.loss.parallel == "vocab" and info.world_size > 1
    if cfg.train.batch_size % info.world_size and not tp:
        raise DistilError(f"train.batch_size = {cfg.train.batch_size} (the global micro-batch) is not divisible by "
                          f"the {info.world_size} processes")
    teacher, tokenizer, data = prepare(cfg, run, teacher=teacher, tokenizer=tokenizer, data=data, info=info)
    if cfg.loss.kd_weight == 0:
        teacher = None
    teacher_vocab = teacher.vocab_size if teacher is not None else None
    cache, api = None, None
    if cfg.teacher.source == "cache" and cfg.loss.kd_weight:
        cache = open_cache(cfg, tokenizer, data)
        teacher_vocab = cache.settings.vocab_size
    elif cfg.teacher.source == "api" and cfg.loss.kd_weight:
        from distil.data.api_teacher import ApiTeacher

        api = ApiTeacher.from_config(cfg.teacher, tokenizer)
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
    if cache is not None:
        cache.check_against(tokenizer_hash=tokenizer_hash(tokenizer), vocab_size=student.config.vocab_size,
                            temperature=cfg.loss.temperature)
    check_vocabularies(tokenizer, student.config.vocab_size, teacher_vocab)
    student.to(device).train()
    tp_group = None
    if tp:
        if teacher_vocab is not None and teacher_vocab != student.config.vocab_size:
            raise DistilError(f"loss.parallel 'vocab' needs the same vocabulary on both sides: student "
                              f"{student.config.vocab_size}, teacher {teacher_vocab}")
        tp_group = shard_lm_head(student, device, info.world_size)
        if is_main:
            log.info("LM head sharded over %d processes (vocabulary parallel); loss.parallel = vocab", info.world_size)
    elif cfg.loss.parallel == "vocab":
        log.info("loss.parallel = 'vocab' at world size 1 is the plain loss")
    if teacher is not None:
        teacher.to(device)

    optimizer = build_optimizer(student, cfg)
    local_batch = cfg.train.batch_size if tp else cfg.train.batch_size // info.world_size
    streaming = cfg.data.packing == "stream"
    if streaming:
        # Each rank walks its own share of the documents; a row's state flows across its chunks.
        sampler = StreamBatcher(data.train_token_docs[info.rank :: info.world_size], local_batch, cfg.data.seq_len,
                                seed=cfg.train.seed, pad_id=tokenizer.eos_token_id or 0)
    elif cache is not None:
        sampler = _CacheFeed(cache, cfg, data, info, pad_id=tokenizer.eos_token_id or 0)
    else:
        sampler = WindowSampler(len(data.train_windows), cfg.train.batch_size, seed=cfg.train.seed)
    stream: dict | None = {"student": None, "teacher": None} if streaming else None
    guard = SpikeGuard(factor=cfg.train.spike_factor, patience=cfg.train.spike_patience, window=cfg.train.spike_window,
                       lr_factor=cfg.train.spike_lr_factor)
    history: list[dict] = []
    start_step, tokens_seen = 0, 0

    fsdp = info.world_size > 1 and cfg.train.parallel == "fsdp"

    def restore(path) -> None:
        nonlocal start_step, tokens_seen, history
        if sharded:
            state = _load_sharded(path, student, optimizer)
        elif fsdp:  # before sharding: weights now, optimizer state once the optimizer exists
            model_state, state = read_checkpoint(path)
            load_state(student, model_state, source=str(path))
            pending_optimizer.append(state.pop("optimizer"))
        else:
            state = load_checkpoint(path, student, optimizer)
        sampler.load_state_dict(state["sampler"])
        start_step, tokens_seen, history = state["step"], state["tokens"], state["history"]
        if streaming:
            stream.update(state["stream"])
        return state

    sharded, pending_optimizer = tp, []  # a TP head is sharded from the start
    latest = latest_checkpoint(run.checkpoints) if run is not None and resume else None
    if latest is not None:
        state = restore(latest)
        guard.load_state_dict(state["guard"])
        if is_main:
            log.info("resuming from %s (step %d)", latest, start_step)
            run.truncate_metrics(start_step)

    # DDP / FSDP2 / compile from outside; a no-op at world size 1 (and no data parallelism under TP)
    model = parallelize(student, cfg.train, info, data_parallel=not tp)
    if fsdp:  # FSDP2 replaced the parameters with sharded ones: the optimizer must hold those
        sharded = True
        optimizer = build_optimizer(student, cfg)
        if pending_optimizer:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(student, optimizer, pending_optimizer.pop(),
                                     options=StateDictOptions(full_state_dict=True))
    use_bf16 = cfg.train.dtype == "bfloat16"
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    params = [p for p in student.parameters() if p.requires_grad]
    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
    if cfg.loss.parallel == "sequence" and info.world_size == 1:
        log.info("loss.parallel = 'sequence' at world size 1 is the plain loss")

    def checkpoint(step: int) -> None:
        if run is None:
            return
        model_state, optimizer_state = None, None
        if fsdp or tp:  # every rank takes part in gathering the full state dicts
            model_state, optimizer_state = _gather_full_state(student, optimizer)
        if is_main:
            save_checkpoint(run.checkpoints, step, student,
                            optimizer_state if fsdp or tp else optimizer.state_dict(), model_state=model_state,
                            keep=cfg.train.keep_checkpoints, extra={
                                "step": step, "tokens": tokens_seen, "sampler": sampler.state_dict(),
                                "guard": guard.state_dict(), "history": history, "stream": stream})
        barrier(info)

    def plain_student():
        """The student itself, or under TP a whole (unsharded) copy; a collective under TP."""
        return _unsharded_copy(student, device) if tp else student

    def validate() -> dict:
        # The global batch size: every world size validates on the same windows.
        return evaluate_lm(plain_student(), data.val_windows, batch_size=cfg.train.batch_size,
                           max_batches=cfg.eval.val_batches, teacher=teacher, device=device)

    val: dict = {}
    step = start_step
    session_start, session_tokens = time.perf_counter(), 0
    bar = tqdm(total=cfg.train.steps, initial=start_step, desc=desc, disable=not (cfg.train.progress and is_main),
               dynamic_ncols=True)
    while step < cfg.train.steps:
        lr = cfg.train.lr * guard.lr_scale * lr_multiplier(
            step, total_steps=cfg.train.steps, warmup_steps=cfg.train.warmup_steps, schedule=cfg.train.schedule,
            min_ratio=cfg.train.min_lr_ratio, decay_fraction=cfg.train.decay_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for _ in range(cfg.train.grad_accum):
            if streaming:
                batch = stream_tensors(sampler.next_batch(), device)
                _carry_stream(stream, student, teacher, batch["reset"], cfg.data.stream_kv_window)
            elif cache is not None:
                batch = sampler.next_batch(device)
            else:
                # Every rank draws the same global batch and takes its own slice of it (all of it under TP).
                first = 0 if tp else info.rank * local_batch
                index = sampler.next_batch()[first : first + local_batch]
                batch = batch_tensors(data.train_windows, data.train_doc_ids, index, device,
                                      document_attention=cfg.data.document_attention)
                if api is not None:
                    batch["teacher_topk"] = api.topk(batch["input_ids"], cfg.loss.topk or cfg.teacher.api_topk)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = compute_loss(model, teacher, batch, cfg.loss, head=student.lm_head, stream=stream,
                                    tp_group=tp_group)
            if cfg.loss.parallel == "sequence" and info.world_size > 1:
                # The global token mean: this rank's mean times its share of the counted tokens.
                # DDP then averages over ranks, so the world size cancels (distil.losses.parallel).
                counted = (batch["labels"] != -100).sum().to(torch.float64)
                total = counted.clone()
                torch.distributed.all_reduce(total)
                loss = loss * (counted * info.world_size / total.clamp_min(1)).to(loss.dtype)
            (loss / cfg.train.grad_accum).backward()
            step_loss += loss.item() / cfg.train.grad_accum
        step_loss = all_reduce_mean(step_loss, info, device)
        grad_norm = clip_grad_norm(params, clip)
        action = guard.check(step_loss, grad_norm)
        if action == "rollback" and run is not None and latest_checkpoint(run.checkpoints) is not None:
            optimizer.zero_grad(set_to_none=True)
            scale, rollbacks = guard.lr_scale, guard.rollbacks
            state = restore(latest_checkpoint(run.checkpoints))
            guard.load_state_dict(state["guard"], keep_lr_scale=True)
            guard.rollbacks = rollbacks
            if is_main:
                log.warning("loss %.4g spiked for %d steps: rolled back to step %d, LR scale now %.3g",
                            step_loss, cfg.train.spike_patience, start_step, scale)
                run.truncate_metrics(start_step)
                run.log(step=start_step, tokens=tokens_seen, split="train", name="rollback", value=scale)
            step = start_step
            bar.n = step
            continue
        if action == "skip":
            optimizer.zero_grad(set_to_none=True)  # a non-finite step changes nothing
            if is_main:
                log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s); skipped", step + 1, step_loss,
                            grad_norm)
                if run is not None:
                    run.log(step=step + 1, tokens=tokens_seen, split="train", name="skipped_step", value=1.0)
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        session_tokens += tokens_per_step
        elapsed = time.perf_counter() - session_start
        record = {"step": step, "tokens": tokens_seen, "loss": step_loss, "lr": lr, "grad_norm": grad_norm}
        history.append(record)
        if run is not None and is_main and (step % cfg.train.log_every == 0 or step == 1 or step == cfg.train.steps):
            for name in ("loss", "lr", "grad_norm"):
                run.log(step=step, tokens=tokens_seen, split="train", name=name, value=record[name])
            run.log(step=step, tokens=tokens_seen, split="train", name="tokens_per_second", value=session_tokens / elapsed)
        is_last = step == cfg.train.steps
        if (cfg.train.val_every and step % cfg.train.val_every == 0) or is_last:
            if is_main or fsdp or tp:  # a sharded model's forward (or gathering) needs every rank
                val = validate()
            if is_main:
                record.update({f"val_{k}": v for k, v in val.items() if k != "tokens"})
                if run is not None:
                    for name, value in val.items():
                        if name != "tokens":
                            run.log(step=step, tokens=tokens_seen, split="val", name=name, value=value)
            barrier(info)
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and not is_last:
            checkpoint(step)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{session_tokens / elapsed:,.0f}", **(
            {"val": f"{val['loss']:.3f}"} if val else {}))
        bar.update(1)
    bar.close()
    if cache is not None:
        sampler.close()
    if api is not None:
        api.close()
    if not val and (is_main or fsdp or tp):  # resumed at the last step: nothing trained this session, still report
        val = validate()
    whole = plain_student()  # under TP an unsharded copy: results, multiple choice, the final model
    if cfg.eval.multiple_choice and (is_main or fsdp):
        from distil.eval.multiple_choice import load_items, score_multiple_choice

        mc = score_multiple_choice(whole, tokenizer, load_items(cfg.eval.multiple_choice), device=device)
        val.update({"mc_acc": mc["acc"], "mc_acc_norm": mc["acc_norm"]})
        if run is not None and is_main:
            for name in ("mc_acc", "mc_acc_norm"):
                run.log(step=cfg.train.steps, tokens=tokens_seen, split="val", name=name, value=val[name])
    seconds = time.perf_counter() - session_start
    result = TrainResult(student=whole, tokenizer=tokenizer, history=history, val=val,
                         tokens_per_second=session_tokens / seconds if seconds > 0 else 0.0, seconds=seconds)
    if run is not None:
        checkpoint(cfg.train.steps)
        final_state = _gather_full_state(student, optimizer)[0] if fsdp else None
        if is_main:
            from distil.models.io import save_native

            save_native(whole, run.checkpoints / "final", tokenizer=tokenizer, state=final_state)
        barrier(info)
    return result


def open_cache(cfg: Config, tokenizer, data: TokenizedData):
    """The configured teacher cache, checked against the data and loss (errors name both sides)."""
    from distil.data.teacher_cache import TeacherCache, tokens_sha256

    cache = TeacherCache(cfg.teacher.cache)
    if cfg.loss.topk and cfg.loss.topk != cache.settings.k:
        raise DistilError(f"loss.topk = {cfg.loss.topk} but the cache {cache.path} holds k = {cache.settings.k}; "
                          "unset loss.topk or write a cache with that k")
    cache.check_against(tokenizer_hash=tokenizer_hash(tokenizer), temperature=cfg.loss.temperature, seq_len=cfg.data.seq_len,
                        num_sequences=len(data.train_windows), document_attention=cfg.data.document_attention,
                        windows_sha256=lambda: tokens_sha256(data.train_windows))
    return cache


class _CacheFeed:
    """Training batches from a teacher cache through a DataLoader (``data.num_workers`` workers).

    Stands in for the window sampler: ``state_dict`` is the position after the last batch
    *consumed* (workers read ahead), and ``load_state_dict`` restarts the loader from there."""

    def __init__(self, cache, cfg: Config, data: TokenizedData, info, *, pad_id: int):
        from distil.data.packing import WindowSampler

        self.cache, self.cfg, self.data, self.info, self.pad_id = cache, cfg, data, info, pad_id
        self.state = WindowSampler(len(cache), cfg.train.batch_size, seed=cfg.train.seed).state_dict()
        self._it = None

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.state = dict(state)

    def close(self) -> None:
        self._it = None  # the DataLoader iterator shuts its workers down when dropped

    def next_batch(self, device) -> dict:
        from distil.data.teacher_cache import CacheBatches

        if self._it is None:
            own = self.cache.settings.source == "import"
            dataset = CacheBatches(self.cache, batch_size=self.cfg.train.batch_size, seed=self.cfg.train.seed,
                                   sampler_state=self.state, rank=self.info.rank, world_size=self.info.world_size,
                                   seq_len=self.cfg.data.seq_len, windows=None if own else self.data.train_windows,
                                   doc_ids=None if own else self.data.train_doc_ids,
                                   document_attention=self.cfg.data.document_attention, pad_id=self.pad_id)
            workers = self.cfg.data.num_workers
            loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                                 pin_memory=device.type == "cuda",
                                                 prefetch_factor=4 if workers else None)
            self._it = iter(loader)
        batch = next(self._it)
        self.state = batch.pop("sampler_state")
        topk = tuple(t.to(device, non_blocking=True) for t in batch.pop("teacher_topk"))
        batch = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
        batch["teacher_topk"] = topk
        return batch


def _vocab_parallel_loss(hidden, head, teacher, batch, loss_cfg, kd_weight, mask, group):
    """The loss of a vocabulary-sharded LM head: each rank has its columns of the student's logits
    and takes the same columns of the (replicated) teacher's; the parallel losses equal the
    single-device ones in value and gradient (tests/test_parallel_losses.py)."""
    from distil.losses.parallel import (
        vocab_parallel_cross_entropy,
        vocab_parallel_kd_loss,
        vocab_parallel_topk_kd_loss,
        vocab_slice,
    )

    input_ids, labels = batch["input_ids"], batch["labels"]
    doc_ids, positions = batch.get("attn_doc_ids"), batch.get("positions")
    logits = head(hidden)  # [batch, seq, this rank's columns]
    start, end = vocab_slice(logits.shape[-1], group)
    loss = None
    if teacher is not None and kd_weight:
        common = dict(group=group, mask=mask, temperature=loss_cfg.temperature)
        if loss_cfg.topk:
            ids, logprobs, tail_lp = teacher_topk(teacher.logits(input_ids, doc_ids, positions), loss_cfg.topk,
                                                  temperature=loss_cfg.temperature)
            loss = kd_weight * vocab_parallel_topk_kd_loss(logits, ids, logprobs, loss_cfg.kind, tail=loss_cfg.tail,
                                                           teacher_tail_logprob=tail_lp, **common)
        else:
            head_inputs = teacher.head_inputs(input_ids, doc_ids, positions)
            if head_inputs is not None:  # only this rank's columns of the teacher's head
                teacher_hidden, teacher_weight, _ = head_inputs
                teacher_logits = teacher_hidden @ teacher_weight[start:end].t()
            else:
                teacher_logits = teacher.logits(input_ids, doc_ids, positions)[..., start:end]
            loss = kd_weight * vocab_parallel_kd_loss(logits, teacher_logits, loss_cfg.kind, beta=loss_cfg.beta,
                                                      skew=loss_cfg.skew, **common)
    if loss_cfg.ce_weight:
        ce = loss_cfg.ce_weight * vocab_parallel_cross_entropy(logits, labels, group=group, mask=mask)
        loss = ce if loss is None else loss + ce
    return loss


def _unsharded_copy(student, device):
    """A plain copy of a model with sharded (DTensor) parameters; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True))
    copy = type(student)(student.config)
    copy.load_state_dict(state)
    return copy.to(device).train(student.training)


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


def _carry_stream(stream: dict, student, teacher, reset: torch.Tensor, kv_window: int | None) -> None:
    """Detach the carried states, zero the rows that start a new document, bound the KV."""
    batch = reset.shape[0]
    if stream["student"] is None:
        stream["student"] = empty_states(student, batch)
    stream["student"] = carry(stream["student"], reset=reset, kv_window=kv_window)
    if teacher is not None and teacher.native:
        if stream["teacher"] is None:
            stream["teacher"] = empty_states(teacher.model, batch)
        stream["teacher"] = carry(stream["teacher"], reset=reset, kv_window=kv_window)
