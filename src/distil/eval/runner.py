"""``distil eval``: load a model and its tokenizer, run the requested evaluations, return a dict.

    result = run_eval("runs/kl/checkpoints/final", data="held_out.jsonl", mc="hellaswag.jsonl")
    # {"model": ..., "lm": {"loss": ..., "ppl": ...}, "multiple_choice": {"acc": ..., "acc_norm": ...}}
"""

from __future__ import annotations

from pathlib import Path

from distil.config import DataConfig
from distil.data.corpus import load_documents
from distil.data.packing import concat_windows
from distil.data.tokenize import bos_id, has_tokenizer, load_tokenizer, tokenize_documents
from distil.errors import DistilError
from distil.eval.lm_eval_adapter import run_lm_eval
from distil.eval.multiple_choice import load_items, score_multiple_choice
from distil.eval.perplexity import evaluate_lm
from distil.run_dir import RunDir
from distil.teachers import ModelTeacher, load_teacher


def run_eval(model: str | Path, *, data: str | Path | None = None, mc: str | Path | None = None,
             lm_eval: str | None = None, teacher: str | Path | None = None, tokenizer: str | Path | None = None,
             text_field: str = "text", seq_len: int = 512, batch_size: int = 8, num_fewshot: int = 0,
             lm_eval_include: str | None = None, limit: int | None = None, run: str | Path | None = None) -> dict:
    """Held-out loss / perplexity on ``data`` (a .txt or .jsonl file; KL and top-1 agreement with
    ``teacher`` too), multiple choice on ``mc``, lm-evaluation-harness ``lm_eval`` tasks
    (comma-separated); with ``run`` the numbers are appended to that run's metrics."""
    if not data and not mc and not lm_eval:
        raise DistilError("nothing to evaluate: give --data (loss/perplexity), --mc (multiple choice) or --lm-eval TASKS")
    if run and not Path(run).is_dir():  # checked before the work, so none of it is lost
        raise DistilError(f"run folder not found: {run}")
    for flag, path in (("--data", data), ("--mc", mc)):  # named as the user typed them, before the model loads
        if path and not Path(path).is_file():
            raise DistilError(f"{flag} {path}: no such file")
    # distil's own model where the family is native (distil.models.families, distil checkpoints),
    # any other causal LM through transformers: held-out loss, KL and multiple choice work for both.
    loaded = load_teacher(model)
    lm = loaded.model.eval()
    logits_fn = None if isinstance(loaded, ModelTeacher) else loaded.logits
    tokenizer_path = tokenizer or model
    if not has_tokenizer(tokenizer_path):
        raise DistilError(f"no tokenizer in {tokenizer_path}; pass --tokenizer DIR")
    tok = load_tokenizer(tokenizer_path)
    result: dict = {"model": str(model)}
    if data:
        path = Path(data)
        source = "jsonl" if path.suffix == ".jsonl" else "text"
        docs = load_documents(DataConfig(source=source, path=str(path), text_field=text_field))
        windows, _ = concat_windows(tokenize_documents(tok, docs), seq_len, bos=bos_id(tok))
        result["lm"] = evaluate_lm(lm, windows, batch_size=batch_size, logits_fn=logits_fn,
                                   teacher=load_teacher(teacher) if teacher else None, progress=True)
    if mc:
        result["multiple_choice"] = score_multiple_choice(lm, tok, load_items(mc), num_fewshot=num_fewshot,
                                                          batch_size=batch_size, progress=True, logits_fn=logits_fn)
    if lm_eval:
        tasks = [t.strip() for t in lm_eval.split(",") if t.strip()]
        raw = run_lm_eval(model, tasks, num_fewshot=num_fewshot or None, include_path=lm_eval_include, limit=limit,
                          batch_size=batch_size)
        result["lm_eval"] = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                             for task, metrics in raw.items()}
    if run:
        folder = RunDir(run)
        for group in ("lm", "multiple_choice"):
            for name, value in result.get(group, {}).items():
                if isinstance(value, (int, float)):
                    folder.log(step=-1, tokens=0, split="eval", name=f"{group}/{name}", value=value)
        for task, metrics in result.get("lm_eval", {}).items():
            for name, value in metrics.items():
                folder.log(step=-1, tokens=0, split="eval", name=f"lm_eval/{task}/{name}", value=value)
        folder.close()
    return result
