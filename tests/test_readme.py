"""README.md's "Using it" block runs top to bottom in a fresh folder, each command as written.

The block follows the quick start, so the test first makes ``runs/demo/`` with a tiny demo (the
same code as ``distil demo``, smaller settings). Then every command of the block runs in order,
with only these changes to keep it to about a minute (README says so beside the block):

* ``--set train.steps=2`` on every ``distil train`` (torchrun included);
* ``smollm2`` (the real teacher, ~1 min per conversion) becomes the demo's teacher, with
  ``--num-ssm 2`` and ``--align-steps 2``;
* ``distil study`` runs ``--budget smoke`` on the demo's teacher, three of its experiments.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def readme_block() -> list[str]:
    """The commands of the "Using it" block, comments dropped."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Using it"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def made_tiny(command: str) -> list[str]:
    argv = shlex.split(command)
    if "train" in argv:
        argv += ["--set", "train.steps=2"]
    if "smollm2" in argv:
        argv[argv.index("smollm2")] = "runs/demo/checkpoints/teacher"
        for flag, value in (("--num-ssm", "2"), ("--align-steps", "2")):
            if flag in argv:
                argv[argv.index(flag) + 1] = value
    if argv[:2] == ["distil", "study"]:
        argv += ["--budget", "smoke", "--teacher", "runs/demo/checkpoints/teacher", "--only", "init", "loss", "tiny-kd"]
    return argv


def test_the_block_is_what_this_test_expects():
    commands = readme_block()
    assert len(commands) >= 20 and all(c.split()[0] in ("distil", "torchrun") for c in commands)
    assert sum(c.startswith("torchrun") for c in commands) == 2
    # Every path the block reads is made by the quick start or by an earlier line, or ships with distil.
    assert "runs/demo/held_out.jsonl" in " ".join(commands) and "examples/responses.jsonl" in " ".join(commands)


def test_using_it_runs_top_to_bottom_in_a_fresh_folder(tmp_path, monkeypatch, capsys):
    from distil.cli import main
    from distil.demo import DemoSettings, run_demo

    for folder in ("configs", "examples"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_demo("runs/demo", progress=False, settings=DemoSettings(
        vocab_size=384, seq_len=128, batch_size=4, teacher=(48, 4, 2), student=(32, 1, 2), teacher_steps=4,
        student_steps=2, val_every=2, val_batches=1, mc_items=8, max_docs=150, hybrid_steps=1, decode_tokens=2,
        decode_context=8, seeds=2))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for command in readme_block():
        argv = made_tiny(command)
        if argv[0] == "torchrun":  # the launcher in its own process, as a user runs it
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", *argv[1:]]
            done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
            continue
        try:  # distil's own entry point in this process (saves the imports of a new one per line)
            main(argv[1:])
        except SystemExit as e:
            assert e.code in (0, None), f"{command}: exit {e.code}\n{capsys.readouterr().err[-3000:]}"
    # What the block made, in the order it made it.
    assert (tmp_path / "reports" / "ce-vs-kd" / "report.md").is_file()
    import json

    assert json.loads((tmp_path / "exported" / "config.json").read_text())["architectures"] == ["GraniteMoeHybridForCausalLM"]
    assert len(json.loads((tmp_path / "hybrid" / "layer_scores.json").read_text())["ssm_layers"]) == 2
    import gguf

    assert gguf.GGUFReader(tmp_path / "student.gguf").fields["general.architecture"].contents() == "granitehybrid"
    assert (tmp_path / "caches" / "api" / "manifest.json").is_file()
    report = (tmp_path / "reports" / "ce-vs-kd" / "report.md").read_text()
    assert "final_accuracy.png" in report  # the demo's final accuracies, read from its run folders
