"""One writer per state dir: an exclusive ``flock`` on ``<state_dir>/evergreen.lock``.

``evergreen run``/``serve`` take it before anything else and hold it for the daemon's
life; the CLI commands that write (``train --now``, ``promote``, ``rollback``, ``ingest``,
``seed-model --force``) take it for their run; beside a running daemon ``promote`` and
``rollback`` ask it to do the work instead (:mod:`daemon.serving.requests`). Read-only
commands never do. The lock is
the kernel's: it goes with the process that holds it, so a daemon killed with SIGKILL
leaves no stale lock behind. The file itself stays (deleting it would race a new holder);
it holds ``<pid> <command>`` of the current holder, for the message a refused process
prints. The descriptor is not inherited by child processes (Python opens descriptors
non-inheritable), so a vLLM or stage process that outlives the daemon does not hold it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from daemon.errors import EvergreenError

LOCK_FILE = "evergreen.lock"
DAEMON_COMMANDS = ("evergreen run", "evergreen serve")
_READ_TRIES = 20  # the holder writes its pid right after taking the lock


class StateLockError(EvergreenError, RuntimeError):
    """The lock file cannot be created or locked (the message says which and why)."""


class StateDirBusy(StateLockError):
    """Another process holds the state dir; ``pid``/``command`` say which (None: unknown)."""

    def __init__(
        self, state_dir: Path, pid: int | None, command: str, message: str | None = None
    ) -> None:
        self.state_dir, self.pid, self.command = state_dir, pid, command
        super().__init__(message or f"{self.holder()} holds {state_dir}: wait for it to finish")

    def saying(self, message: str) -> StateDirBusy:
        """The same refusal with a message for the command that was refused."""
        return StateDirBusy(self.state_dir, self.pid, self.command, message)

    @property
    def daemon(self) -> bool:
        return self.command in DAEMON_COMMANDS or not self.command

    def holder(self) -> str:
        pid = f"pid {self.pid}" if self.pid else "pid unknown"
        if self.daemon:
            return f"another Evergreen daemon ({pid})"
        return f"`{self.command}` ({pid})"


class StateLock:
    """A held lock; ``release()`` (or leaving ``with``) gives it back. Idempotent."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> StateLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def acquire(state_dir: Path, command: str) -> StateLock:
    """Take the state dir's lock for ``command`` without waiting; raises
    :class:`StateDirBusy` when another process holds it."""
    path = Path(state_dir) / LOCK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StateLockError(f"cannot create the lock file {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid, holder = read_holder(path)
        raise StateDirBusy(Path(state_dir), pid, holder) from None
    except OSError as exc:
        os.close(fd)
        raise StateLockError(f"cannot lock {path}: {exc.strerror}") from exc
    with contextlib.suppress(OSError):  # the message of a refused process; not the lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
    return StateLock(path, fd)


def read_holder(path: Path) -> tuple[int | None, str]:
    """``(pid, command)`` written by the holder; ``(None, "")`` if it has not written yet."""
    for _ in range(_READ_TRIES):
        try:
            text = path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            text = ""
        pid, _, command = text.partition(" ")
        if pid.isdigit():
            return int(pid), command.strip()
        time.sleep(0.05)
    return None, ""
