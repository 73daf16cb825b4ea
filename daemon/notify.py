"""sd_notify over $NOTIFY_SOCKET, by hand (no dependency).

systemd's ``Type=notify`` waits for ``READY=1``; ``WatchdogSec=`` expects ``WATCHDOG=1`` at
least every ``WATCHDOG_USEC``. We send it from the main loop (not a thread), so a hung loop
stops the pings and systemd restarts us. Everything is a no-op when the variable is unset.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends datagrams to the systemd notify socket, if there is one."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr: str | None = None
        if addr:
            # '@' is the abstract namespace: a leading NUL byte on the wire.
            self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval_s: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval_s = int(usec) / 1_000_000 / 2  # ping at half the timeout

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram. Never raises and never blocks.

        A full socket buffer (a receiver that stopped reading) must not stall the main loop:
        the datagram is dropped instead, as a lost ping is not fatal.
        """
        if self._addr is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.connect(self._addr)
                sock.send("\n".join(fields).encode())
        except OSError:  # includes BlockingIOError on a full buffer
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, line: str) -> bool:
        return self.send(f"STATUS={line.replace(chr(10), ' ')}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")
