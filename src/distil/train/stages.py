"""``distil train`` with a ``hybrid:`` section: attention -> SSM conversion in stages, each distilled.

    distil train configs/hybrid-progressive.yaml      # hybrid.stages: [1, 5, 25, 45]

The model converted is ``student.path``, else the teacher's checkpoint, loaded again in float32 (the
teacher itself stays frozen, in its own dtype). For uniform / importance placement the attention
layers are scored once, on held-out windows of that model, and the scores saved. Each stage then
builds its student from the previous stage's trained one (trained SSM layers carry over, new ones
start from MIL or at random; :func:`distil.hybrid.progressive.convert_progressively`) and runs the
ordinary training loop on it for ``train.steps`` steps with the config's loss, in its own folder:

    runs/<name>/
      config.yaml  layer_scores.json  stages.json  report.md  plots/stages.png
      stage-1/ stage-2/ ...   ordinary run folders: metrics.jsonl, checkpoints/, report.md
      checkpoints/final       the last stage's model, with its tokenizer

A stage whose folder is complete is not trained again (its final model is loaded) and a stage cut
off half-way resumes from its last checkpoint, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import shutil

import torch

from distil.charts import markdown_table, plot_curves
from distil.errors import DistilError
from distil.eval.perplexity import evaluate_lm
from distil.fsutil import atomic_path, atomic_write_text
from distil.hybrid.align import AlignState, align_layers
from distil.hybrid.placement import layer_scores
from distil.hybrid.progressive import convert_progressively
from distil.models import load
from distil.models.io import save_native
from distil.run_dir import RunDir
from distil.train.checkpoint import latest_checkpoint
from distil.train.distributed import barrier, init_distributed
from distil.train.loop import TrainResult, check_vocabularies, prepare, train
from distil.train.report import write_run_report

log = logging.getLogger("distil")


def has_stages(run_path) -> bool:
    """Whether a staged run was started in this folder (so ``distil train`` continues it)."""
    return any(run_path.glob("stage-*/metrics.jsonl")) or (run_path / "layer_scores.json").is_file()


def _scores(cfg, run: RunDir, base, data, info, device) -> dict[int, float] | None:
    h = cfg.hybrid
    if h.layers is not None or h.placement not in ("uniform", "importance"):
        return None
    saved = run.path / "layer_scores.json"
    if saved.is_file():  # a continued run keeps the placement it started with
        return {int(k): v for k, v in json.loads(saved.read_text())["scores"].items()}
    held_out = torch.from_numpy(data.val_windows[: h.score_samples, :-1].astype("int64")).to(device)
    scores = None
    if info.is_main or not torch.distributed.is_initialized():
        log.info("scoring %d attention layers on %d held-out windows (%s)", base.config.pattern.count("A"),
                 len(held_out), h.score)
        scores = layer_scores(base, held_out, score=h.score, mixer=h.mixer, d_state=h.d_state, expand=h.expand, width=h.width,
                              chunk_size=h.chunk_size, batch_size=cfg.train.batch_size)
    if torch.distributed.is_initialized():  # every process must convert the same layers
        box = [scores]
        torch.distributed.broadcast_object_list(box, src=0)
        scores = box[0]
    if info.is_main:
        atomic_write_text(saved, json.dumps({"score": h.score, "mixer": h.mixer, "d_state": h.d_state,
                                             "scores": {str(k): v for k, v in scores.items()}}, indent=2))
    return scores


def _align_stage(cfg, run: RunDir, student, base, data, layers: list[int], info, device) -> dict:
    """Stage 2 before the stage's KD: align ``layers`` of ``student`` to ``base``'s attention there
    (distil.hybrid.align); the state is saved in the stage folder, so a killed run resumes it exactly.
    Each layer's loss goes to the stage's metrics.jsonl (split ``align``) and plots/alignment.png."""
    a = cfg.hybrid.align
    state_file = run.path / "align_state.pt"
    state = AlignState.from_state_dict(torch.load(state_file, weights_only=False)) if state_file.is_file() else None

    def save(current: AlignState) -> None:
        if info.is_main:
            with atomic_path(state_file) as tmp:
                torch.save(current.state_dict(), tmp)

    tokens = torch.from_numpy(data.train_windows[: a.samples, :-1].astype("int64"))
    if info.is_main:
        log.info("aligning layers %s to the attention they replace: %d steps each (%s)", layers, a.steps, a.loss)
    result = align_layers(student.to(device), base, tokens, layers=layers, steps=a.steps, lr=a.lr, loss=a.loss,
                          batch_size=a.batch_size, seed=cfg.train.seed, state=state, checkpoint_every=a.checkpoint_every,
                          on_checkpoint=save, progress=cfg.train.progress and info.is_main)
    if info.is_main:
        for layer, losses in result.history.items():
            for step, value in enumerate(losses, 1):
                run.log(step=step, tokens=0, split="align", name=f"layer_{layer}", value=value)
        plot_curves({f"layer {layer}": list(enumerate(losses, 1)) for layer, losses in result.history.items()},
                    run.plots / "alignment.png", title=f"Alignment loss ({a.loss}) per new layer",
                    xlabel="alignment step", ylabel=a.loss, logy=a.loss != "cosine")
    return {"layers": layers, "steps": a.steps, "loss": a.loss,
            "first": {str(k): v[0] for k, v in result.history.items() if v},
            "final": {str(k): v for k, v in result.final().items()}}


def _open_stage(path, info) -> RunDir:
    """The stage's run folder, kept when it holds a checkpoint to resume from, else made afresh."""
    if info.is_main:
        keep = latest_checkpoint(path / "checkpoints") is not None
        if path.exists() and not keep:
            shutil.rmtree(path)  # cut off before its first checkpoint: nothing to resume
        RunDir.create(path, resume=keep)
    barrier(info)
    return RunDir(path)


def train_in_stages(cfg, run: RunDir) -> tuple[TrainResult | None, list[dict]]:
    """Run ``cfg.hybrid.stages`` (see the module docstring). Returns the last stage's training result
    (None when every stage had already finished) and one record per stage."""
    h = cfg.hybrid
    info = init_distributed(cfg.train.device)
    device = info.device
    base_path = cfg.student.path or cfg.teacher.path
    base = load(base_path, device=device).eval()
    attention = base.config.pattern.count("A")
    if h.stages[-1] > attention:
        raise DistilError(f"hybrid.stages ends at {h.stages[-1]} SSM layers but {base_path} has {attention} "
                          "attention layers to convert")
    if h.layers is not None and max(h.layers) >= base.config.n_layers:
        raise DistilError(f"hybrid.layers {h.layers} are out of range for the {base.config.n_layers}-layer {base_path}")
    teacher, tokenizer, data = prepare(cfg, run, info=info)
    check_vocabularies(tokenizer, base.config.vocab_size, teacher.vocab_size if teacher is not None else None)
    scores = _scores(cfg, run, base, data, info, device)
    records: list[dict] = []
    last: list[TrainResult] = []
    n = len(h.stages)
    converted: set[int] = set()  # layers converted by earlier stages (already aligned and distilled)

    def distil_stage(student, selection):
        k = len(records) + 1
        path = run.path / f"stage-{k}"
        record = {"stage": k, "num_ssm": len(selection.ssm_layers), "ssm_layers": selection.ssm_layers,
                  "pattern": student.config.pattern}
        if (path / "summary.json").is_file():
            done = json.loads((path / "summary.json").read_text())
            records.append(done["stage"])
            converted.update(selection.ssm_layers)
            if info.is_main:
                log.info("stage %d/%d (%d SSM layers) already done: loading %s", k, n, record["num_ssm"], path)
            return load(path / "checkpoints" / "final", device=device)
        before = evaluate_lm(student.to(device), data.val_windows, batch_size=cfg.train.batch_size,
                             max_batches=cfg.eval.val_batches, teacher=teacher, device=device)
        if info.is_main:
            log.info("stage %d/%d: %d SSM layers %s, pattern %s; held-out loss %.4f before training", k, n,
                     record["num_ssm"], selection.ssm_layers, student.config.pattern, before["loss"])
        stage_run = _open_stage(path, info)
        new_layers = [i for i in selection.ssm_layers if i not in converted]
        if h.align.steps and latest_checkpoint(stage_run.checkpoints) is None:  # KD not started: align first
            record["align"] = _align_stage(cfg, stage_run, student, base, data, new_layers, info, device)
            aligned = evaluate_lm(student.to(device), data.val_windows, batch_size=cfg.train.batch_size,
                                  max_batches=cfg.eval.val_batches, teacher=teacher, device=device)
            record["after_align"] = {key: v for key, v in aligned.items() if key != "tokens"}
        converted.update(selection.ssm_layers)
        result = train(cfg, run=stage_run, teacher=teacher, tokenizer=tokenizer, data=data, student=student,
                       desc=f"stage {k}/{n} ({record['num_ssm']} SSM)")
        record.update({"before": {key: v for key, v in before.items() if key != "tokens"},
                       "after": {key: v for key, v in result.val.items() if key != "tokens"},
                       "steps": cfg.train.steps, "tokens_per_second": result.tokens_per_second})
        if info.is_main:
            write_run_report(stage_run, cfg, result)
            stage_run.mark_complete({"stage": record})
        barrier(info)
        records.append(record)
        last[:] = [result]
        return result.student

    # MIL calibrates on training windows (the layer scores used held-out ones).
    calibration = torch.from_numpy(data.train_windows[: h.score_samples, :-1].astype("int64")).to(device)
    stages = convert_progressively(
        base, h.stages, distil_stage, strategy=h.layers if h.layers is not None else h.placement,
        mixer=h.mixer, d_state=h.d_state, init=h.init, scores=scores, expand=h.expand, width=h.width, chunk_size=h.chunk_size,
        calibration=calibration)
    final = stages[-1].model
    if info.is_main:
        save_native(final, run.checkpoints / "final", tokenizer=tokenizer, overwrite=True)
        atomic_write_text(run.path / "stages.json", json.dumps(records, indent=2))
        write_stages_report(run, cfg, records)
    barrier(info)
    return (last[0] if last else None), records


def write_stages_report(run: RunDir, cfg, records: list[dict]):
    h = cfg.hybrid
    metric = "kl_to_teacher" if all("kl_to_teacher" in r["after"] for r in records) else "loss"
    label = "KL to the teacher" if metric == "kl_to_teacher" else "held-out loss"
    plot_curves({f"{label}, new layers just converted": [(r["num_ssm"], r["before"][metric]) for r in records],
                 f"{label}, after distilling": [(r["num_ssm"], r["after"][metric]) for r in records]},
                run.plots / "stages.png", title=f"{label} by stage", xlabel="SSM layers", ylabel=label, markers=True)
    aligned = any("after_align" in r for r in records)
    rows = [[r["stage"], r["num_ssm"], f"`{r['pattern']}`", f"{r['before'][metric]:.4f}",
             *([f"{r['after_align'][metric]:.4f}" if "after_align" in r else "-"] if aligned else []),
             f"{r['after'][metric]:.4f}", f"{r['after']['loss']:.4f}", r["steps"]] for r in records]
    placement = f"explicit layers {h.layers}" if h.layers is not None else f"{h.placement} placement"
    align_note = (f'"after alignment" is once each new layer\'s mixer was trained alone to reproduce the attention '
                  f"it replaced ({h.align.steps} {h.align.loss} steps a layer; curves in stage-N/plots/alignment.png); "
                  if aligned else "")
    text = f"""# Run {run.path.name}: attention -> {h.mixer} in {len(records)} stage(s)

Model converted: {cfg.student.path or cfg.teacher.path}. Stages {h.stages} SSM layers, {placement},
d_state {h.d_state}, new layers initialised {"from attention (MIL)" if h.init == "mil" else "at random"};
each stage trained {cfg.train.steps} steps with {cfg.loss.kind} (KD weight {cfg.loss.kd_weight}, CE weight
{cfg.loss.ce_weight}){", SSM layers only" if cfg.student.train_only_ssm else ""}.

{markdown_table(["stage", "SSM layers", "pattern (A attention, M Mamba2, D discrete)", f"{label} before",
                 *([f"{label} after alignment"] if aligned else []), f"{label} after", "held-out loss after", "steps"],
                rows)}

![{label} by stage](plots/stages.png)

"Before" is the stage's student as converted (earlier stages' layers trained, the new ones just
initialised); {align_note}"after" is the same held-out batches once the stage is distilled. Each stage's own
report, curves and checkpoints are in `stage-N/`; the layer scores in `layer_scores.json`; the last
stage's model in `checkpoints/final`.
"""
    return run.write_text("report.md", text)
