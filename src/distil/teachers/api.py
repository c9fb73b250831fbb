"""Teachers behind an OpenAI-compatible API: logged responses into caches, and live scoring.

    stats = import_logprobs("responses.jsonl", tokenizer, "caches/imported").stats
    teacher = ApiTeacher("http://localhost:8000/v1", "my-teacher", tokenizer, topk=20)
    ids, logprobs, tail = teacher.topk(input_ids, k=20)     # [batch, seq, k], [batch, seq, k], [batch, seq]

Token strings in ``top_logprobs`` are mapped onto the student tokenizer's ids by
:class:`TokenMapper`, in this order:

1. ``token_id:N`` (vLLM's ``return_tokens_as_token_ids``): the id N;
2. an exact match of the string in the vocabulary;
3. the string as a byte-level BPE token (GPT-2 style: each UTF-8 byte as one printable character;
   the response's ``bytes`` field or a ``bytes:\\x..`` string is used when given);
4. the string as a SentencePiece token (spaces as "▁", single bytes as "<0xNN>");
5. otherwise the string is tokenized: one id maps; several ids follow the multi-token policy,
   ``first`` (keep the first id, counted) or ``drop`` (drop the entry, counted).

Dropped entries are absent (id -1); their mass counts as tail mass in ``topk_kd_loss``. Entries
that map to the same id are merged (their probabilities add).

The live teacher scores a token sequence with ``POST {base}/completions`` and ``{"prompt": [ids],
"echo": true, "logprobs": k, "max_tokens": 1}``, so its positions line up with the student's
tokens (the teacher shares the student's tokenizer). A teacher with another tokenizer is sent text
instead (``score_text``: the server tokenises it, ``text_offset`` places its tokens; see
distil.teachers.cross and docs/cross-tokenizer.md). Requests run ``concurrency`` at a time,
are retried on 408/409/429/5xx and network errors with exponential backoff (honouring
Retry-After), and answers are kept on disk (``api_cache``) so a rerun or a resumed run asks again
for nothing. The key comes from the environment variable ``api_key_env``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from distil.data.corpus import read_jsonl
from distil.data.teacher_cache import CacheSettings, CacheWriter
from distil.data.tokenize import tokenizer_hash
from distil.data.topk_codec import ABSENT_LOGPROB, encode_block, frequency_order
from distil.errors import DistilError
from distil.fsutil import atomic_dir, atomic_write_text, cache_path
from distil.losses.topk import log1mexp

log = logging.getLogger("distil")

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@lru_cache(maxsize=1)
def _byte_encoder() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _token_bytes(token: str, raw_bytes=None) -> bytes:
    if raw_bytes:
        return bytes(raw_bytes)
    if token.startswith("bytes:"):
        try:
            return token[len("bytes:") :].encode("latin-1").decode("unicode_escape").encode("latin-1")
        except (UnicodeDecodeError, UnicodeEncodeError):
            pass
    return token.encode("utf-8")


class TokenMapper:
    """API token strings -> student token ids (see the module docstring for the order)."""

    def __init__(self, tokenizer, multi_token: str = "first"):
        if multi_token not in ("first", "drop"):
            raise DistilError(f"multi-token policy {multi_token!r} is not one of first, drop")
        self.tokenizer, self.multi_token = tokenizer, multi_token
        self.vocab = tokenizer.get_vocab()
        self.vocab_size = len(tokenizer)
        self.counts = {"exact": 0, "token_id": 0, "byte_level": 0, "sentencepiece": 0, "tokenized": 0, "first_id": 0,
                       "dropped": 0}
        self._memo: dict = {}

    def _lookup(self, token: str, raw_bytes) -> tuple[str, int | None]:
        key = (token, tuple(raw_bytes) if raw_bytes else None)
        if key not in self._memo:
            self._memo[key] = self._map(token, raw_bytes)
        return self._memo[key]

    def map(self, token: str, raw_bytes=None) -> int | None:
        """The id of a top_logprobs entry, or None (dropped); counted in ``counts``."""
        how, token_id = self._lookup(token, raw_bytes)
        self.counts[how] += 1
        return token_id

    def _map(self, token: str, raw_bytes) -> tuple[str, int | None]:
        if token.startswith("token_id:") and token[len("token_id:") :].isdigit():
            token_id = int(token[len("token_id:") :])
            return ("token_id", token_id) if token_id < self.vocab_size else ("dropped", None)
        if token in self.vocab and not raw_bytes:
            return "exact", self.vocab[token]
        data = _token_bytes(token, raw_bytes)
        encoder = _byte_encoder()
        byte_level = "".join(encoder[b] for b in data)
        if byte_level in self.vocab:
            return "byte_level", self.vocab[byte_level]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None and text.replace(" ", "▁") in self.vocab:
            return "sentencepiece", self.vocab[text.replace(" ", "▁")]
        if len(data) == 1 and f"<0x{data[0]:02X}>" in self.vocab:
            return "sentencepiece", self.vocab[f"<0x{data[0]:02X}>"]
        ids = self.tokenizer.encode(text, add_special_tokens=False) if text else []
        if len(ids) == 1:
            return "tokenized", ids[0]
        if ids and self.multi_token == "first":
            return "first_id", ids[0]
        return "dropped", None

    def ids(self, token: str, raw_bytes=None) -> list[int]:
        """All student ids of a *sampled* token: the sequence keeps every id of a multi-token string."""
        how, token_id = self._lookup(token, raw_bytes)
        if token_id is not None and how != "first_id":
            return [token_id]
        text = _token_bytes(token, raw_bytes).decode("utf-8", errors="replace")
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []


def _merge(entries: list[tuple[int | None, float]], where: str) -> dict[int, float]:
    """Mapped (id, log-prob) entries -> {id: log-prob}, duplicates merged; None ids skipped."""
    out: dict[int, float] = {}
    for token_id, logprob in entries:
        if logprob is None or not math.isfinite(logprob) or logprob > 1e-3:
            raise DistilError(f"{where}: log-prob {logprob!r} is not a finite log-probability")
        if token_id is None:
            continue
        out[token_id] = float(np.logaddexp(out[token_id], logprob)) if token_id in out else min(logprob, 0.0)
    return out


def _positions(choice: dict, where: str) -> list[tuple[str, object, list[tuple[str, object, float]] | None]]:
    """[(sampled token, its bytes, [(alt token, alt bytes, alt log-prob)] or None)] of one choice."""
    logprobs = choice.get("logprobs")
    if not logprobs:
        raise DistilError(f"{where}: the response has no logprobs (request logprobs with top_logprobs)")
    if "content" in logprobs:  # chat completions
        out = []
        for item in logprobs["content"] or []:
            alts = item.get("top_logprobs")
            out.append((item["token"], item.get("bytes"), None if alts is None else
                        [(a["token"], a.get("bytes"), a["logprob"]) for a in alts]))
        return out
    if "tokens" in logprobs:  # completions
        tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
        return [(tok, None, None if top is None else [(t, None, lp) for t, lp in top.items()])
                for tok, top in zip(logprobs["tokens"], tops)]
    raise DistilError(f"{where}: logprobs has neither 'content' (chat) nor 'tokens' (completions)")


@dataclass(frozen=True)
class TextScores:
    """A server's tokenisation of a text and its scores: ids [n] (its tokenizer's, -1 unmapped), byte
    lengths [n] (summing to the text's), and per token the distribution before it, ids [n, k + 1]
    (-1 absent) and log-probs (row 0 all absent)."""

    ids: np.ndarray
    lengths: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


def _tail_of_present(ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum of the present entries' probabilities): absent (dropped) entries are tail mass."""
    return log1mexp(torch.logsumexp(torch.where(ids >= 0, logprobs, torch.tensor(float("-inf"))), -1))


def _prompt_ids(record: dict, tokenizer, where: str) -> list[int]:
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, list):
            return [int(t) for t in prompt]
        return tokenizer.encode(prompt, add_special_tokens=False)
    if "messages" in record:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) else ids)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in record["messages"])
        return tokenizer.encode(text, add_special_tokens=False)
    return []


def import_logprobs(path: str | Path, tokenizer, out: str | Path, *, multi_token: str = "first",
                    encoding: str = "ranked", overwrite: bool = False):
    """Convert a JSONL of logged responses into a cache (one sequence per response)."""
    path = Path(path)
    if not path.is_file():
        raise DistilError(f"{path} does not exist")
    mapper = TokenMapper(tokenizer, multi_token)
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    sequences = []
    positions_total = positions_with_entries = unmapped_tokens = 0
    for line_no, record in read_jsonl(path):
        where = f"{path}:{line_no}"
        if not isinstance(record, dict):
            raise DistilError(f"{where}: expected a JSON object")
        response = record.get("response", record)
        choices = response.get("choices") if isinstance(response, dict) else None
        if not choices:
            raise DistilError(f"{where}: no 'choices' in the response")
        prompt = _prompt_ids(record, tokenizer, where)
        tokens = list(prompt) or ([start_id] if start_id is not None else [])
        if not tokens:
            raise DistilError(f"{where}: no prompt and the tokenizer has no BOS/EOS token to start the sequence")
        entries: dict[int, dict[int, float]] = {}  # position -> {id: log-prob}
        for token, raw, alts in _positions(choices[0], where):
            ids = mapper.ids(token, raw)
            if not ids:
                unmapped_tokens += 1
                continue
            if alts:
                merged = _merge([(mapper.map(t, b), lp) for t, b, lp in alts], where)
                if merged:
                    entries[len(tokens) - 1] = merged
            tokens.extend(ids)
        sequences.append((np.asarray(tokens, dtype=np.int64), entries))
        positions_total += len(tokens) - 1
        positions_with_entries += len(entries)
    if not sequences:
        raise DistilError(f"{path} holds no responses")
    k = max((len(e) for _, seq in sequences for e in seq.values()), default=0)
    if k == 0:
        raise DistilError(f"{path}: no top_logprobs entry mapped onto the tokenizer")
    settings = CacheSettings(teacher=f"import:{path.name}", tokenizer_hash=tokenizer_hash(tokenizer),
                             vocab_size=len(tokenizer), k=k, encoding=encoding, source="import")
    writer = CacheWriter(out, settings, total_sequences=len(sequences), sequences_per_shard=4096, overwrite=overwrite)
    writer_start = writer.next_sequence
    if writer.needs_id_order:  # every response is in memory: the table counts them all
        seen = [i for _, entries in sequences for e in entries.values() for i in e]
        writer.set_id_order(frequency_order(np.asarray(seen, dtype=np.int64), vocab_size=len(tokenizer),
                                            tokens=np.concatenate([t for t, _ in sequences])))
    for tokens, entries in sequences[writer_start:]:
        n = len(tokens) - 1
        ids = np.full((n, k), -1, dtype=np.int64)
        logprobs = np.full((n, k), -np.inf, dtype=np.float32)
        for position, merged in entries.items():
            ids[position, : len(merged)] = list(merged.keys())
            logprobs[position, : len(merged)] = list(merged.values())
        tail = _tail_of_present(torch.from_numpy(ids), torch.from_numpy(logprobs)).numpy()
        writer.add_block(encode_block(tokens, ids, logprobs, tail, vocab_size=len(tokenizer), encoding=encoding,
                                      id_rank=writer.id_rank), n)
    counts = dict(mapper.counts)
    entries_total = sum(counts.values())
    stats = {"responses": len(sequences), "positions": positions_total, "positions_with_entries": positions_with_entries,
             "entries": entries_total, "entries_mapped": entries_total - counts["dropped"],
             "entries_dropped": counts["dropped"], "entries_first_id": counts["first_id"],
             "sampled_tokens_unmapped": unmapped_tokens, "k": k, "mapping": counts}
    out = Path(out)
    with atomic_dir(out / "tokenizer", overwrite=True) as tmp:
        tokenizer.save_pretrained(str(tmp))
    manifest = writer.finish(stats)
    log.info("imported %d responses: %d positions with entries, %d of %d entries mapped (%d dropped)", len(sequences),
             positions_with_entries, stats["entries_mapped"], entries_total, counts["dropped"])
    return manifest


class ApiTeacher:
    """Scores token sequences with an OpenAI-compatible ``/completions`` endpoint (see the module docstring)."""

    gives = ("topk", "token_logprobs", "text")  # text: score_text, for a teacher with another tokenizer
    carries_state = False
    vocab_size = None  # the tokenizer's: the endpoint's token strings are mapped onto it

    def __init__(self, base_url: str, model: str, tokenizer, *, api_key: str | None = None, topk: int = 20,
                 concurrency: int = 8, retries: int = 5, timeout: float = 120.0, cache_dir: str | Path | None = None,
                 backoff: float = 0.5, max_backoff: float = 30.0):
        import httpx

        self.base_url, self.model, self.topk_default = base_url.rstrip("/"), model, topk
        self.k = topk  # what a loss without loss.topk asks for
        self.name = f"api:{model}@{self.base_url}"
        self.mapper = TokenMapper(tokenizer, "drop")
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.cache_dir = cache_path(cache_dir) if cache_dir else None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers,
                                   limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))
        self.pool = ThreadPoolExecutor(max_workers=concurrency)
        self.requests_sent = 0
        self.cache_hits = 0

    @classmethod
    def from_config(cls, api, tokenizer) -> ApiTeacher:
        """From the config's ``api`` section."""
        return cls(api.base, api.model, tokenizer, api_key=os.environ.get(api.key_env) or None, topk=api.topk,
                   concurrency=api.concurrency, retries=api.retries, timeout=api.timeout, cache_dir=api.cache)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.client.close()

    def to(self, device) -> ApiTeacher:
        return self

    def signal(self, batch: dict, request, stream: dict | None = None):
        if request.kind == "token_logprobs":
            return self.token_logprobs(batch["input_ids"], batch["labels"])
        assert request.kind == "topk", request
        return self.topk(batch["input_ids"], request.k)

    # -- one request --------------------------------------------------------------------------

    def _cache_file(self, payload: dict) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(json.dumps({"base": self.base_url, **payload}, sort_keys=True).encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.json"

    def _post(self, payload: dict) -> dict:
        import httpx

        cache_file = self._cache_file(payload)
        if cache_file is not None and cache_file.is_file():
            try:
                self.cache_hits += 1
                return json.loads(cache_file.read_text())
            except json.JSONDecodeError:
                pass  # a damaged entry is asked for again
        url = f"{self.base_url}/completions"
        for attempt in range(self.retries + 1):
            wait = None
            try:
                self.requests_sent += 1
                response = self.client.post(url, json=payload)
            except (httpx.TransportError, httpx.TimeoutException) as e:
                error, wait = f"{type(e).__name__}: {e}", self.backoff * 2**attempt
            else:
                if response.status_code == 200:
                    try:
                        body = response.json()
                    except json.JSONDecodeError as e:
                        raise DistilError(f"{url} answered with invalid JSON: {e}") from e
                    if cache_file is not None:
                        atomic_write_text(cache_file, json.dumps(body))
                    return body
                error = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code not in RETRY_STATUS:
                    raise DistilError(f"{url} refused the request ({error})")
                wait = self.backoff * 2**attempt
                retry_after = response.headers.get("retry-after")
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = float(retry_after)
            if attempt == self.retries:
                break
            wait = min(self.max_backoff, wait) * (1 + 0.1 * random.random())
            log.debug("API request failed (%s); retry %d/%d in %.2fs", error, attempt + 1, self.retries, wait)
            time.sleep(wait)
        raise DistilError(f"{url} failed after {self.retries + 1} attempts ({error})")

    def score(self, token_ids: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ids (-1: did not map) and log-probs [n, k] predicting tokens 1..n of ``token_ids[:n]`` + the next."""
        payload = {"model": self.model, "prompt": [int(t) for t in token_ids], "echo": True, "logprobs": k,
                   "max_tokens": 1, "temperature": 0.0}
        body = self._post(payload)
        choices = body.get("choices") if isinstance(body, dict) else None
        where = f"{self.base_url}/completions"
        if not choices:
            raise DistilError(f"{where}: the response has no choices")
        positions = _positions(choices[0], where)
        n = len(token_ids)
        if len(positions) < n + 1:
            raise DistilError(f"{where}: the response scores {len(positions)} tokens, expected {n + 1} (the prompt "
                              "echoed and one generated token); does the server support echo with logprobs?")
        ids = np.full((n, k), -1, dtype=np.int64)
        logprobs = np.full((n, k), ABSENT_LOGPROB, dtype=np.float32)
        for i in range(n):
            alts = positions[i + 1][2]
            if not alts:
                raise DistilError(f"{where}: position {i + 1} has no top_logprobs")
            merged = _merge([(self.mapper.map(t, b), lp) for t, b, lp in alts], where)
            best = sorted(merged.items(), key=lambda kv: -kv[1])[:k]
            ids[i, : len(best)] = [b[0] for b in best]
            logprobs[i, : len(best)] = [b[1] for b in best]
        return ids, logprobs

    def score_text(self, text: str, k: int) -> TextScores:
        """The server's own tokenisation of ``text`` and its scores (a teacher with another tokenizer:
        distil.teachers.cross). ``{"prompt": text, "echo": true, "logprobs": k, "max_tokens": 1}``;
        each echoed token's span comes from ``text_offset`` (character offsets into the prompt, as the
        OpenAI completions API and vLLM give them), its id and its alternatives' from this teacher's
        tokenizer (``TokenMapper``). Row i of the scores is the distribution before token i (row 0 has
        none); its last column is token i itself when its alternatives lack it."""
        where = f"{self.base_url}/completions"
        body = self._post({"model": self.model, "prompt": text, "echo": True, "logprobs": k, "max_tokens": 1,
                           "temperature": 0.0})
        choices = body.get("choices") if isinstance(body, dict) else None
        logprobs = choices[0].get("logprobs") if choices else None
        if not logprobs or "tokens" not in logprobs:
            raise DistilError(f"{where}: the response has no completions logprobs (tokens, text_offset, top_logprobs)")
        tokens, offsets = logprobs["tokens"], logprobs.get("text_offset")
        if offsets is None or len(offsets) != len(tokens):
            raise DistilError(f"{where}: the response gives no text_offset for its tokens; a teacher with another "
                              "tokenizer needs a server that reports where each token lies in the text")
        n = len(tokens) - 1 if tokens and offsets[-1] >= len(text) and len(tokens) > 1 else len(tokens)
        char_bytes = np.cumsum([0] + [len(c.encode("utf-8")) for c in text])
        bounds = [min(int(o), len(text)) for o in offsets[:n]] + [len(text)]
        if any(b < a for a, b in zip(bounds, bounds[1:])):
            raise DistilError(f"{where}: the response's text_offset values go backwards")
        lengths = np.diff(char_bytes[bounds]).astype(np.int64)
        ids = np.asarray([-1 if (i := self.mapper.map(t)) is None else i for t in tokens[:n]], dtype=np.int64)
        tops = logprobs.get("top_logprobs") or [None] * len(tokens)
        produced = logprobs.get("token_logprobs") or [None] * len(tokens)
        top_ids = np.full((n, k + 1), -1, dtype=np.int64)
        top_lp = np.full((n, k + 1), ABSENT_LOGPROB, dtype=np.float32)
        for i in range(1, n):
            if not tops[i]:
                continue
            merged = _merge([(self.mapper.map(t), lp) for t, lp in tops[i].items()], where)
            best = sorted(merged.items(), key=lambda kv: -kv[1])[:k]
            if ids[i] >= 0 and ids[i] not in merged and produced[i] is not None:
                best.append((int(ids[i]), min(float(produced[i]), 0.0)))
            top_ids[i, : len(best)] = [b[0] for b in best]
            top_lp[i, : len(best)] = [b[1] for b in best]
        return TextScores(ids, lengths, top_ids, top_lp)

    def token_logprobs(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The teacher's log-prob of each label [B, L] (0 where the label is -100): each row is sent
        with its last label appended, and the echoed tokens' ``token_logprobs`` are read (what
        vLLM's ``echo`` / ``prompt_logprobs`` give for a sampled text)."""
        last = labels[:, -1:].clamp_min(0)
        rows = [row.tolist() for row in torch.cat([input_ids, last], 1).cpu()]
        where = f"{self.base_url}/completions"

        def one(row: list[int]) -> list[float]:
            body = self._post({"model": self.model, "prompt": row, "echo": True, "logprobs": 1, "max_tokens": 1,
                               "temperature": 0.0})
            choices = body.get("choices") if isinstance(body, dict) else None
            if not choices or not choices[0].get("logprobs"):
                raise DistilError(f"{where}: the response has no logprobs (request logprobs with echo)")
            logprobs = choices[0]["logprobs"]
            values = logprobs.get("token_logprobs") if "tokens" in logprobs else [
                item.get("logprob") for item in logprobs.get("content") or []]
            if values is None or len(values) < len(row):
                raise DistilError(f"{where}: the response scores {0 if values is None else len(values)} tokens, "
                                  f"expected {len(row)}; does the server support echo with logprobs?")
            return [float(v) if v is not None else 0.0 for v in values[1 : len(row)]]

        out = torch.tensor(list(self.pool.map(one, rows)), dtype=torch.float32)
        return out.to(labels.device).masked_fill(labels == -100, 0.0)

    def topk(self, input_ids: torch.Tensor, k: int | None = None):
        """(ids [B, L, k], log-probs [B, L, k], tail log-mass [B, L]) on ``input_ids``' device."""
        k = k or self.topk_default
        rows = [row.tolist() for row in input_ids.cpu()]
        results = list(self.pool.map(lambda row: self.score(row, k), rows))
        ids = torch.from_numpy(np.stack([r[0] for r in results]))
        logprobs = torch.from_numpy(np.stack([r[1] for r in results]))
        tail = _tail_of_present(ids, logprobs)
        device = input_ids.device
        return ids.to(device), logprobs.to(device), tail.to(device)
