"""``distil demo``: distillation end to end on a corpus every Python install carries.

1. Load the embedded corpus (Python's docs and stdlib docstrings), split it by document, and
   train a byte-level BPE tokenizer on the training side.
2. Train a small teacher on it.
3. Train three students of the same size on the same token budget: hard-label CE only, forward
   KL to the teacher, and reverse KL.
4. Evaluate held-out loss, perplexity, KL to the teacher and top-1 agreement.
5. Score a multiple-choice task built from held-out text (pick the true next passage among 4, by
   log-likelihood as HellaSwag is scored).
6. Write ``report.md`` with the results table and loss-curve plots. A student is called better
   than CE-only only when the difference beats its spread over seeds (:func:`distil.eval.compare.judge`,
   the study's rule); models at chance on multiple choice are marked as such.

``--quick`` takes about 4 minutes on 2 CPU cores; the full demo under 20.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distil.charts import format_params, markdown_table, plot_curves, smooth
from distil.config import config_from_dict
from distil.data.corpus import embedded_corpus, split_documents
from distil.data.dataset import build_data
from distil.data.tokenize import train_bpe_tokenizer
from distil.eval.compare import judge, mc_chance
from distil.eval.multiple_choice import continuation_items, score_multiple_choice
from distil.eval.perplexity import evaluate_lm
from distil.hybrid import hybridize, select_layers
from distil.hybrid.mil import size_difference
from distil.models.generate import generate
from distil.models.io import save_native
from distil.run_dir import RunDir
from distil.teachers import MemoTeacher, Teacher
from distil.train.run import run_training

log = logging.getLogger("distil")


@dataclass
class DemoSettings:
    vocab_size: int = 2048
    seq_len: int = 128
    batch_size: int = 16
    teacher: tuple = (256, 4, 4)  # d_model, n_layers, n_heads
    student: tuple = (128, 2, 2)
    teacher_steps: int = 600
    student_steps: int = 400
    teacher_lr: float = 2e-3
    student_lr: float = 3e-3
    temperature: float = 1.0
    val_every: int = 100
    val_batches: int = 16
    mc_items: int = 200
    max_docs: int | None = None
    hybrid_steps: int = 100  # reverse-KL steps for each 50% hybrid (MIL and random init)
    hybrid_lr: float = 1e-3
    decode_tokens: int = 128  # tokens generated when timing decode speed
    decode_context: int = 512  # prompt length for the decode-speed comparison
    seeds: int = 2  # seeds per student (init and batch order): a student is ranked only beyond their spread


QUICK = DemoSettings(teacher_steps=100, student_steps=100, val_every=25, val_batches=8, mc_items=100, hybrid_steps=12,
                     decode_tokens=24, decode_context=128)
FULL = DemoSettings()

STUDENTS = (
    ("ce", "hard-label CE only", {"kd_weight": 0.0, "ce_weight": 1.0}),
    ("forward_kl", "forward KL", {"kind": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.0}),
    ("reverse_kl", "reverse KL", {"kind": "reverse_kl", "kd_weight": 1.0, "ce_weight": 0.0}),
)


def _config(settings: DemoSettings, model: tuple, *, steps: int, lr: float, loss: dict, teacher: bool, seed: int):
    d_model, n_layers, n_heads = model
    return config_from_dict({
        # The demo passes its trained teacher to train() directly; the path only satisfies validation.
        "teacher": {"source": "model", "path": "<demo teacher>"} if teacher else {"source": "none"},
        "student": {"d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "max_seq_len": settings.seq_len},
        "data": {"seq_len": settings.seq_len, "vocab_size": settings.vocab_size},
        "loss": {"temperature": settings.temperature, **loss},
        "train": {"steps": steps, "batch_size": settings.batch_size, "lr": lr, "warmup_steps": max(5, steps // 20),
                  "val_every": settings.val_every, "seed": seed, "device": "cpu", "log_every": 5},
        "eval": {"val_batches": settings.val_batches},
    })


def narrator(started: float, progress: bool, label: str = "demo"):
    """``say(msg)``: a line with the seconds since ``started`` on stdout, or a log line when quiet."""

    def say(msg: str) -> None:
        if progress:
            print(f"[{label} {time.perf_counter() - started:5.0f}s] {msg}", flush=True)
        else:
            log.info(msg)

    return say


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, overwrite: bool = False, progress: bool = True,
             settings: DemoSettings | None = None) -> dict:
    settings = settings or (QUICK if quick else FULL)
    run = RunDir.create(out, overwrite=overwrite)
    started = time.perf_counter()
    torch.manual_seed(0)
    say = narrator(started, progress)

    say("loading the embedded corpus (Python docs + stdlib docstrings)")
    docs = embedded_corpus()
    if settings.max_docs:
        docs = docs[: settings.max_docs]
    train_docs, val_docs = split_documents(docs, 0.05, seed=0)
    say(f"{len(train_docs)} training and {len(val_docs)} held-out documents; training a {settings.vocab_size}-token BPE")
    tokenizer = train_bpe_tokenizer(train_docs, settings.vocab_size, run.path / "tokenizer")
    base_cfg = _config(settings, settings.teacher, steps=1, lr=1e-3, loss={"kd_weight": 0.0, "ce_weight": 1.0},
                       teacher=False, seed=0)
    data = build_data(base_cfg.data, tokenizer, docs=(train_docs, val_docs))
    say(f"{data.num_train_tokens:,} training tokens in windows of {settings.seq_len}")
    mc_items = continuation_items(val_docs, tokenizer, num_items=settings.mc_items, seed=0)
    write_eval_sets(run, val_docs, mc_items)

    results: dict[str, dict] = {}
    histories: dict[str, list[dict]] = {}

    def evaluate(name: str, label: str, model, teacher, train_result, folder: Path) -> dict:
        metrics = evaluate_lm(model, data.val_windows, batch_size=settings.batch_size, teacher=teacher)
        mc = score_multiple_choice(model, tokenizer, mc_items, batch_size=32)
        row = {
            "label": label, "params": model.num_parameters(), "val_loss": metrics["loss"], "ppl": metrics["ppl"],
            "kl_to_teacher": metrics.get("kl_to_teacher"), "top1_agreement": metrics.get("top1_agreement"),
            "mc_acc": mc["acc"], "mc_acc_norm": mc["acc_norm"], "mc_items": len(mc_items),
            "val_tokens": metrics["tokens"], "train_seconds": train_result.seconds,
            "tokens_per_second": train_result.tokens_per_second, "steps": len(train_result.history),
        }
        log_final(folder, metrics, mc)
        say(f"{label}: held-out loss {metrics['loss']:.3f} (ppl {metrics['ppl']:.1f}), multiple choice acc {mc['acc']:.2f}")
        return row

    say(f"training the teacher {settings.teacher} for {settings.teacher_steps} steps")
    teacher_cfg = _config(settings, settings.teacher, steps=settings.teacher_steps, lr=settings.teacher_lr,
                          loss={"kd_weight": 0.0, "ce_weight": 1.0}, teacher=False, seed=1)
    teacher_cfg.train.progress = progress
    teacher_result = _train(run, "teacher", teacher_cfg, tokenizer=tokenizer, data=data)
    teacher = MemoTeacher(teacher_result.student)
    save_native(teacher.model, run.checkpoints / "teacher", tokenizer=tokenizer)
    results["teacher"] = evaluate("teacher", "teacher", teacher.model, None, teacher_result, run.path / "runs" / "teacher")
    histories["teacher"] = teacher_result.history

    for name, label, loss in STUDENTS:
        rows = []
        for i in range(settings.seeds):  # seed i: its own init and batch order, the same for all three students
            folder = name if i == 0 else f"{name}-seed{i}"
            say(f"training the {label} student {settings.student} for {settings.student_steps} steps"
                + (f" (seed {i + 1} of {settings.seeds})" if settings.seeds > 1 else ""))
            cfg = _config(settings, settings.student, steps=settings.student_steps, lr=settings.student_lr, loss=loss,
                          teacher=loss["kd_weight"] > 0, seed=2 + i)
            cfg.train.progress = progress
            result = _train(run, folder, cfg, tokenizer=tokenizer, data=data,
                            teacher=teacher if loss["kd_weight"] > 0 else None)
            if i == 0:
                save_native(result.student, run.checkpoints / name, tokenizer=tokenizer)
                histories[name] = result.history
            rows.append(evaluate(name, label, result.student, teacher, result, run.path / "runs" / folder))
        results[name] = over_seeds(rows)
    for name, row in results.items():
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                run.log(step=row["steps"], tokens=0, split=f"final/{name}", name=key, value=value)

    hybrids = run_hybrid_demo(run, settings, teacher, tokenizer, data, say)
    report = write_report(run, settings, results, histories, quick=quick, seconds=time.perf_counter() - started,
                          hybrids=hybrids, vocab=teacher.model.config.vocab_size)
    run.mark_complete({"results": results, "hybrids": hybrids, "quick": quick})
    say(f"done in {time.perf_counter() - started:.0f}s; report: {report}")
    return results


DECODE_REPEATS = 5
SEED_KEYS = ("val_loss", "ppl", "kl_to_teacher", "top1_agreement", "mc_acc", "mc_acc_norm", "tokens_per_second")


def log_final(folder: Path, metrics: dict, mc: dict | None) -> None:
    """A model's final held-out and multiple-choice numbers in its own run folder, as the rows
    ``distil eval --run`` writes (step -1), so that ``distil report`` over the run folders shows them."""
    run = RunDir(folder)
    rows = {f"lm/{k}": v for k, v in metrics.items() if k != "tokens"}
    if mc is not None:
        rows.update({"multiple_choice/acc": mc["acc"], "multiple_choice/acc_norm": mc["acc_norm"]})
    for name, value in rows.items():
        if isinstance(value, (int, float)):
            run.log(step=-1, tokens=0, split="eval", name=name, value=value)
    run.close()


def over_seeds(rows: list[dict]) -> dict:
    """One table row from a model's per-seed rows: the mean of each number, every seed's value in
    ``per_seed`` (what :func:`verdict` judges)."""
    out = dict(rows[0])
    out["seeds"] = len(rows)
    out["per_seed"] = {k: [r[k] for r in rows] for k in SEED_KEYS if rows[0].get(k) is not None}
    for key, values in out["per_seed"].items():
        out[key] = sum(values) / len(values)
    out["train_seconds"] = sum(r["train_seconds"] for r in rows)
    return out


LM_EVAL_TASK = """task: demo_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_eval_sets(run: RunDir, val_docs: list[str], items) -> None:
    """The demo's evaluation sets beside its report, for ``distil eval`` and lm-evaluation-harness:
    ``held_out.jsonl`` (the held-out documents), ``mc.jsonl`` (the multiple-choice items) and
    ``lm_eval/demo_mc.yaml`` (the same items as an lm-eval task: ``--lm-eval demo_mc
    --lm-eval-include runs/demo/lm_eval``)."""
    run.write_text("held_out.jsonl", "".join(json.dumps({"text": doc}) + "\n" for doc in val_docs))
    mc = run.write_text("mc.jsonl", "".join(json.dumps({"context": i.context, "choices": i.choices, "label": i.label})
                                           + "\n" for i in items))
    run.write_text("lm_eval/demo_mc.yaml", LM_EVAL_TASK.format(path=json.dumps(str(mc.resolve()))))


def _train(run: RunDir, name: str, cfg, **prepared):
    """One model of the demo, trained in its own run folder ``runs/demo/runs/<name>/`` (config,
    every step's metrics, report, final checkpoint) through the same ``run_training`` as ``distil train``."""
    return run_training(cfg, run.path / "runs" / name, overwrite=True, desc=name, **prepared).result


def decode_speeds(models: dict, *, context: int, new_tokens: int, vocab: int, repeats: int = DECODE_REPEATS) -> dict:
    """Generated tokens per second after a ``context``-token prompt (batch 1, greedy) for each model,
    ``repeats`` rounds with the models taken in turn inside each round: the models share the same
    stretch of machine time, so a busy moment slows all of them, not one (one run of a small model on
    a shared CPU is noise: 1.3x and 2.2x on two runs of the same code)."""
    prompt = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0))
    for model in models.values():
        generate(model, prompt[:, :8], max_new_tokens=2)  # warm-up
    speeds: dict = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            generate(model, prompt, max_new_tokens=new_tokens)
            speeds[name].append(new_tokens / (time.perf_counter() - start))
    return speeds


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def speed_comparison(hybrid: list[float], teacher: list[float], label: str = "the MIL hybrid") -> str:
    """A hybrid's decode speed against the teacher's, or that the difference is within the noise:
    a ratio is claimed only when the two ranges do not overlap."""
    ratio = _median(hybrid) / _median(teacher)
    if min(hybrid) <= max(teacher) and min(teacher) <= max(hybrid):  # the ranges overlap
        return (f"{label} and the teacher decoded at the same speed within the run-to-run spread (median "
                f"{_median(hybrid):,.0f} against {_median(teacher):,.0f} tokens/s over {len(hybrid)} runs each)")
    return (f"{label} decoded at {ratio:.2f}x the teacher's speed (median of {len(hybrid)} runs, "
            f"{min(hybrid):,.0f}-{max(hybrid):,.0f} against {min(teacher):,.0f}-{max(teacher):,.0f} tokens/s)")


def decode_section(hybrids: dict, *, context: int, new_tokens: int) -> str:
    """The decode-speed table (median and range) and one sentence per hybrid."""
    rows = [["teacher (all attention)", _speed_cell(hybrids["teacher_decode_tokens_per_second"])]]
    rows += [[f"hybrid, {'MIL' if init == 'mil' else 'random'} init", _speed_cell(hybrids[init]["decode_tokens_per_second"])] for init in ("mil", "random")]
    n = len(hybrids["teacher_decode_tokens_per_second"])
    table = markdown_table(["model", f"decode tokens/s: median (range of {n} runs)"], rows)
    said = "; ".join(speed_comparison(hybrids[init]["decode_tokens_per_second"], hybrids["teacher_decode_tokens_per_second"],
                                      f"the {'MIL' if init == 'mil' else 'random-init'} hybrid") for init in ("mil", "random"))
    return f"""Decode speed: batch-1 greedy generation of {new_tokens} tokens after a {context}-token prompt on
this CPU, the three models measured in turn, {n} rounds:

{table}

{said[0].upper() + said[1:]}."""


def run_hybrid_demo(run: RunDir, settings: DemoSettings, teacher: Teacher, tokenizer, data, say) -> dict:
    """Convert the teacher to a 50% Mamba2 hybrid with MIL and with random init; distil both with reverse KL."""
    n_layers = teacher.model.config.n_layers
    held_out = torch.from_numpy(data.val_windows[:8, :-1].astype("int64"))
    calibration = torch.from_numpy(data.train_windows[:8, :-1].astype("int64"))
    selection = select_layers(teacher.model, n_layers // 2, "uniform", held_out)
    selection.save(run.path / "layer_scores.json")
    say(f"hybrid: converting layers {selection.ssm_layers} of {n_layers} to Mamba2 (uniform placement)")
    out = {"ssm_layers": selection.ssm_layers, "scores": {str(k): v for k, v in selection.scores.items()}}
    # The teacher on the same held-out batches as the hybrids (the first val_batches): one set per table.
    same = evaluate_lm(teacher.model, data.val_windows, batch_size=settings.batch_size, max_batches=settings.val_batches)
    out["teacher"] = {"val_loss": same["loss"], "ppl": same["ppl"], "params": teacher.model.num_parameters()}
    trained = {}
    for init in ("mil", "random"):
        hybrid = hybridize(teacher.model, selection.ssm_layers, mixer="mamba2", init=init, d_state=16, chunk_size=64,
                           calibration=calibration)
        before = evaluate_lm(hybrid, data.val_windows, batch_size=settings.batch_size, teacher=teacher,
                             max_batches=settings.val_batches)
        cfg = _config(settings, settings.teacher, steps=settings.hybrid_steps, lr=settings.hybrid_lr,
                      loss={"kind": "reverse_kl", "kd_weight": 1.0, "ce_weight": 0.0}, teacher=True, seed=3)
        cfg.train.progress = False
        say(f"hybrid ({init} init): KL to teacher {before['kl_to_teacher']:.3f} before; distilling {settings.hybrid_steps} "
            "steps with reverse KL")
        result = _train(run, f"hybrid-{init}", cfg, tokenizer=tokenizer, data=data, teacher=teacher, student=hybrid)
        after = evaluate_lm(result.student, data.val_windows, batch_size=settings.batch_size, teacher=teacher,
                            max_batches=settings.val_batches)  # the same held-out batches as "before"
        log_final(run.path / "runs" / f"hybrid-{init}", after, None)
        save_native(result.student, run.checkpoints / f"hybrid_{init}", tokenizer=tokenizer)
        curve = [(0, before["loss"], before["kl_to_teacher"])] + [
            (h["step"], h["val_loss"], h.get("val_kl_to_teacher")) for h in result.history if "val_loss" in h]
        out[init] = {"kl_before": before["kl_to_teacher"], "kl_after": after["kl_to_teacher"], "val_loss": after["loss"],
                     "ppl": after["ppl"], "top1_agreement": after["top1_agreement"],
                     "params": result.student.num_parameters(), "steps": settings.hybrid_steps, "curve": curve}
        trained[init] = result.student
        say(f"hybrid ({init} init): KL to teacher {after['kl_to_teacher']:.3f} after, held-out loss {after['loss']:.3f}")
    size = size_difference(teacher.model, trained["mil"])
    out["size"] = {k: v for k, v in size.items() if k != "parts"}
    say(f"decode speed: teacher and both hybrids in turn, {DECODE_REPEATS} rounds")
    speeds = decode_speeds({"teacher": teacher.model, **trained}, context=settings.decode_context,
                           new_tokens=settings.decode_tokens, vocab=teacher.model.config.vocab_size)
    out["teacher_decode_tokens_per_second"] = speeds["teacher"]
    for init in trained:
        out[init]["decode_tokens_per_second"] = speeds[init]
    return out


def _speed_cell(speeds: list[float]) -> str:
    return f"{_median(speeds):,.0f} ({min(speeds):,.0f}-{max(speeds):,.0f})"


def size_sentence(size: dict) -> str:
    """The hybrid's parameters against the teacher's, and why they differ."""
    change = size["hybrid"] / size["teacher"] - 1
    return (f"The hybrid has {format_params(size['hybrid'])} parameters against the teacher's "
            f"{format_params(size['teacher'])} ({change:+.1%}): {size['why']}.")


def hybrid_section(hybrids: dict, settings: DemoSettings) -> str:
    rows = []
    for init, label in (("mil", "MIL (from attention)"), ("random", "random")):
        h = hybrids[init]
        rows.append([f"hybrid, {label}", format_params(h["params"]), f"{h['kl_before']:.4f}", f"{h['kl_after']:.4f}",
                     f"{h['val_loss']:.3f}", f"{h['top1_agreement']:.3f}"])
    t = hybrids["teacher"]
    rows.append(["teacher (all attention)", format_params(t["params"]), "0", "0", f"{t['val_loss']:.3f}", "1"])
    table = markdown_table(["model", "params", "KL to teacher before", "KL after", "held-out loss", "top-1 agreement"], rows)
    mil, rnd = hybrids["mil"], hybrids["random"]
    ending = (f"After {settings.hybrid_steps} steps the KL to the teacher is {mil['kl_after']:.4f} (MIL) against "
              f"{rnd['kl_after']:.4f} (random), from one seed each: no spread to rank them by (`distil study`'s `init` "
              "experiment runs this comparison with seeds and a verdict)")
    start_word = "closer to" if mil["kl_before"] < rnd["kl_before"] else "further from"
    return f"""## 50% hybrid: attention -> Mamba2

Layers {hybrids['ssm_layers']} of the teacher became Mamba2 mixers (state 16), placed uniformly
(one attention layer kept per bin, chosen by importance; scores in `layer_scores.json`). Each
hybrid was then distilled with reverse KL for {settings.hybrid_steps} steps. Every row, the teacher's
included, is measured on the same first {settings.val_batches} held-out batches
({settings.val_batches * settings.batch_size * settings.seq_len:,} tokens).

{table}

{ending}. Before distillation MIL started {start_word} the teacher than random init (KL
{mil['kl_before']:.4f} against {rnd['kl_before']:.4f}). In this tiny 4-layer teacher the replaced layers matter
little and a random SSM layer starts close to a no-op; the source report's 15B model found MIL much better.
{size_sentence(hybrids["size"])}

{decode_section(hybrids, context=settings.decode_context, new_tokens=settings.decode_tokens)} At these tiny sizes and
short contexts the per-token cost is dominated by the MLPs and the LM head, so the SSM's constant-size state pays
off only at long contexts (see `benchmarks/decode.py`).
"""


def verdict(results: dict, tolerance: float = 0.02) -> str:
    """Which student, if any, beat CE-only on held-out loss, by the study's rule
    (:func:`distil.eval.compare.judge`: every seed, beyond 2 standard errors of the paired
    differences and beyond ``tolerance`` of CE's loss). With one seed, or inside the spread, no
    student is ranked."""
    ce = results["ce"]
    students = [k for k in results if k not in ("teacher", "ce")]

    def losses(row):
        return row.get("per_seed", {}).get("val_loss") or [row["val_loss"]]

    verdicts = {k: judge(losses(results[k]), losses(ce), tolerance=tolerance, a_label=results[k]["label"],
                         b_label="CE-only") for k in students}
    n = len(losses(ce))
    means = ", ".join(f"{results[k]['label']} {results[k]['val_loss']:.3f}" for k in ["ce", *students])
    seeds = f"{n} seed{'s' if n > 1 else ''}"
    pairs = "; ".join(f"{results[k]['label']} against CE-only: {v['why']}" for k, v in verdicts.items())
    winners = [k for k, v in verdicts.items() if v["rule"] == "better"]
    if winners:
        best = min(winners, key=lambda k: results[k]["val_loss"])
        gain = ce["val_loss"] - results[best]["val_loss"]
        head = (f"The **{results[best]['label']}** student beat CE-only: held-out loss {results[best]['val_loss']:.3f} "
                f"against {ce['val_loss']:.3f}, {gain:.3f} nats ({100 * gain / ce['val_loss']:.1f}%) better with the same "
                f"size, data and steps, on every one of {seeds}.")
    elif all(v["rule"] == "opposite" for v in verdicts.values()):
        head = (f"Distillation did **not** beat CE-only here: CE-only was better than every distilled student on every "
                f"one of {seeds} (held-out loss {means}).")
    elif n < 2:
        head = (f"No student is ranked: one seed gives no run-to-run spread to measure a difference against "
                f"(held-out loss {means}).")
    else:
        head = (f"No student is ranked: none beat CE-only on every one of {seeds} by more than the seed-to-seed "
                f"spread and {tolerance:.0%} of its loss (held-out loss {means}).")
    return f"{head} Judged per pair, paired by seed: {pairs}."


def standing(results: dict, vocab: int) -> str:
    """Where each model stands between a uniform guess (ln V nats) and the teacher: the share of
    that gap its held-out loss closed; a model under half is closer to guessing than to the teacher."""
    uniform, teacher = math.log(vocab), results["teacher"]["val_loss"]
    parts, near = [], []
    for key, row in results.items():
        if key == "teacher":
            continue
        share = (uniform - row["val_loss"]) / (uniform - teacher)
        parts.append(f"{row['label']} {share:.0%}")
        if share < 0.5:
            near.append(row["label"])
    text = (f"Share of the gap from a uniform guess (ln {vocab:,} = {uniform:.2f} nats) to the teacher "
            f"({teacher:.3f}) that each student's held-out loss closed: {', '.join(parts)}.")
    if near:
        text += f" Closer to a uniform guess than to the teacher: {', '.join(near)}."
    return text


def mc_cell(row: dict) -> str:
    """An MC accuracy, marked when it cannot be told from chance (:func:`distil.eval.compare.mc_chance`)."""
    return f"{row['mc_acc']:.3f}" + (" (chance)" if mc_chance(row["mc_acc"], row["mc_items"]) else "")


def mc_sentence(rows: list[dict]) -> str:
    n = rows[0]["mc_items"]
    bound = 2 * math.sqrt(0.25 * 0.75 / max(n, 1))
    at_chance = [r["label"] for r in rows if mc_chance(r["mc_acc"], r["mc_items"])]
    if not at_chance:
        return f"Every model scores above chance on MC (beyond 0.25 + 2 binomial SE = {0.25 + bound:.3f} at {n} items)."
    return (f"Marked *(chance)*: an MC accuracy at or below 0.25 + 2 binomial SE ({0.25 + bound:.3f} at {n} items), "
            f"which guessing reaches: {', '.join(at_chance)}. Those MC numbers rank nothing.")


def demo_plots(settings: DemoSettings, results: dict, histories: dict, hybrids: dict | None) -> dict:
    """Every plot of the report: file name -> :func:`plot_curves` arguments. The teacher is a
    reference level in each one (held-out loss on the curves' own batches; divergence 0), and the
    hybrids sit next to the students."""
    window = max(1, settings.student_steps // 20)
    label = {k: results[k]["label"] for k in results}

    def train_curve(key):
        hist = histories[key]
        return list(zip([h["step"] for h in hist], smooth([h["loss"] for h in hist], window)))

    subset = f"first {settings.val_batches} held-out batches"
    plots = {
        "train_loss_ce.png": dict(series={"teacher (its own training run)": train_curve("teacher"),
                                          label["ce"]: train_curve("ce")},
                                  title="Training loss (CE objective)", ylabel="CE loss"),
        "train_loss_kd.png": dict(series={label[k]: train_curve(k) for k in ("forward_kl", "reverse_kl")},
                                  title="Training loss (KD objective)", ylabel="divergence",
                                  hlines={"teacher (divergence 0)": 0.0}),
    }
    val = {label[k]: [(h["step"], h["val_loss"]) for h in histories[k] if "val_loss" in h] for k in histories
           if k != "teacher"}
    kl = {label[k]: [(h["step"], h["val_kl_to_teacher"]) for h in histories[k] if "val_kl_to_teacher" in h]
          for k in ("forward_kl", "reverse_kl", "ce") if k in histories}
    refs = {}
    if hybrids:
        for init in ("mil", "random"):
            val[f"50% hybrid, {init} init"] = [(x, y) for x, y, _ in hybrids[init]["curve"]]
            kl[f"50% hybrid, {init} init"] = [(x, k) for x, _, k in hybrids[init]["curve"] if k is not None]
        refs = {f"teacher ({subset})": hybrids["teacher"]["val_loss"]}
    plots["val_loss.png"] = dict(series=val, title=f"Held-out loss during training ({subset})", ylabel="CE loss",
                                 markers=True, hlines=refs)
    plots["kl_to_teacher.png"] = dict(series=kl, title=f"KL(teacher‖model) during training ({subset})",
                                      ylabel="KL (nats)", markers=True, logy=True, hlines={"teacher (0)": 0.0})
    return plots


def write_report(run: RunDir, settings: DemoSettings, results: dict, histories: dict, *, quick: bool, seconds: float,
                 hybrids: dict | None = None, vocab: int | None = None) -> Path:
    def per_seed(row):
        values = row.get("per_seed", {}).get("val_loss", [])
        return " / ".join(f"{v:.3f}" for v in values) if len(values) > 1 else "-"

    rows = []
    for r in results.values():
        rows.append([
            r["label"], format_params(r["params"]), r["steps"], f"{r['val_loss']:.3f}", per_seed(r), f"{r['ppl']:.1f}",
            "-" if r["kl_to_teacher"] is None else f"{r['kl_to_teacher']:.3f}",
            "-" if r["top1_agreement"] is None else f"{r['top1_agreement']:.3f}",
            mc_cell(r), f"{r['mc_acc_norm']:.3f}", f"{r['tokens_per_second']:,.0f}",
        ])
    table = markdown_table(
        ["model", "params", "steps", "held-out loss", "per seed", "ppl", "KL(teacher‖model)", "top-1 agreement",
         "MC acc", "MC acc_norm", "train tokens/s"], rows)
    plots = demo_plots(settings, results, histories, hybrids)
    for filename, spec in plots.items():
        plot_curves(path=run.plots / filename, **spec)
    images = "\n".join(f"![{spec['title']}](plots/{filename})" for filename, spec in plots.items())
    vocab = vocab or settings.vocab_size
    text = f"""# distil demo report

{verdict(results)}

{standing(results, vocab)}

Mode: {"quick" if quick else "full"}; total time {seconds:.0f}s on {torch.get_num_threads()} CPU threads.
Corpus: the embedded Python documentation and stdlib docstrings, split by document into training
and held-out documents (5% held out); a {settings.vocab_size}-token byte-level BPE trained on the training side.

Teacher {settings.teacher[0]}-d × {settings.teacher[1]} layers trained {settings.teacher_steps} steps.
Students {settings.student[0]}-d × {settings.student[1]} layers, each {settings.student_steps} steps of
{settings.batch_size} × {settings.seq_len} tokens; {settings.seeds} seed(s) each, and seed i gives all three
students the same initialisation and the same batches; temperature {settings.temperature}. Student rows are means
over the seeds (held-out loss per seed beside it).

{table}

*Held-out loss* is next-token cross-entropy on all held-out windows ({results["teacher"]["val_tokens"]:,} tokens; lower is
better). The curves below are measured during training on the first {settings.val_batches} held-out batches
({settings.val_batches * settings.batch_size * settings.seq_len:,} tokens), the teacher's level drawn on the same batches,
so their last points differ a little from the table.
*MC* is a {results["teacher"]["mc_items"]}-item multiple-choice task built from held-out text (as scored; {settings.mc_items}
were asked for, and documents too short for an item give none): pick the
true next passage among 4, scored by summed log-likelihood (acc) and per-byte log-likelihood
(acc_norm), the way HellaSwag is scored. Random chance is 0.25. {mc_sentence(list(results.values()))}

{images}

{hybrid_section(hybrids, settings) if hybrids else ""}
Raw numbers: `results.json` (the table), `histories.json` (every model's per-step training loss and
validation), `runs/<model>/` (each model's own run folder: config, every logged step in
`metrics.jsonl` with the final numbers as eval rows, report, final checkpoint; `distil report runs/*`
compares them), `metrics.jsonl` here (the final numbers as metric rows) and `summary.json`.
"""
    run.write_text("report.md", text)
    run.write_text("results.json", json.dumps(results, indent=2))
    run.write_text("histories.json", json.dumps(histories, indent=1))
    return run.path / "report.md"
