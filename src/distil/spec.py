"""What a distillation loss computes, without torch: the kinds, the tails and one frozen spec.

    spec = LossSpec(kind="reverse_kl", temperature=2.0)
    request = Request("topk", k=64, temperature=2.0)           # what a loss asks its teacher for
    shared_vocab(student_vocab=49152, teacher_vocab=49280)   # 49152: the rest is padding

The config validates against these lists and the losses dispatch on them, so a new kind is added
here once. ``LossSpec`` is what every loss entry point reads its divergence settings from.
"""

from __future__ import annotations

from dataclasses import dataclass

from distil.errors import DistilError

# Divergences between full distributions (kd_loss, the fused loss, the vocabulary-parallel loss).
KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "mse")
# Divergences from a top-k signal (a cache, an API, loss.topk); soft_ce needs one.
TOPK_KINDS = ("forward_kl", "reverse_kl", "soft_ce")
ALL_KINDS = (*KINDS, "soft_ce")
TAILS = ("bucket", "renormalize")  # how a top-k loss treats the mass outside the k entries
# What a teacher can give (distil.teachers.base); "groups": a teacher with another tokenizer, aligned;
# "text": a server that tokenises text itself and says where each token lies (read by the alignment).
SIGNALS = ("head", "logits", "topk", "token_logprobs", "groups", "text")


@dataclass(frozen=True)
class LossSpec:
    """The divergence: its kind and the settings some kinds read."""

    kind: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5  # jsd
    skew: float = 0.1  # skew_forward_kl, skew_reverse_kl
    tail: str = "bucket"  # top-k kinds

    def __post_init__(self):
        if self.kind not in ALL_KINDS:
            raise DistilError(f"unknown loss kind {self.kind!r}; choose one of {', '.join(ALL_KINDS)}")
        if self.tail not in TAILS:
            raise DistilError(f"unknown top-k tail {self.tail!r}; choose one of {', '.join(TAILS)}")


@dataclass(frozen=True)
class Request:
    """The teacher signal a loss needs: its kind, and for top-k the k and the log-probs' temperature."""

    kind: str
    k: int | None = None
    temperature: float = 1.0

    def __post_init__(self):
        assert self.kind in SIGNALS, self.kind
        assert self.kind != "topk" or (self.k or 0) >= 1, "a top-k request needs k >= 1"


def shared_vocab(student_vocab: int, teacher_vocab: int) -> int:
    """The vocabulary both sides share when they differ only by padding rows; else an error.

    Checkpoints pad their embedding to a multiple of 64 or 128 (151936 vs 152064 in Qwen2).
    A difference within 1% (and under 2048 rows) is treated as padding, and the extra columns
    are masked out; anything larger means different tokenizers.
    """
    if student_vocab == teacher_vocab:
        return student_vocab
    small, large = sorted((student_vocab, teacher_vocab))
    if large - small <= min(2048, max(128, small // 100)):
        return small
    raise DistilError(
        f"teacher vocabulary ({teacher_vocab}) and student vocabulary ({student_vocab}) differ by more than "
        "padding; they must share a tokenizer"
    )


# `distil study`: experiment and budget names (the CLI's choices; the experiments live in distil/study.py).
STUDY_EXPERIMENTS = ("mixer-state", "init", "loss", "zero-shot-vs-progressive", "placement", "tiny-kd")
STUDY_BUDGETS = ("quick", "full", "smoke")


# Export formats (`distil export --format`): name -> what it writes. The writers are in
# distil.models.export.FORMATS, keyed by these names.
EXPORT_FORMATS = {
    "hf": "a stock transformers class: Llama, Mistral, Qwen2, Qwen3, Gemma 3, SmolLM3, Phi-3 as they came, other "
          "all-attention models as Llama, Mamba2 hybrids of Llama-layout models as GraniteMoeHybrid",
    "hf-remote": "every distil model (Qwen3 / Gemma 3 hybrids, size-matched or discrete Mamba2 layers too) with its "
                 "own modeling code, loaded with trust_remote_code=True",
    "gguf": "one GGUF file for llama.cpp / Ollama / LM Studio: all-attention models as llama, Mamba2 hybrids as "
            "granitehybrid, with the tokenizer and chat template (--gguf-type f32, f16 or q8_0)",
}
