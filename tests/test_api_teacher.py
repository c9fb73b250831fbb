"""API teachers: logged responses imported into caches, and a live OpenAI-compatible endpoint
(a fake server on 127.0.0.1 that this test starts, answering from a tiny teacher model)."""

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from distil.config import config_from_dict
from distil.data.teacher_cache import TeacherCache
from distil.errors import DistilError
from distil.losses.topk import teacher_topk
from distil.models import ModelConfig, TransformerLM
from distil.teachers.api import ApiTeacher, TokenMapper, import_logprobs
from distil.train.loop import train


class FakeOpenAI:
    """/v1/completions with echo + logprobs, scored by ``model``; failures and stalls on demand."""

    def __init__(self, model, tokenizer, *, delay=0.0, api_key=None):
        self.model, self.tokenizer, self.delay, self.api_key = model, tokenizer, delay, api_key
        self.fail_with: list[int] = []  # statuses to answer with before the next successes
        self.no_logprobs = False
        self.requests = 0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload, headers = fake.answer(self.path, body, self.headers.get("Authorization"))
                data = json.dumps(payload).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()

    def token_string(self, token_id: int) -> str:
        """As OpenAI writes tokens: the text, or "bytes:\\xNN..." when it is not whole UTF-8."""
        from distil.teachers.api import _byte_encoder

        decoder = {c: b for b, c in _byte_encoder().items()}
        token = self.tokenizer.convert_ids_to_tokens(token_id)
        if token in self.tokenizer.all_special_tokens:
            return token
        raw = bytes(decoder[c] for c in token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def answer(self, path, body, auth):
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            failure = self.fail_with.pop(0) if self.fail_with else None
        try:
            time.sleep(self.delay)
            if path != "/v1/completions":
                return 404, {"error": "not found"}, {}
            if self.api_key and auth != f"Bearer {self.api_key}":
                return 401, {"error": "bad key"}, {}
            if failure is not None:
                return failure, {"error": "try later"}, {"Retry-After": "0.01"} if failure == 429 else {}
            prompt, k = body["prompt"], body["logprobs"]
            with self.lock, torch.no_grad():
                logp = torch.log_softmax(self.model(torch.tensor([prompt]))[0].float(), -1)
            decode = self.token_string
            nxt = int(logp[-1].argmax())
            tops = [None]
            for row in logp:
                values, ids = row.topk(k)
                tops.append({decode(int(i)): float(v) for i, v in zip(ids, values)})
            tokens = [decode(t) for t in prompt] + [decode(nxt)]
            token_lp = [None] + [float(logp[j, t]) for j, t in enumerate(prompt[1:] + [nxt])]
            logprobs = None if self.no_logprobs else {"tokens": tokens, "token_logprobs": token_lp, "top_logprobs": tops}
            return 200, {"object": "text_completion", "model": body["model"],
                         "choices": [{"index": 0, "text": "", "logprobs": logprobs}]}, {}
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture
def teacher_model(tiny_tokenizer):
    torch.manual_seed(7)
    return TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=48, n_layers=2, n_heads=2)).eval()


@pytest.fixture
def server(teacher_model, tiny_tokenizer):
    fake = FakeOpenAI(teacher_model, tiny_tokenizer)
    yield fake
    fake.close()


def test_token_strings_map_onto_student_ids(tiny_tokenizer):
    mapper = TokenMapper(tiny_tokenizer, "first")
    vocab = tiny_tokenizer.get_vocab()
    the = tiny_tokenizer.encode(" the", add_special_tokens=False)
    assert len(the) == 1
    assert mapper.map(" the") == the[0]  # as an API writes it: a space, not "Ġ"
    assert mapper.map("Ġthe") == vocab["Ġthe"]  # an exact vocabulary string
    assert mapper.map("token_id:17") == 17
    assert mapper.map("bytes:\\x20the") == the[0]
    several = tiny_tokenizer.encode(" the model learns", add_special_tokens=False)
    assert len(several) > 1
    assert mapper.map(" the model learns") == several[0]
    assert TokenMapper(tiny_tokenizer, "drop").map(" the model learns") is None
    assert mapper.counts["first_id"] == 1 and mapper.counts["byte_level"] >= 2 and mapper.counts["exact"] == 1


def _chat_response(tokenizer, text, alternatives):
    content = []
    for piece in text:
        alts = [{"token": piece, "logprob": -0.1, "bytes": list(piece.encode())}]
        alts += [{"token": a, "logprob": lp, "bytes": list(a.encode())} for a, lp in alternatives]
        content.append({"token": piece, "logprob": -0.1, "bytes": list(piece.encode()), "top_logprobs": alts})
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "logprobs": {"content": content}}]}


def test_import_logprobs_maps_counts_and_trains(tmp_path, tiny_tokenizer, tiny_corpus_file):
    pieces = [" the", " to", " predict", "."]  # single tokens of the tiny BPE
    lines = [
        {"messages": [{"role": "user", "content": "Say something."}],
         "response": _chat_response(tiny_tokenizer, pieces, [(" while", -2.5), (" the model", -3.0)])},
        {"prompt": "The teacher", "response": {"choices": [{"index": 0, "text": " compares to", "logprobs": {
            "tokens": [" compares", " to"], "token_logprobs": [-0.7, -0.2],
            "top_logprobs": [{" compares": -0.7, " while": -1.2, "\u2603snow": -4.0}, {" to": -0.2, " the": -2.0}]}}]}},
    ]
    src = tmp_path / "responses.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    manifest = import_logprobs(src, tiny_tokenizer, tmp_path / "first")
    stats = manifest.stats
    assert stats["responses"] == 2 and stats["positions_with_entries"] == 6
    # " the model" (4 times) and "\u2603snow" are several tokens: their first id is kept
    assert stats["entries"] == 4 * 3 + 3 + 2 and stats["entries_first_id"] == 5
    assert stats["entries_dropped"] + stats["entries_mapped"] == stats["entries"]
    dropped = import_logprobs(src, tiny_tokenizer, tmp_path / "drop", multi_token="drop").stats
    assert dropped["entries_dropped"] == 5 and dropped["entries_first_id"] == 0

    cache = TeacherCache(tmp_path / "first")
    tokens, ids, logprobs, tail = cache.get(1)
    prompt = tiny_tokenizer.encode("The teacher", add_special_tokens=False)
    keeps, loss_id = (tiny_tokenizer.encode(s, add_special_tokens=False)[0] for s in (" compares", " while"))
    assert tokens[: len(prompt)].tolist() == prompt and tokens[len(prompt)] == keeps
    at = len(prompt) - 1  # the position whose next token is " keeps"
    got = dict(zip(ids[at].tolist(), logprobs[at].tolist()))
    assert abs(got[keeps] + 0.7) <= 0.01 and abs(got[loss_id] + 1.2) <= 0.01
    mass = math.exp(-0.7) + math.exp(-1.2) + (math.exp(-4.0) if len(got) > 2 else 0)
    assert abs(math.exp(tail[at]) - (1 - mass)) < 0.01
    assert (ids[: at] < 0).all()  # prompt positions carry no teacher signal

    cfg = config_from_dict({
        "teacher": {"source": "cache", "cache": str(tmp_path / "first")},
        "student": {"d_model": 32, "n_layers": 2, "n_heads": 2},
        "data": {"source": "jsonl", "path": str(tiny_corpus_file), "seq_len": 32, "val_fraction": 0.2},
        "loss": {"kind": "forward_kl", "kd_weight": 1.0},
        "train": {"steps": 3, "batch_size": 2, "progress": False, "val_every": 0, "device": "cpu"},
        "eval": {"val_batches": 1}})
    result = train(cfg, tokenizer=tiny_tokenizer)
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in result.history)


def test_import_rejects_responses_without_logprobs_and_bad_values(tmp_path, tiny_tokenizer):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"choices": [{"index": 0, "text": "hi"}]}) + "\n")
    with pytest.raises(DistilError, match="bad.jsonl:1: the response has no logprobs"):
        import_logprobs(src, tiny_tokenizer, tmp_path / "out")
    src.write_text(json.dumps({"choices": [{"logprobs": {"tokens": [" the"], "top_logprobs": [{" the": float("nan")}]}}]}))
    with pytest.raises(DistilError, match="bad.jsonl:1: log-prob nan is not a finite log-probability"):
        import_logprobs(src, tiny_tokenizer, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_api_teacher_scores_like_the_model(server, teacher_model, tiny_tokenizer, tmp_path):
    api = ApiTeacher(server.url, "tiny", tiny_tokenizer, topk=5, cache_dir=tmp_path / "api")
    x = torch.tensor([tiny_tokenizer.encode("The model learns the next token from the teacher.")] * 3)
    ids, logprobs, tail = api.topk(x, 5)
    ref_ids, ref_lp, ref_tail = teacher_topk(teacher_model(x), 5)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logprobs, ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(tail, ref_tail, rtol=1e-3, atol=1e-4)
    api.close()


def test_api_retries_limits_concurrency_and_caches_answers(server, tiny_tokenizer, tmp_path):
    server.delay = 0.05
    server.fail_with = [503, 429, 500]
    api = ApiTeacher(server.url, "tiny", tiny_tokenizer, topk=4, concurrency=3, retries=5, backoff=0.01,
                     cache_dir=tmp_path / "api")
    words = ["model", "student", "teacher", "loss", "size", "token", "vocabulary", "distributions"]
    rows = [tiny_tokenizer.encode(f"{w} compares the next token while it learns") for w in words]
    width = min(map(len, rows))
    x = torch.tensor([r[-width:] for r in rows])
    assert len({tuple(r) for r in x.tolist()}) == 8
    first = api.topk(x, 4)
    assert server.requests == 8 + 3  # three failures, each retried
    assert 1 < server.max_in_flight <= 3
    again = ApiTeacher(server.url, "tiny", tiny_tokenizer, topk=4, cache_dir=tmp_path / "api")
    second = again.topk(x, 4)
    assert server.requests == 11 and again.cache_hits == 8  # all from the disk cache
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    server.fail_with = [503] * 10
    stubborn = ApiTeacher(server.url, "tiny", tiny_tokenizer, topk=4, retries=2, backoff=0.001)
    with pytest.raises(DistilError, match="failed after 3 attempts .*HTTP 503"):
        stubborn.topk(x[:1], 4)
    server.fail_with = []
    server.no_logprobs = True
    with pytest.raises(DistilError, match="the response has no logprobs"):
        ApiTeacher(server.url, "tiny", tiny_tokenizer, topk=4).topk(x[:1], 4)


def test_api_key_comes_from_the_environment(teacher_model, tiny_tokenizer, monkeypatch):
    fake = FakeOpenAI(teacher_model, tiny_tokenizer, api_key="sk-test")
    try:
        tcfg = config_from_dict({"teacher": {"source": "api"}, "loss": {"kind": "forward_kl"},
                                 "api": {"base": fake.url, "model": "tiny", "key_env": "DISTIL_TEST_KEY",
                                         "cache": None}}).api
        x = torch.tensor([tiny_tokenizer.encode("The model learns.")])
        monkeypatch.delenv("DISTIL_TEST_KEY", raising=False)
        with pytest.raises(DistilError, match="refused the request .*HTTP 401"):
            ApiTeacher.from_config(tcfg, tiny_tokenizer).topk(x, 3)
        monkeypatch.setenv("DISTIL_TEST_KEY", "sk-test")
        ids, _, _ = ApiTeacher.from_config(tcfg, tiny_tokenizer).topk(x, 3)
        assert ids.shape == (1, x.shape[1], 3)
    finally:
        fake.close()


@pytest.mark.slow
def test_training_with_an_api_teacher_equals_the_online_teacher(server, teacher_model, tiny_tokenizer,
                                                                tiny_corpus_file, tmp_path):
    from distil.teachers import ModelTeacher

    base = {
        "student": {"d_model": 32, "n_layers": 2, "n_heads": 2},
        "data": {"source": "jsonl", "path": str(tiny_corpus_file), "seq_len": 24, "val_fraction": 0.2},
        "loss": {"kind": "forward_kl", "kd_weight": 1.0, "topk": 5},
        "train": {"steps": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "progress": False, "val_every": 0,
                  "device": "cpu"},
        "eval": {"val_batches": 1}}
    online = train(config_from_dict({**base, "teacher": {"source": "model", "path": "unused"}}),
                   teacher=ModelTeacher(teacher_model), tokenizer=tiny_tokenizer)
    api_cfg = config_from_dict({**base, "teacher": {"source": "api"},
                                "api": {"base": server.url, "model": "tiny", "cache": str(tmp_path / "api")}})
    via_api = train(api_cfg, tokenizer=tiny_tokenizer)
    np.testing.assert_allclose([h["loss"] for h in via_api.history], [h["loss"] for h in online.history], rtol=1e-4)

    # The same answers written into a cache train the same way again (no request sent: all on disk).
    from distil.train.cache_teacher import write_cache

    before = server.requests
    write_cache(api_cfg, tmp_path / "cache", k=5, progress=False, tokenizer=tiny_tokenizer)
    assert TeacherCache(tmp_path / "cache").settings.source == "api"
    cached = train(config_from_dict({**base, "teacher": {"source": "cache", "cache": str(tmp_path / "cache")}}),
                   tokenizer=tiny_tokenizer)
    np.testing.assert_allclose([h["loss"] for h in cached.history], [h["loss"] for h in online.history], atol=0.012)
    assert server.requests - before <= len(TeacherCache(tmp_path / "cache")) - 4 * 4  # trained rows were cached


@pytest.mark.slow
def test_import_logprobs_cli(tmp_path, tiny_tokenizer):
    import os
    import subprocess
    import sys

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    tiny_tokenizer.save_pretrained(str(tmp_path / "tok"))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "The", "response": _chat_response(tiny_tokenizer, [" the", " to"], [])}) + "\n")
    out = subprocess.run([sys.executable, "-m", "distil", "import-logprobs", str(good), "--tokenizer",
                          str(tmp_path / "tok"), "--out", str(tmp_path / "cache"), "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["entries_mapped"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"choices": [{"index": 0, "text": "hi"}]}) + "\n")
    out = subprocess.run([sys.executable, "-m", "distil", "import-logprobs", str(bad), "--tokenizer",
                          str(tmp_path / "tok"), "--out", str(tmp_path / "cache2")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("distil: error:") and "has no logprobs" in out.stderr
