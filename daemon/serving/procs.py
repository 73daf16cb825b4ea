"""Process-group helpers of the managed vLLM server (no vLLM knowledge beyond its name)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


def pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_stale_group(pgid_path: Path, grace: float) -> None:
    """A daemon killed with SIGKILL leaves its vLLM running (and holding the port).

    Its process group id is in ``<state>/vllm.pgid``; if that group still holds a vLLM
    server, end it before starting ours. Only a group whose members run vLLM is touched.
    """
    try:
        pgid = int(pgid_path.read_text().strip())
    except (OSError, ValueError):
        return
    members = [p for p in psutil.process_iter(["cmdline"]) if pgid_of(p.pid) == pgid]
    if not any("vllm" in " ".join(p.info.get("cmdline") or []) for p in members):
        return
    log.warning("stopping vLLM left by a previous run (process group %d)", pgid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    _gone, alive = psutil.wait_procs(members, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
