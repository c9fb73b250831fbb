"""``distil eval``: load a model and its tokenizer, run the requested evaluations, return a dict."""

from __future__ import annotations

from pathlib import Path

from distil.errors import DistilError


def run_eval(args) -> dict:
    from distil.data.corpus import load_documents
    from distil.data.packing import concat_windows
    from distil.data.tokenize import has_tokenizer, load_tokenizer, tokenize_documents
    from distil.eval.multiple_choice import load_items, score_multiple_choice
    from distil.eval.perplexity import evaluate_lm
    from distil.models import load
    from distil.run_dir import RunDir

    if not args.data and not args.mc and not args.lm_eval:
        raise DistilError("nothing to evaluate: give --data (loss/perplexity), --mc (multiple choice) or --lm-eval TASKS")
    model = load(args.model).eval()
    tokenizer_path = args.tokenizer or args.model
    if not has_tokenizer(tokenizer_path):
        raise DistilError(f"no tokenizer in {tokenizer_path}; pass --tokenizer DIR")
    tokenizer = load_tokenizer(tokenizer_path)
    result: dict = {"model": str(args.model)}
    if args.data:
        from types import SimpleNamespace

        path = Path(args.data)
        source = "jsonl" if path.suffix == ".jsonl" else "text"
        docs = load_documents(SimpleNamespace(source=source, path=str(path), text_field=args.text_field, max_docs=None))
        windows, _ = concat_windows(tokenize_documents(tokenizer, docs), args.seq_len)
        teacher = None
        if args.teacher:
            from distil.teachers import load_teacher

            teacher = load_teacher(args.teacher)
        result["lm"] = evaluate_lm(model, windows, batch_size=args.batch_size, teacher=teacher, progress=True)
    if args.mc:
        items = load_items(args.mc)
        result["multiple_choice"] = score_multiple_choice(model, tokenizer, items, num_fewshot=args.num_fewshot,
                                                          batch_size=args.batch_size, progress=True)
    if args.lm_eval:
        from distil.eval.lm_eval_adapter import run_lm_eval

        tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
        raw = run_lm_eval(args.model, tasks, num_fewshot=args.num_fewshot or None, include_path=args.lm_eval_include,
                          limit=args.limit, batch_size=args.batch_size)
        result["lm_eval"] = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                             for task, metrics in raw.items()}
    if args.run:
        run = RunDir(args.run)
        if not run.path.is_dir():
            raise DistilError(f"run folder not found: {args.run}")
        for group in ("lm", "multiple_choice"):
            for name, value in result.get(group, {}).items():
                if isinstance(value, (int, float)):
                    run.log(step=-1, tokens=0, split="eval", name=f"{group}/{name}", value=value)
        for task, metrics in result.get("lm_eval", {}).items():
            for name, value in metrics.items():
                run.log(step=-1, tokens=0, split="eval", name=f"lm_eval/{task}/{name}", value=value)
        run.close()
    return result
