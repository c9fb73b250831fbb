"""Parallel losses equal the single-process loss on the gathered tensors: 2 and 3 gloo processes.

Each process builds the same full tensors from a seed, computes the reference (``kd_loss`` etc. on
the whole thing) and its parallel loss on its own slice, and checks the loss and its slice of the
gradient: within 1e-10 in float64 and 1e-5 in float32.
"""

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distil.losses import KINDS, cross_entropy, kd_loss, topk_kd_loss
from distil.losses.parallel import (
    sequence_parallel_cross_entropy,
    sequence_parallel_kd_loss,
    sequence_parallel_topk_kd_loss,
    vocab_parallel_cross_entropy,
    vocab_parallel_kd_loss,
    vocab_parallel_topk_kd_loss,
)

pytestmark = pytest.mark.numerics  # CI runs these again under ATEN_CPU_CAPABILITY=default

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}
VOCAB_SPLITS = {2: [10, 13], 3: [7, 9, 7]}  # uneven; 23 columns in all
# 12 tokens. The first 3 are masked, so rank 0 of the second pattern counts nothing; the first
# pattern spreads counted tokens over several ranks (so a per-rank mean would differ).
TOKEN_SPLITS = {2: ([6, 6], [3, 9]), 3: ([3, 4, 5], [3, 0, 9])}


def _case_tensors(seed, dtype, tokens=12, vocab=23):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(tokens, vocab, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(tokens, vocab, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(tokens, generator=g) > 0.3
    labels = torch.randint(0, vocab - 3, (tokens,), generator=g)
    labels[1] = -100
    return student.to(dtype), teacher.to(dtype), mask, labels


def _cases():
    for dtype in (torch.float64, torch.float32):
        for kind in KINDS:
            yield dict(form="kd", kind=kind, dtype=dtype, temperature=1.0)
            yield dict(form="kd", kind=kind, dtype=dtype, temperature=2.5, padded=3)
        yield dict(form="kd", kind="reverse_kl", dtype=dtype, temperature=1.0, reduction="sum", softcap=4.0)
        yield dict(form="ce", dtype=dtype)
        yield dict(form="ce", dtype=dtype, padded=3)
        for kind in ("forward_kl", "reverse_kl", "soft_ce"):
            for tail in ("bucket", "renormalize"):
                yield dict(form="topk", kind=kind, tail=tail, dtype=dtype, temperature=1.5)
        yield dict(form="topk", kind="forward_kl", tail="bucket", dtype=dtype, temperature=1.0, k=23)


def _reference(case, student, teacher, mask, labels):
    vocab = 23 - case.get("padded", 0)
    s, t = student[:, :vocab], teacher[:, :vocab]
    if case["form"] == "kd":
        return kd_loss(s, t, case["kind"], temperature=case["temperature"], mask=mask,
                       reduction=case.get("reduction", "mean"), logit_softcap=case.get("softcap"))
    if case["form"] == "ce":
        return cross_entropy(s, labels, mask=mask)
    lp, ids = torch.log_softmax(teacher.double() / case["temperature"], -1).topk(case.get("k", 5), -1)
    return topk_kd_loss(s, ids, lp.to(s.dtype), case["kind"], tail=case["tail"], temperature=case["temperature"], mask=mask)


def _check_vocab(case, rank, world):
    student, teacher, mask, labels = _case_tensors(7, case["dtype"])
    full = student.clone().requires_grad_()
    ref = _reference(case, full, teacher, mask, labels)
    (ref_grad,) = torch.autograd.grad(ref, full)
    widths = VOCAB_SPLITS[world]
    start = sum(widths[:rank])
    cols = slice(start, start + widths[rank])
    local = student[:, cols].clone().requires_grad_()
    vocab_size = 23 - case["padded"] if case.get("padded") else None
    if case["form"] == "kd":
        out = vocab_parallel_kd_loss(local, teacher[:, cols], case["kind"], temperature=case["temperature"], mask=mask,
                                     reduction=case.get("reduction", "mean"), vocab_size=vocab_size,
                                     logit_softcap=case.get("softcap"))
    elif case["form"] == "ce":
        out = vocab_parallel_cross_entropy(local, labels, mask=mask, vocab_size=vocab_size)
    else:
        lp, ids = torch.log_softmax(teacher.double() / case["temperature"], -1).topk(case.get("k", 5), -1)
        out = vocab_parallel_topk_kd_loss(local, ids, lp.to(local.dtype), case["kind"], tail=case["tail"],
                                          temperature=case["temperature"], mask=mask)
    (grad,) = torch.autograd.grad(out, local)
    torch.testing.assert_close(out, ref, **TOL[case["dtype"]])
    torch.testing.assert_close(grad, ref_grad[:, cols], **TOL[case["dtype"]])


def _check_sequence(case, rank, world, pattern):
    student, teacher, mask, labels = _case_tensors(11, case["dtype"])
    mask = mask.clone()
    mask[:3] = False  # rank 0's tokens are all masked: it must still take part
    vocab = 23 - case.get("padded", 0)
    full = student.clone().requires_grad_()
    ref = _reference(case, full, teacher, mask, labels)
    (ref_grad,) = torch.autograd.grad(ref, full)
    widths = TOKEN_SPLITS[world][pattern]
    start = sum(widths[:rank])
    rows = slice(start, start + widths[rank])
    local = student[rows].clone().requires_grad_()
    if case["form"] == "kd":
        out = sequence_parallel_kd_loss(local[:, :vocab], teacher[rows, :vocab], case["kind"], mask=mask[rows],
                                        temperature=case["temperature"], reduction=case.get("reduction", "mean"),
                                        logit_softcap=case.get("softcap"))
    elif case["form"] == "ce":
        out = sequence_parallel_cross_entropy(local[:, :vocab], labels[rows], mask=mask[rows])
    else:
        lp, ids = torch.log_softmax(teacher.double() / case["temperature"], -1).topk(case.get("k", 5), -1)
        out = sequence_parallel_topk_kd_loss(local[:, :vocab], ids[rows], lp[rows].to(local.dtype), case["kind"],
                                             tail=case["tail"], temperature=case["temperature"], mask=mask[rows])
    (grad,) = torch.autograd.grad(out, local, allow_unused=True)
    grad = torch.zeros_like(local) if grad is None else grad
    torch.testing.assert_close(out, ref, **TOL[case["dtype"]])
    torch.testing.assert_close(grad, ref_grad[rows], **TOL[case["dtype"]])


def _worker(rank, world, init_file, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    failures = []
    try:
        for case in _cases():
            checks = [("vocab", lambda case=case: _check_vocab(case, rank, world))]
            checks += [(f"sequence{p}", lambda p=p, case=case: _check_sequence(case, rank, world, p)) for p in (0, 1)]
            for form, check in checks:
                try:
                    check()
                except Exception:  # collect every mismatch, keep the collectives in step
                    failures.append(f"{form} {case}: {traceback.format_exc().splitlines()[-1]}")
    finally:
        with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(failures))
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_parallel_losses_equal_single_process(world):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world, join=True)
        failures = []
        for rank in range(world):
            text = open(os.path.join(tmp, f"rank{rank}.txt")).read().strip()
            if text:
                failures.append(f"rank {rank}:\n{text}")
    assert not failures, "\n".join(failures)


def test_single_process_forms_need_no_process_group():
    student, teacher, mask, labels = _case_tensors(3, torch.float64)
    torch.testing.assert_close(vocab_parallel_kd_loss(student, teacher, "jsd", mask=mask), kd_loss(student, teacher, "jsd", mask=mask))
    torch.testing.assert_close(sequence_parallel_kd_loss(student, teacher, "tvd", mask=mask), kd_loss(student, teacher, "tvd", mask=mask))
