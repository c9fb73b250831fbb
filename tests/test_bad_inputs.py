"""Every user mistake (and every error of the OS) is one line on stderr, exit code 2, and changes nothing.

Table-driven: each case builds what it needs in a fresh folder, runs the CLI in-process
(``distil.cli.main``), and checks

* the exit code (2);
* one line on stderr, starting ``distil: error:``, with no traceback (an exception escaping
  ``main`` fails the test with its own traceback);
* the key words of the message;
* that nothing was created or changed: the folder's file listing and checksums before and after.

A few cases run as real subprocesses too (``test_the_whole_stderr_is_one_line``, slow).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import with_sections
from distil import cli
from distil.models import ModelConfig, TransformerLM
from distil.models.io import save_native

LATIN1 = "caf\xe9 cr\xe8me\n".encode("latin-1")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer, tiny_docs):
    """Read-only material the cases point at: a model with its tokenizer, a corpus, a config."""
    root = tmp_path_factory.mktemp("bad-inputs")
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=len(tiny_tokenizer), d_model=32, n_layers=2, n_heads=2,
                                      max_seq_len=64))
    save_native(model, root / "model", tokenizer=tiny_tokenizer)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_docs))
    cfg = {"teacher": {"source": "none"}, "student": {"d_model": 32, "n_layers": 1, "n_heads": 2},
           "data": {"source": "jsonl", "path": str(root / "corpus.jsonl"), "seq_len": 32, "val_fraction": 0.2,
                    "vocab_size": 300},
           "loss": {"kd_weight": 0.0, "ce_weight": 1.0},
           "train": {"steps": 2, "batch_size": 2, "progress": False, "val_every": 0, "device": "cpu"},
           "eval": {"val_batches": 1}}
    (root / "ok.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _config(world, here, **sections):
    cfg = with_sections(yaml.safe_load((world / "ok.yaml").read_text()), **sections)
    return str(_write(here / "c.yaml", yaml.safe_dump(cfg)))


def _finished_run(world, here):
    assert _run(["train", str(world / "ok.yaml"), "--run-dir", str(here / "done")]) == 0
    return str(here / "done")


def _locked_run(world, here):
    run = _finished_run(world, here)
    os.remove(Path(run) / "summary.json")
    _write(Path(run) / ".lock", json.dumps({"pid": os.getppid(), "host": os.uname().nodename, "time": 0}))
    return run


# (id, setup(world, here) -> argv, key words of the message). Paths in argv are under `here`.
CASES = [
    # configuration and --set
    ("set-yaml", lambda w, h: ["train", str(w / "ok.yaml"), "--set", "train.lr=[1"], ["not valid YAML"]),
    ("set-nan", lambda w, h: ["train", str(w / "ok.yaml"), "--set", "train.lr=.nan"], ["train.lr", "finite"]),
    ("set-inf", lambda w, h: ["train", str(w / "ok.yaml"), "--set", "loss.temperature=.inf"], ["finite"]),
    ("set-typo-key", lambda w, h: ["train", str(w / "ok.yaml"), "--set", "train.stpes=3"], ["train.stpes", "steps"]),
    ("set-typo-section", lambda w, h: ["train", str(w / "ok.yaml"), "--set", "trian.steps=3"], ["trian"]),
    ("set-no-equals", lambda w, h: ["train", str(w / "ok.yaml"), "--set", "train.steps"], ["section.key=value"]),
    ("set-zero-steps", lambda w, h: ["train", str(w / "ok.yaml"), "--set", "train.steps=0"], ["train.steps"]),
    ("set-bad-choice", lambda w, h: ["train", str(w / "ok.yaml"), "--set", "train.schedule=linear"],
     ["train.schedule", "cosine"]),
    ("set-wrong-type", lambda w, h: ["train", str(w / "ok.yaml"), "--set", "train.steps=many"], ["should be int"]),
    ("set-bad-threads", lambda w, h: ["train", str(w / "ok.yaml"), "--set", "train.threads=0"], ["train.threads"]),
    ("config-missing", lambda w, h: ["train", str(h / "none.yaml")], ["not found"]),
    ("config-bad-yaml", lambda w, h: ["train", str(_write(h / "c.yaml", "train: [1, 2\n"))], ["not valid YAML"]),
    ("config-latin1", lambda w, h: ["train", str(_write(h / "c.yaml", b"train:\n  steps: 3 # " + LATIN1))],
     ["not UTF-8"]),
    ("config-not-mapping", lambda w, h: ["train", str(_write(h / "c.yaml", "- 1\n- 2\n"))], ["mapping"]),
    ("api-without-endpoint", lambda w, h: ["train", _config(w, h, teacher={"source": "api"},
                                                           loss={"kd_weight": 1.0, "ce_weight": 0.0})],
     ["api.base"]),
    ("kd-without-teacher", lambda w, h: ["train", _config(w, h, loss={"kd_weight": 1.0})], ["kd_weight"]),
    # data
    ("data-missing", lambda w, h: ["train", _config(w, h, data={"path": str(h / "nope.jsonl")})], ["not found"]),
    ("data-jsonl-latin1", lambda w, h: ["train", _config(w, h, data={"path": str(
        _write(h / "d.jsonl", b'{"text": "ok"}\n{"text": "' + LATIN1.strip() + b'"}\n'))})], ["d.jsonl:2", "UTF-8"]),
    ("data-text-latin1", lambda w, h: ["train", _config(w, h, data={"source": "text", "path": str(
        _write(h / "d.txt", LATIN1 * 50))})], ["d.txt", "not UTF-8"]),
    ("data-bad-json", lambda w, h: ["train", _config(w, h, data={"path": str(_write(h / "d.jsonl", "{nope\n"))})],
     ["d.jsonl:1", "not valid JSON"]),
    ("data-no-field", lambda w, h: ["train", _config(w, h, data={"path": str(_write(h / "d.jsonl", '{"x": 1}\n'))})],
     ["no field 'text'"]),
    ("data-empty", lambda w, h: ["train", _config(w, h, data={"path": str(_write(h / "d.jsonl", "\n\n"))})],
     ["empty"]),
    ("data-too-small", lambda w, h: ["train", _config(w, h, data={"path": str(_tiny_corpus(h)),
                                                                "tokenizer": str(w / "model")})], ["split"]),
    # run folders
    ("run-dir-is-a-file", lambda w, h: ["train", str(w / "ok.yaml"), "--run-dir", str(_write(h / "f", "x"))],
     ["is a file"]),
    ("run-dir-under-a-file", lambda w, h: ["train", str(w / "ok.yaml"), "--run-dir", str(_write(h / "f", "x") / "r")],
     ["not a folder"]),
    ("finished-run-new-config", lambda w, h: ["train", str(w / "ok.yaml"), "--run-dir", _finished_run(w, h), "--set",
                                              "train.lr=0.01"], ["finished run", "train.lr"]),
    ("run-locked", lambda w, h: ["train", str(w / "ok.yaml"), "--run-dir", _locked_run(w, h)], ["in use by process"]),
    ("resume-nothing", lambda w, h: ["train", str(w / "ok.yaml"), "--run-dir", str(h / "r"), "--resume"],
     ["no checkpoint"]),
    ("foreign-folder", lambda w, h: ["train", str(w / "ok.yaml"), "--run-dir", str(_write(h / "r" / "mine.txt",
                                                                                          "x").parent)],
     ["not a distil run"]),
    # teachers and students
    ("teacher-missing", lambda w, h: ["train", _config(w, h, teacher={"source": "model", "path": str(h / "t")},
                                                      loss={"kd_weight": 1.0})], ["not found"]),
    ("tokenizer-mismatch", lambda w, h: ["train", _config(w, h, teacher={"source": "model", "path": str(w / "model")},
                                                         loss={"kd_weight": 1.0},
                                                         data={"tokenizer": str(_other_tokenizer(h))})],
     ["teacher's", "tokenizer", "allow_tokenizer_mismatch"]),
    ("seq-len-beyond-student", lambda w, h: ["train", _config(w, h, student={"path": str(w / "model")},
                                                             data={"seq_len": 128})], ["max_seq_len"]),
    ("cache-missing", lambda w, h: ["train", _config(w, h, teacher={"source": "cache", "cache": str(h / "c")},
                                                    loss={"kd_weight": 1.0})], ["no cache manifest"]),
    # generate
    ("generate-empty-prompt", lambda w, h: ["generate", str(w / "model"), "--prompt", ""], ["--prompt"]),
    ("generate-negative-tokens", lambda w, h: ["generate", str(w / "model"), "--prompt", "a", "--max-new-tokens",
                                               "-5"], ["--max-new-tokens", ">= 1"]),
    ("generate-negative-temperature", lambda w, h: ["generate", str(w / "model"), "--prompt", "a", "--temperature",
                                                    "-1"], ["--temperature"]),
    ("generate-missing-model", lambda w, h: ["generate", str(h / "nope"), "--prompt", "a"], ["not found", "nope"]),
    # hybridize
    ("hybridize-d-state-0", lambda w, h: ["hybridize", str(w / "model"), "--out", str(h / "o"), "--num-ssm", "1",
                                          "--d-state", "0"], ["--d-state"]),
    ("hybridize-num-ssm-0", lambda w, h: ["hybridize", str(w / "model"), "--out", str(h / "o"), "--num-ssm", "0"],
     ["--num-ssm"]),
    ("hybridize-bad-layers", lambda w, h: ["hybridize", str(w / "model"), "--out", str(h / "o"), "--layers", "a,b"],
     ["--layers"]),
    ("hybridize-layer-out-of-range", lambda w, h: ["hybridize", str(w / "model"), "--out", str(h / "o"), "--layers", "9"],
     ["not all attention layers"]),
    ("hybridize-out-exists", lambda w, h: ["hybridize", str(w / "model"), "--out", str(_write(h / "o" / "x", "")
                                                                                      .parent), "--num-ssm", "1"],
     ["already exists"]),
    # eval, export, report
    ("eval-nothing", lambda w, h: ["eval", "--model", str(w / "model")], ["nothing to evaluate"]),
    ("eval-out-under-a-file", lambda w, h: ["eval", "--model", str(w / "model"), "--data", str(w / "corpus.jsonl"),
                                            "--out", str(_write(h / "f", "x") / "r.json")], ["not a folder"]),
    ("eval-run-missing", lambda w, h: ["eval", "--model", str(w / "model"), "--data", str(w / "corpus.jsonl"),
                                       "--run", str(h / "nope")], ["run folder not found"]),
    ("eval-data-missing", lambda w, h: ["eval", "--model", str(w / "model"), "--data", str(h / "missing.txt")],
     ["--data", "missing.txt", "no such file"]),
    ("eval-mc-missing", lambda w, h: ["eval", "--model", str(w / "model"), "--mc", str(h / "items.jsonl")],
     ["--mc", "items.jsonl", "no such file"]),
    ("eval-model-missing", lambda w, h: ["eval", "--model", str(h / "nope"), "--data", str(w / "corpus.jsonl")],
     ["not found", "nope"]),
    ("export-out-exists", lambda w, h: ["export", str(w / "model"), "--out", str(_write(h / "o" / "x", "").parent)],
     ["already exists"]),
    ("export-under-a-file", lambda w, h: ["export", str(w / "model"), "--out", str(_write(h / "f", "x") / "o")],
     ["not a folder"]),
    ("report-bad-baseline", lambda w, h: ["report", str(h), "--out", str(h / "rep"), "--baseline", "nonsense"],
     ["NAME=VALUE"]),
    # study
    ("study-teacher-missing", lambda w, h: ["study", "--teacher", str(h / "nope"), "--out", str(h / "s")],
     ["not a model folder"]),
    ("study-only-bad", lambda w, h: ["study", "--only", "nope"], ["invalid choice"]),
    ("study-out-not-a-study", lambda w, h: ["study", "--teacher", str(w / "model"), "--out",
                                            str(_write(h / "o" / "x", "").parent)], ["not a study folder"]),
    # on-policy
    ("policy-without-prompts", lambda w, h: ["train", str(w / "ok.yaml"), "--set", "loss.policy=gkd"],
     ["rollout.prompts"]),
    ("rollout-top-p", lambda w, h: ["train", str(w / "ok.yaml"), "--set", "rollout.top_p=2"], ["rollout.top_p"]),
    ("rollout-prompts-missing", lambda w, h: ["train", str(w / "ok.yaml"), "--run-dir", str(h / "r"), "--set",
                                              f"rollout.prompts={h / 'nope.jsonl'}"], ["prompt file not found"]),
    # caches and imports
    ("cache-level", lambda w, h: ["cache-teacher", str(w / "ok.yaml"), "--out", str(h / "c"), "--level", "30"],
     ["--level"]),
    ("cache-k-0", lambda w, h: ["cache-teacher", str(w / "ok.yaml"), "--out", str(h / "c"), "--k", "0"], ["--k"]),
    ("cache-stats-missing", lambda w, h: ["cache-teacher", "--stats", str(h / "c")], ["no cache manifest"]),
    ("import-missing", lambda w, h: ["import-logprobs", str(h / "r.jsonl"), "--tokenizer", str(w / "model"), "--out",
                                     str(h / "c")], ["does not exist"]),
    ("import-latin1", lambda w, h: ["import-logprobs", str(_write(h / "r.jsonl", LATIN1)), "--tokenizer",
                                    str(w / "model"), "--out", str(h / "c")], ["r.jsonl:1", "UTF-8"]),
    # the command line itself
    ("unknown-command", lambda w, h: ["nonsense"], ["invalid choice"]),
    ("unknown-option", lambda w, h: ["train", str(w / "ok.yaml"), "--stpes", "3"], ["unrecognized"]),
]


def _tiny_corpus(here: Path) -> Path:
    return _write(here / "d.jsonl", "".join(json.dumps({"text": f"tiny doc {i}"}) + "\n" for i in range(6)))


def _other_tokenizer(here: Path) -> Path:
    from distil.data.tokenize import train_bpe_tokenizer

    out = here.parent / f"{here.name}-other-tokenizer"  # outside `here`: not part of what must stay unchanged
    train_bpe_tokenizer(["a completely different corpus of words"] * 30, 280, out)
    return out


def _run(argv) -> int:
    try:
        cli.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def _snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, make, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(name, make, words, world, tmp_path, monkeypatch, capsys):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    argv = make(world, here)
    before, world_before = _snapshot(here), _snapshot(world)
    capsys.readouterr()
    code = _run(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    if os.environ.get("DISTIL_SHOW_ERRORS"):
        print(f"\n[{name}] {err.strip()}")
    assert code == 2, (name, code, err)
    assert len(lines) == 1 and lines[0].startswith("distil: error:"), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert _snapshot(here) == before, "the failed command created or changed files"
    assert _snapshot(world) == world_before


def test_read_only_output_folder(world, tmp_path, monkeypatch, capsys):
    """A folder the user cannot write to: one line naming it (as root every folder is writable: skip)."""
    if os.geteuid() == 0:
        pytest.skip("root can write to a read-only folder; the under-a-file cases cover the OS-error path")
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code = _run(["train", str(world / "ok.yaml"), "--run-dir", str(locked / "run")])
        assert code == 2
        assert "permission denied" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


def test_worker_errors_are_unwrapped_to_their_first_line():
    from distil.train.batches import worker_error_line

    wrapped = ("Caught DistilError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\n    raise DistilError(msg)\n'
               "distil.errors.DistilError: cache shard s.bin is corrupt: block 3 fails its CRC32 checksum\n")
    assert worker_error_line(wrapped) == "cache shard s.bin is corrupt: block 3 fails its CRC32 checksum"
    assert worker_error_line("plain message") == "plain message"


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["train", "configs/debug.yaml", "--set", "train.lr=[1"],
                                  ["generate", "nowhere", "--prompt", ""],
                                  ["train", "configs/debug.yaml", "--run-dir", "README.md"]])
def test_the_whole_stderr_is_one_line(argv):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "distil", *argv], capture_output=True, text=True, cwd=root,
                         timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
