"""``distil train`` as a function: the run folder's life around training.

    outcome = run_training(cfg, "runs/debug", overwrite=False, resume=False)
    outcome.result.val, outcome.report             # plain training: TrainResult, report.md
    outcome.stages                                 # hybrid.stages set: one record per stage

The folder is created (or reopened to resume from its latest checkpoint), the config is saved in
it, training runs (staged when ``hybrid.stages`` is set), and at the end the report and
``summary.json`` are written; a run is complete only once ``summary.json`` exists. See
``run_training`` for reruns, locks and runs stopped before their first checkpoint.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from distil.config import Config, config_to_yaml
from distil.errors import DistilError
from distil.fsutil import first_missing
from distil.run_dir import RunDir, RunLock, remove_stale_temps, run_state
from distil.train.distributed import barrier, init_distributed
from distil.train.loop import TrainResult, train
from distil.train.report import write_run_report
from distil.train.stages import has_stages, train_in_stages

log = logging.getLogger("distil")


@dataclass
class RunOutcome:
    run_dir: Path
    result: TrainResult | None = None  # plain training (None for a staged run)
    stages: list[dict] | None = None  # staged hybrid conversion: one record per stage
    report: Path | None = None


# Keys that change nothing a run computes: a rerun may differ in them.
_NEUTRAL = ("output.", "train.progress", "data.num_workers", "train.threads")


def config_differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """``section.key: old -> new`` for every key whose value differs (neutral keys left out)."""
    out = []
    for key in sorted(set(saved) | set(now)):
        dotted = f"{prefix}{key}"
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, dotted + ".")
        elif a != b and not dotted.startswith(_NEUTRAL):
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out


def _saved_differences(run_path: Path, cfg: Config) -> list[str]:
    saved = run_path / "config.yaml"
    if not saved.is_file():
        return []
    try:
        before = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        return ["config.yaml: unreadable"]
    return config_differences(before, cfg.to_dict())


def run_training(cfg: Config, run_dir: str | Path | None = None, *, overwrite: bool = False, resume: bool = False,
                 **prepared) -> RunOutcome:
    """Train ``cfg`` into ``run_dir`` (default ``output.run_dir/output.name``). ``prepared`` objects
    (``teacher``, ``tokenizer``, ``data``, ``student``, ``desc``, ``val_teacher``) go to ``train()`` instead of being
    built from the config: the demos train several models on one prepared dataset this way.

    * a finished run (summary.json) is left alone: the same config is "nothing to do" (no error),
      another config is an error listing the differing keys, unless ``overwrite`` (train again) or
      ``resume`` (continue from its last checkpoint, e.g. with more steps);
    * a folder with a checkpoint resumes from it (``resume=True`` insists on one);
    * a run folder killed before its first checkpoint starts again from scratch;
    * another folder is refused unless ``overwrite``;
    * one live process per folder (``.lock``); a failure before the first checkpoint leaves no
      folder behind; temporary files a killed writer left are removed."""
    info = init_distributed(cfg.train.device)
    run_path = Path(run_dir) if run_dir else Path(cfg.output.run_dir) / (cfg.output.name or "run")
    if run_path.exists() and not run_path.is_dir():
        raise DistilError(f"--run-dir {run_path} is a file; give a folder")
    overwrite = overwrite or cfg.output.overwrite
    staged = bool(cfg.hybrid.stages)
    lock = RunLock(run_path)
    lock.check()
    state = run_state(run_path)
    barrier(info)  # every rank has read the folder before rank 0 changes it
    created = None
    if state == "complete" and not overwrite:
        if not resume:
            return _finished(run_path, cfg, info)
        state = "resumable"  # --resume on a finished run: continue from its last checkpoint (e.g. more steps)
    can_resume = not overwrite and (state == "resumable" or (staged and run_path.is_dir() and has_stages(run_path)))
    if resume and not can_resume:
        raise DistilError(f"--resume: {run_path} has no checkpoint to resume from")
    if staged and prepared:
        raise DistilError("a staged run (hybrid.stages) builds its models from the config; pass no prepared objects")
    if info.is_main:
        if state == "unstarted" and not can_resume:
            log.info("%s has no checkpoint (stopped before its first one): starting it again", run_path)
        if state == "foreign" and not overwrite:
            raise DistilError(f"run folder {run_path} already exists and is not a distil run; choose another "
                              "--run-dir or name, or pass --overwrite (or --set output.overwrite=true) to replace it")
        created = first_missing(run_path)  # what to remove if the run stops before its first checkpoint
        run = RunDir.create(run_path, overwrite=overwrite or state == "unstarted", resume=can_resume)
        lock.acquire()
        if can_resume:
            for stale in remove_stale_temps(run.path):
                log.info("removed %s (left by a killed writer)", stale)
            if differences := _saved_differences(run.path, cfg):
                log.warning("resuming with a config that differs from the one this run started with: %s",
                            "; ".join(differences[:8]))
        else:
            run.write_text("config.yaml", config_to_yaml(cfg))
        if cfg.output.tensorboard or cfg.output.wandb_project:
            run.add_sinks(tensorboard=cfg.output.tensorboard, wandb_project=cfg.output.wandb_project,
                          config=cfg.to_dict())
    barrier(info)
    if not info.is_main:
        run = RunDir(run_path)  # other ranks read checkpoints; only rank 0 writes
    try:
        if staged:
            _, records = train_in_stages(cfg, run)
        else:
            result = train(cfg, run=run, resume=can_resume, **prepared)
    except BaseException:
        run.close()
        lock.release()
        if info.is_main and not can_resume and run_state(run.path) == "unstarted" and not (
                staged and has_stages(run.path)):
            # stopped before its first checkpoint: leave nothing behind (not even the parents it made)
            shutil.rmtree(created or run.path, ignore_errors=True)
        raise
    try:
        return _complete(run, cfg, info, staged, records if staged else None, None if staged else result)
    finally:
        lock.release()


def _finished(run_path: Path, cfg: Config, info) -> RunOutcome:
    """A rerun of a finished run: nothing to do, unless the config changed (then an error)."""
    if differences := _saved_differences(run_path, cfg):
        raise DistilError(f"{run_path} is a finished run made with another config ({'; '.join(differences[:6])}); "
                          "pass --resume to continue it with this config, --overwrite to train it again, or choose "
                          "another --run-dir")
    if info.is_main:
        log.info("%s is already complete (summary.json): nothing to do; pass --overwrite to train it again",
                 run_path)
    report = run_path / "report.md"
    return RunOutcome(run_path, report=report if report.is_file() else None)


def _complete(run: RunDir, cfg: Config, info, staged: bool, records, result) -> RunOutcome:
    if staged:
        if info.is_main:
            last = records[-1]
            run.mark_complete({"stages": records, "final_val": last["after"]})
            log.info("done: %d stage(s), pattern %s, held-out loss %.4f; run folder %s; report %s", len(records),
                     last["pattern"], last["after"]["loss"], run.path, run.path / "report.md")
        return RunOutcome(run.path, stages=records, report=run.path / "report.md")
    report = None
    if info.is_main:
        report = write_run_report(run, cfg, result)
        run.mark_complete({"final_val": result.val, "steps": result.history[-1]["step"] if result.history else 0,
                           "tokens_per_second": result.tokens_per_second, "params": result.student.num_parameters()})
        log.info("done: held-out loss %.4f; run folder %s; report %s", result.val.get("loss", float("nan")), run.path,
                 report)
    return RunOutcome(run.path, result=result, report=report)
