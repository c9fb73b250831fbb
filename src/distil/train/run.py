"""``distil train`` as a function: the run folder's life around training.

    outcome = run_training(cfg, "runs/debug", overwrite=False, resume=False)
    outcome.result.val, outcome.report             # plain training: TrainResult, report.md
    outcome.stages                                 # hybrid.stages set: one record per stage

The folder is created (or reopened to resume from its latest checkpoint), the config is saved in
it, training runs (staged when ``hybrid.stages`` is set), and at the end the report and
``summary.json`` are written; a run is complete only once ``summary.json`` exists. Bad input
before the first step leaves no folder behind.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from distil.config import Config, config_to_yaml
from distil.errors import DistilError
from distil.run_dir import RunDir
from distil.train.checkpoint import latest_checkpoint
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


def run_training(cfg: Config, run_dir: str | Path | None = None, *, overwrite: bool = False,
                 resume: bool = False) -> RunOutcome:
    """Train ``cfg`` into ``run_dir`` (default ``output.run_dir/output.name``). An existing folder is
    resumed from its latest checkpoint, refused without one, or replaced with ``overwrite``;
    ``resume=True`` insists on a checkpoint to resume from."""
    info = init_distributed(cfg.train.device)
    run_path = Path(run_dir) if run_dir else Path(cfg.output.run_dir) / (cfg.output.name or "run")
    existed = run_path.exists()
    overwrite = overwrite or cfg.output.overwrite
    staged = bool(cfg.hybrid.stages)
    if staged:
        can_resume = not overwrite and run_path.exists() and has_stages(run_path)
    else:
        can_resume = not overwrite and latest_checkpoint(run_path / "checkpoints") is not None
    if resume and not can_resume:
        raise DistilError(f"--resume: {run_path} has no checkpoint to resume from")
    if info.is_main:
        run = RunDir.create(run_path, overwrite=overwrite, resume=can_resume)
        if not can_resume:
            run.write_text("config.yaml", config_to_yaml(cfg))
        elif (run.path / "config.yaml").is_file() and (run.path / "config.yaml").read_text() != config_to_yaml(cfg):
            log.warning("the config differs from the one this run started with (%s)", run.path / "config.yaml")
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
            result = train(cfg, run=run, resume=can_resume)
    except DistilError:
        run.close()
        started = run.metrics_path.exists() or (staged and has_stages(run.path))
        if info.is_main and not existed and not started:
            shutil.rmtree(run.path, ignore_errors=True)  # bad input before the first step: leave nothing behind
        raise
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
