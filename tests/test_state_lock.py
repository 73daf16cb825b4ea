"""One writer per state dir (``<state_dir>/evergreen.lock``), and one-line start-up errors.

Real daemons as subprocesses (tiny seed model, no vLLM, no warm stage process), real
sockets, the real CLI: a second daemon is refused and the first keeps running; write
commands beside the daemon are refused with what to do instead (promote and rollback are
asked of the daemon instead); read-only ones are not;
a daemon killed with SIGKILL leaves no stale lock; a port in use is one line and exit 1.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from daemon import statelock

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_cfg(tmp_path: Path, base_model: Path, metrics_port: int, extra: str = "") -> Path:
    cfg = tmp_path / "evergreen.toml"
    cfg.write_text(
        f"""
state_dir = "{tmp_path / "state"}"
inbox_dir = "{tmp_path / "inbox"}"
base_model = "{base_model}"
stop_grace_s = 10.0

[seed]
size = "tiny"

[training]
prewarm = false

[serving]
mode = "none"

[metrics]
host = "127.0.0.1"
port = {metrics_port}
{extra}
""",
        encoding="utf-8",
    )
    return cfg


def cli(cfg: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def start_daemon(
    cfg: Path, log: Path, started: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--config", str(cfg), "run"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
    started.append(proc)
    return proc


def wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"daemon exited {proc.returncode}:\n{log.read_text()}"
        try:
            up = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            up = False
        if up and "evergreen ready" in log.read_text(errors="replace"):
            return
        time.sleep(0.3)
    raise AssertionError(f"daemon not ready within {WAIT_S:.0f} s:\n{log.read_text()}")


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The refused command's stderr: exactly one line, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


# ---------------------------------------------------------------------------- in-process
def test_the_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    with statelock.acquire(tmp_path / "s", "evergreen run"):
        with pytest.raises(statelock.StateDirBusy) as busy:
            statelock.acquire(tmp_path / "s", "evergreen ingest")
        assert busy.value.pid == os.getpid() and busy.value.daemon
        assert busy.value.holder() == f"another Evergreen daemon (pid {os.getpid()})"
    with statelock.acquire(tmp_path / "s", "evergreen train --now"):  # released: free again
        with pytest.raises(statelock.StateDirBusy) as busy:
            statelock.acquire(tmp_path / "s", "evergreen run")
        assert not busy.value.daemon
        assert busy.value.holder() == f"`evergreen train --now` (pid {os.getpid()})"


def test_a_file_in_the_way_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a dir")
    with pytest.raises(statelock.StateLockError, match="cannot create the lock file"):
        statelock.acquire(tmp_path / "state", "evergreen run")


# ---------------------------------------------------------------------------- daemons
def test_second_daemon_and_write_commands_are_refused_reads_are_not(
    tmp_path: Path, tiny_seed_model: Path, daemons: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    cfg = write_cfg(tmp_path, tiny_seed_model, port)
    state = tmp_path / "state"
    log1 = tmp_path / "daemon1.log"
    first = start_daemon(cfg, log1, daemons)
    wait_healthy(first, port, log1)

    second = cli(cfg, "run")  # its metrics port is the first one's: the lock must come first
    line = one_error_line(second)
    assert line == f"error: another Evergreen daemon (pid {first.pid}) holds {state}: stop it first"
    assert "metrics port" not in second.stdout + second.stderr

    doc = tmp_path / "note.md"
    doc.write_text("# a note\n\nsome words about something.\n")
    refusals = {
        ("train", "--now"): "drop files into the inbox",
        ("ingest", str(doc)): f"copy the files into its inbox ({tmp_path / 'inbox'})",
        ("seed-model", "--force"): "stop it to rebuild it",
    }
    for args, hint in refusals.items():
        line = one_error_line(cli(cfg, *args))
        assert line.startswith(
            f"error: the Evergreen daemon (pid {first.pid}) is running on {state}: "
        ), line
        assert hint in line, line
    # promote/rollback are not refused: the daemon performs them and answers (test_requests)
    assert (
        one_error_line(cli(cfg, "rollback")) == "error: nothing to roll back: no adapter is current"
    )
    assert one_error_line(cli(cfg, "promote", "v0001")) == (
        "error: unknown adapter version 'v0001' on track 'default'"
    )
    for args in (("status",), ("adapters",), ("config", "show")):  # read-only: never locked
        proc = cli(cfg, *args)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)

    # the first daemon never noticed: still alive, healthy, and nothing was ingested
    assert first.poll() is None
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    status = cli(cfg, "status", "--json")
    assert '"stages"' in status.stdout and "note.md" not in status.stdout
    text = log1.read_text(errors="replace")
    assert "received SIGTERM" not in text and "Traceback" not in text


def test_a_daemon_is_refused_while_train_now_holds_the_state_dir(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    cfg = write_cfg(tmp_path, tiny_seed_model, free_port())
    state = tmp_path / "state"
    with statelock.acquire(state, "evergreen train --now"):
        line = one_error_line(cli(cfg, "run"))
    assert line == (
        f"error: `evergreen train --now` (pid {os.getpid()}) holds {state}:"
        " wait for it to finish, or stop it first"
    )
    assert not (state / "evergreen.db").exists()  # refused before it touched the store


def test_a_killed_daemon_leaves_no_stale_lock(
    tmp_path: Path, tiny_seed_model: Path, daemons: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    cfg = write_cfg(tmp_path, tiny_seed_model, port)
    log = tmp_path / "daemon.log"
    first = start_daemon(cfg, log, daemons)
    wait_healthy(first, port, log)
    first.kill()  # SIGKILL: no clean-up of any kind
    first.wait(30)
    assert (tmp_path / "state" / statelock.LOCK_FILE).exists()  # the file stays, the lock not
    second = start_daemon(cfg, log, daemons)
    wait_healthy(second, port, log)
    assert second.poll() is None


def test_metrics_port_in_use_is_one_line_and_exit_1(tmp_path: Path, tiny_seed_model: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        cfg = write_cfg(tmp_path, tiny_seed_model, port)
        proc = cli(cfg, "run")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    want = f"metrics port 127.0.0.1:{port} is in use (metrics.port)"
    assert len([line for line in out.splitlines() if want in line]) == 1, out
    assert not re.search(r"ERROR .*\n\s", out), out  # the error line is not wrapped


def test_vllm_port_in_use_is_one_line_and_exit_1(tmp_path: Path, tiny_seed_model: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        vport = int(taken.getsockname()[1])
        extra = f'\n[serving]\nmode = "managed"\nhost = "127.0.0.1"\nport = {vport}\n'
        cfg = write_cfg(tmp_path, tiny_seed_model, free_port())
        text = cfg.read_text().replace('[serving]\nmode = "none"\n', "") + extra
        cfg.write_text(text)
        proc = cli(cfg, "serve")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    want = f"127.0.0.1:{vport} is already in use (serving.port)"
    assert len([line for line in out.splitlines() if want in line]) == 1, out
