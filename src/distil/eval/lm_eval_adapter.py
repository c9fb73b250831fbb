"""lm-evaluation-harness for distil models (transformer or hybrid), through lm-eval's Python API.

    results = run_lm_eval("runs/x/checkpoints/final", ["hellaswag", "arc_easy"], num_fewshot=0)
    # or:  distil eval --model runs/x/checkpoints/final --lm-eval hellaswag,arc_easy

Needs ``pip install -e ".[eval]"``. The model is registered with lm-eval as ``distil`` (so
``lm_eval --model distil --model_args pretrained=PATH`` works too). Log-likelihoods use the same
scoring code as ``distil eval --mc``; generation uses the KV cache / SSM state.
"""

from __future__ import annotations

import numpy as np

from distil.data.tokenize import has_tokenizer, load_tokenizer
from distil.errors import DistilError
from distil.eval.multiple_choice import continuation_logprobs
from distil.eval.perplexity import evaluate_lm
from distil.models.generate import generate_text
from distil.models.loading import load

_LM_CLASS = None


def lm_class():
    """The lm-eval LM subclass, created (and registered) on first use so lm-eval stays optional."""
    global _LM_CLASS
    if _LM_CLASS is not None:
        return _LM_CLASS
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError as e:
        raise DistilError('lm-eval is not installed; install it with pip install -e ".[eval]"') from e

    @register_model("distil")
    class DistilLM(LM):
        def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, batch_size: int | str = 8,
                     device: str = "cpu", max_length: int = 2048, **kwargs):
            super().__init__()
            if model is None:
                if pretrained is None:
                    raise DistilError("the distil lm-eval model needs pretrained=PATH")
                model = load(pretrained)
                if not has_tokenizer(pretrained):
                    raise DistilError(f"no tokenizer in {pretrained}")
                tokenizer = load_tokenizer(pretrained)
            self.model, self.tokenizer = model.to(device).eval(), tokenizer
            self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 8
            self.device_name, self.max_length = device, max_length

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            pairs = [req.args for req in requests]
            scores = continuation_logprobs(self.model, self.tokenizer, pairs, batch_size=self.batch_size_per_gpu,
                                           max_len=self.max_length, device=self.device_name, return_greedy=True,
                                           progress=not disable_tqdm)
            return [(total, greedy) for total, _, greedy in scores]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                ids = self.tokenizer(req.args[0], add_special_tokens=False)["input_ids"]
                eos = self.tokenizer.eos_token_id or 0
                tokens = np.array([eos, *ids], dtype=np.int64)
                total = 0.0
                # Non-overlapping windows; each predicts its tokens from what precedes them in the window.
                for start in range(0, len(tokens) - 1, self.max_length):
                    window = tokens[start : start + self.max_length + 1][None]
                    metrics = evaluate_lm(self.model, window, batch_size=1, device=self.device_name)
                    total -= metrics["loss"] * metrics["tokens"]
                out.append(total)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                context, options = req.args
                until = options.get("until") or []
                until = [until] if isinstance(until, str) else until
                text = generate_text(self.model, self.tokenizer, context,
                                     max_new_tokens=int(options.get("max_gen_toks", 128)),
                                     temperature=float(options.get("temperature", 0.0)))
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                out.append(text)
            return out

    _LM_CLASS = DistilLM
    return DistilLM


def run_lm_eval(model_path: str, tasks: list[str], *, num_fewshot: int | None = None, include_path: str | None = None,
                limit: int | None = None, batch_size: int = 8, device: str = "cpu") -> dict:
    """lm-eval results (the ``results`` dict, one entry per task) for a distil checkpoint."""
    cls = lm_class()
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = cls(pretrained=model_path, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise DistilError(f"lm-eval does not know the task(s) {', '.join(unknown)}")
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, task_manager=manager,
                                      limit=limit, batch_size=batch_size)
    except (OSError, ConnectionError) as e:  # requests' and huggingface_hub's network errors are OSErrors
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise DistilError(f"lm-eval could not fetch the data of {', '.join(tasks)} ({type(e).__name__}); offline, "
                          "point --lm-eval-include at a folder of task YAMLs whose data is on disk") from None
    return out["results"]
