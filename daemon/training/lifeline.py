"""Subprocesses of the daemon end with it, even when it is SIGKILLed.

A stage, warm stage or scorer process outlived a daemon killed with SIGKILL (the OOM
killer, ``kill -9``; systemd's ``KillMode=mixed`` cleans up only when systemd runs it):
each restart of a crash-looping daemon then added a scorer and a warm stage importing
torch beside the old ones. :func:`die_with_parent`, called first thing in a child's
``main``, asks the kernel (Linux ``prctl(PR_SET_PDEATHSIG)``) to send SIGTERM when the
process that started it dies: a stage then checkpoints and exits (the next daemon resumes
it), a scorer or an idle warm process just exits. Elsewhere it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Get ``sig`` when the parent dies; True when the kernel took the request."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent or parent == 1:  # it died before the request: act now
        with contextlib.suppress(OSError):
            os.kill(os.getpid(), sig)
    return True
