"""A SIGKILLed daemon's children: they end with it, and a stage stops resumably
(regressions found by the kill loop in tests/faults/kills.py).

The kill loop found a scorer and a warm stage process of every killed daemon still
running (importing torch, then scoring) after the next daemon had stopped cleanly.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.harness import ROOT

PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(child.pid, flush=True)
time.sleep(300)
"""
CHILD = """
import sys, time
from pathlib import Path
from daemon.training.lifeline import die_with_parent
assert die_with_parent()
Path(sys.argv[1]).write_text("armed")
time.sleep(300)
"""


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_a_child_ends_when_its_parent_is_sigkilled(tmp_path: Path) -> None:
    armed = tmp_path / "armed"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, str(armed)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while not armed.exists():  # the child is up and has asked for its signal
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.1)
        assert not _gone(child, 0.5)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert _gone(child, 20), "the child outlived its SIGKILLed parent"
    finally:
        if not _gone(child, 0):
            psutil.Process(child).kill()


def test_a_stage_outlives_a_closed_progress_pipe() -> None:
    """Regression: a stage of a SIGKILLed daemon wrote its next progress line into the
    closed pipe and was marked failed (BrokenPipeError) instead of stopping resumably."""
    script = (
        "from daemon.training.report import emit\n"
        "for i in range(200):\n"
        "    emit('step', step=i, pad='x' * 1000)\n"
        "print('still here', file=__import__('sys').stderr)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone, as with a killed daemon
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "still here" in err and "BrokenPipeError" not in err
