"""Thread count on a shared machine: distil.runtime's ThreadGovernor and how it is chosen."""

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from distil import runtime
from distil.runtime import ThreadGovernor, set_threads


class FakeMachine:
    """Cumulative CPU seconds as /proc/stat and os.times would give them, advanced by hand."""

    def __init__(self):
        self.now = self.busy = self.own = 0.0

    def advance(self, seconds: float, *, own_cores: float, other_cores: float):
        self.now += seconds
        self.own += own_cores * seconds
        self.busy += (own_cores + other_cores) * seconds

    def governor(self, max_threads: int, **kw) -> ThreadGovernor:
        return ThreadGovernor(max_threads, read=lambda: (self.busy, self.own), clock=lambda: self.now, **kw)


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    runtime._governor = None


def test_the_governor_gives_up_the_cores_others_take_and_takes_them_back(keep_threads, caplog):
    machine = FakeMachine()
    governor = machine.governor(2)
    machine.advance(1.0, own_cores=2.0, other_cores=0.05)  # a quiet machine: background noise only
    assert governor.poll() == 2
    with caplog.at_level(logging.INFO, logger="distil"):
        machine.advance(1.0, own_cores=1.4, other_cores=0.6)  # a competitor, starved by our spinning threads
        assert governor.poll() == 1 and torch.get_num_threads() == 1
        assert governor.others == pytest.approx(0.6)
        machine.advance(1.0, own_cores=1.0, other_cores=1.0)  # now it has its core: stay at one thread
        assert governor.poll() == 1
        machine.advance(1.0, own_cores=1.0, other_cores=0.0)  # it finished
        assert governor.poll() == 2 and torch.get_num_threads() == 2
        machine.advance(1.0, own_cores=1.4, other_cores=0.6)
        assert governor.poll() == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "0.6 of 2 cores" in warnings[0].getMessage()  # one warning a process
    assert "DISTIL_NUM_THREADS" in warnings[0].getMessage()


def test_the_governor_looks_at_most_once_an_interval(keep_threads):
    machine = FakeMachine()
    governor = machine.governor(2, interval=1.0)
    machine.advance(0.5, own_cores=0.5, other_cores=2.0)
    assert governor.poll() == 2  # too soon to judge
    machine.advance(0.6, own_cores=0.5, other_cores=2.0)
    assert governor.poll() == 1


@pytest.mark.parametrize("others, threads", [(0.0, 16), (0.29, 16), (0.31, 15), (1.0, 15), (3.5, 12), (40.0, 1)])
def test_the_governor_leaves_the_free_cores(keep_threads, others, threads):
    machine = FakeMachine()
    governor = machine.governor(16)
    machine.advance(2.0, own_cores=4.0, other_cores=others)
    assert governor.poll() == threads


def test_the_default_follows_the_load_and_a_choice_is_fixed(keep_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("DISTIL_NUM_THREADS", raising=False)
    assert set_threads() is None and runtime._governor is not None  # auto: the governor runs
    assert runtime._governor.max_threads == os.cpu_count()
    assert set_threads(1) == 1 and runtime._governor is None and torch.get_num_threads() == 1  # train.threads
    monkeypatch.setenv("DISTIL_NUM_THREADS", "auto")
    assert set_threads() is None and runtime._governor is not None
    monkeypatch.setenv("DISTIL_NUM_THREADS", "torch")  # torch's fixed default, as before the governor
    assert set_threads() is None and runtime._governor is None
    monkeypatch.setenv("DISTIL_NUM_THREADS", "auto")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user chose through OpenMP
    assert set_threads() is None and runtime._governor is None


def _stranger_busy_loop() -> int:
    """A busy loop that is not this process's child (started by a child that exits at once): a
    competitor as another user's job would be. Returns its pid."""
    starter = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'while True: pass'], "
               "start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)")
    return int(subprocess.run([sys.executable, "-c", starter], capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not os.path.exists("/proc/stat"), reason="needs 2 cores and /proc")
def test_a_real_competing_process_takes_a_thread_away(keep_threads):
    """The real /proc reading: a busy loop of another process shows as another's core."""
    competitor = _stranger_busy_loop()
    try:
        time.sleep(0.2)
        governor = ThreadGovernor(os.cpu_count(), interval=1.0)
        time.sleep(1.2)
        assert governor.poll() < os.cpu_count()
        assert governor.others > 0.5
    finally:
        os.kill(competitor, signal.SIGKILL)


def test_own_children_are_not_competitors(keep_threads):
    """DataLoader workers and other children of this process count as its own work."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])

    def child_seconds():  # the child's own CPU time, from the kernel (utime + stime)
        fields = open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    try:
        time.sleep(0.3)
        _, own_before, child_before = *runtime._cpu_seconds(), child_seconds()
        time.sleep(1.0)
        _, own_after, child_after = *runtime._cpu_seconds(), child_seconds()
    finally:
        child.kill()
        child.wait()
    # However busy the machine (the child gets what the scheduler gives it), its CPU counts as ours.
    assert child_after - child_before > 0.05
    assert own_after - own_before >= 0.9 * (child_after - child_before)


def test_training_adapts_its_threads_every_step(keep_threads, monkeypatch, tmp_path, tiny_tokenizer, tiny_corpus_file):
    from distil.config import config_from_dict
    from distil.data.dataset import build_data
    from distil.train import loop

    calls = []
    monkeypatch.setattr(loop, "adapt_threads", lambda: calls.append(1))
    cfg = config_from_dict({
        "teacher": {"source": "none"},
        "student": {"d_model": 32, "n_layers": 2, "n_heads": 2},
        "data": {"source": "jsonl", "path": str(tiny_corpus_file), "seq_len": 32, "val_fraction": 0.2},
        "loss": {"kd_weight": 0.0, "ce_weight": 1.0},
        "train": {"steps": 3, "batch_size": 4, "progress": False, "val_every": 0, "device": "cpu"},
    })
    loop.train(cfg, tokenizer=tiny_tokenizer, data=build_data(cfg.data, tiny_tokenizer))
    assert len(calls) == 3
