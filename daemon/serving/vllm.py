"""The managed vLLM server: a supervised child process of the daemon.

:class:`ManagedVLLM` runs ``python -m vllm.entrypoints.openai.api_server`` as a child in its
own process group (vLLM forks an engine-core process; killing the group leaves no orphans),
writes its output to ``<state>/logs/vllm.log`` and restarts it with exponential backoff when it
dies. Supervision is :meth:`ManagedVLLM.check`, one non-blocking step the daemon calls from its
main loop (every few seconds; no thread of its own, so a hung main loop is visible to the
systemd watchdog); it returns True when a restarted vLLM has just become healthy, and runs the
``on_restart`` callbacks then, so the caller reconciles adapters at once and the stable name
serves the current version again within seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from daemon.config import Config
from daemon.scheduling import placement
from daemon.serving.apikey import load_or_create_admin_secret, load_or_create_api_key
from daemon.serving.audit import record_event
from daemon.serving.client import (
    PLUGIN_NAME,
    InsecureEndpointError,
    VLLMClient,
    VLLMError,
    is_loopback,
)
from daemon.serving.dtype import dtype_args
from daemon.serving.engine import EngineWatch, died_in_log
from daemon.serving.procs import group_alive, kill_stale_group, port_in_use, write_atomic
from daemon.serving.vllm_guard import SECRET_ENV

__all__ = ["ManagedVLLM", "VLLMError"]

log = logging.getLogger(__name__)

HEALTH_POLL_S = 0.5
STOP_GRACE_S = 20.0
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 60.0
STABLE_AFTER_S = 120.0  # healthy this long after a restart resets the backoff
START_MARKER = "=== evergreen: starting vLLM"
UNHEALTHY_RESTART_S = 60.0  # alive but failing /health this long after being up -> restart


class ManagedVLLM:
    """vLLM as a supervised child process of the daemon.

    ``start()`` launches it (non-blocking), ``wait_healthy()`` blocks until ``/health`` answers,
    ``stop()`` ends it and its engine process (SIGTERM to the group, SIGKILL after a grace).
    ``check()`` (called by the owner's loop) restarts it with exponential backoff (1 s
    doubling to 60 s) when it dies or stays unhealthy, then calls ``on_restart`` callbacks.
    Attributes ``up``, ``restarts`` and ``last_healthy_at`` are for metrics.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        on_restart: Callable[[], object] | None = None,
        on_engine_recovered: Callable[[float], None] | None = None,
        python: str = sys.executable,
    ) -> None:
        sc = cfg.serving
        if not is_loopback(sc.host) and not sc.api_key:
            raise InsecureEndpointError(
                f"serving.host = {sc.host!r} is not loopback: set serving.api_key to expose vLLM"
            )
        self.cfg = cfg
        self.python = python
        self.api_key = load_or_create_api_key(cfg)
        self.admin_secret = load_or_create_admin_secret(cfg)
        host = f"[{sc.host}]" if ":" in sc.host else sc.host
        self.url = f"http://{host}:{sc.port}"
        self.log_path = cfg.logs_dir / "vllm.log"
        self.on_restart: list[Callable[[], object]] = [on_restart] if on_restart else []
        # Called with the recovery time (engine death noticed -> restarted and reconciled).
        self.on_engine_recovered = [on_engine_recovered] if on_engine_recovered else []
        self.engine = EngineWatch()
        self.engine_restarts = 0
        self.last_recovery_s = 0.0
        self._engine_dead_at: float | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.up = False
        self.restarts = 0
        self.last_healthy_at = 0.0
        self._started_at = 0.0
        self._backoff = BACKOFF_INITIAL_S
        self._next_restart_at = 0.0
        self._unhealthy_since: float | None = None
        self._restarting = False
        self.last_error = ""
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._client: VLLMClient | None = None
        self.placement = placement.for_config(cfg)
        log.info("%s", self.placement.describe())

    # -- the child --------------------------------------------------------------------------
    @property
    def endpoint(self) -> VLLMClient:
        """The HTTP client for this server (named ``host:port``, as metrics label it)."""
        if self._client is None:
            self._client = VLLMClient(
                self.url,
                self.api_key,
                timeout=self.cfg.serving.request_timeout_s,
                admin_secret=self.admin_secret,
            )
        return self._client

    def command(self) -> list[str]:
        sc = self.cfg.serving
        return [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.cfg.resolved_base_model()),
            "--host",
            sc.host,
            "--port",
            str(sc.port),
            "--enable-lora",
            "--max-lora-rank",
            str(sc.max_lora_rank),
            "--max-loras",
            str(sc.max_loras),
            "--max-cpu-loras",
            str(max(sc.max_cpu_loras, sc.max_loras)),
            "--max-model-len",
            str(sc.max_model_len),
            *self.placement.serving_args([str(a) for a in sc.extra_args]),
            *dtype_args(sc, self.environment()),
            *[str(a) for a in sc.extra_args],
        ]

    def environment(self) -> dict[str, str]:
        """The child's env: our plugin and the per-version resolver on, key out of ``ps``."""
        env = dict(os.environ)
        # 0: the model runs in the engine process, not in a worker it spawns (re-importing
        # torch and vLLM): cold start 68-70 -> 45-48 s on 2 loaded cores (#12).
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        resolver_dir = self.cfg.serving_dir / "resolve"
        resolver_dir.mkdir(parents=True, exist_ok=True)
        env.update(
            {
                "VLLM_API_KEY": self.api_key,  # same as --api-key, but not visible in ps
                SECRET_ENV: self.admin_secret,  # our plugin's admin routes (load, alias)
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                "VLLM_PLUGINS": f"{PLUGIN_NAME},lora_filesystem_resolver",
                "VLLM_LORA_RESOLVER_CACHE_DIR": str(resolver_dir),
                "VLLM_CPU_KVCACHE_SPACE": str(self.cfg.serving.kvcache_space_gib),
                "PYTHONUNBUFFERED": "1",
                **self.placement.serving_env(),  # its cores (OpenMP binding) and GPUs
            }
        )
        return env

    def start(self) -> None:
        """Launch vLLM (returns at once; see :meth:`wait_healthy`)."""
        with self._lock:
            self._stop.clear()
            if self.proc is not None and self.proc.poll() is None:
                return
            self._kill_group()  # leftovers of a crashed run (its engine process) go first,
            kill_stale_group(self.pgid_path, STOP_GRACE_S)  # or of a SIGKILLed daemon
            sc = self.cfg.serving
            if port_in_use(sc.host, sc.port):
                raise VLLMError(
                    f"cannot start vLLM: {sc.host}:{sc.port} is already in use (serving.port)"
                )
            base = self.cfg.resolved_base_model()
            if not (base / "config.json").exists():
                raise VLLMError(f"cannot start vLLM: no model at {base} (config.json missing)")
            self._next_restart_at = 0.0
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as logf:
                logf.write(f"\n{START_MARKER} at {time.ctime()} ===\n".encode())
                logf.flush()
                self.proc = subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env=self.environment(),
                    start_new_session=True,  # own process group: stop() kills the engine too
                    cwd=str(self.cfg.state_path),
                )
            self._pin(self.proc.pid)
            write_atomic(self.pgid_path, f"{self.proc.pid}\n")
            self._started_at = time.monotonic()
            self._unhealthy_since = None
            log.info("vLLM starting (pid %d) on %s, log %s", self.proc.pid, self.url, self.log_path)

    def _pin(self, pid: int) -> None:
        """vLLM's processes (the engine inherits it) on its cores too; best effort."""
        with contextlib.suppress(OSError):
            if self.placement.enabled and self.placement.serving_cpus:
                os.sched_setaffinity(pid, self.placement.serving_cpus)

    @property
    def pgid_path(self) -> Path:
        return self.cfg.state_path / "vllm.pgid"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_healthy(self, timeout: float | None = None) -> bool:
        """Block until ``/health`` answers 200 (True); False on timeout or if vLLM exits.

        On False the reason and the log tail are logged; ``last_error`` holds the reason.
        """
        timeout = self.cfg.serving.startup_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        client = self.endpoint
        while time.monotonic() < deadline:
            if not self.alive():
                code = None if self.proc is None else self.proc.returncode
                self.last_error = f"vLLM exited (code {code}) during startup"
                log.error("%s; log tail:\n%s", self.last_error, self.log_tail())
                return False
            if client.health(timeout=2.0):
                self._mark_up()
                return True
            time.sleep(HEALTH_POLL_S)
        self.last_error = f"vLLM not healthy after {timeout:.0f}s"
        log.error("%s; log tail:\n%s", self.last_error, self.log_tail())
        return False

    def _mark_up(self) -> None:
        if not self.engine.armed and self.proc is not None:
            self.engine.arm(self.proc.pid)
        self.up = True
        self.last_healthy_at = time.time()
        self._unhealthy_since = None
        self._restarting = False

    def log_tail(self, lines: int = 30, max_bytes: int = 16384) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no vLLM log)"
        return "\n".join(text.splitlines()[-lines:])

    def _kill_group(self, grace: float = STOP_GRACE_S) -> None:
        proc = self.proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the group id is the child's pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("vLLM did not stop within %.0fs; sending SIGKILL", grace)
        # The API server may be gone while its engine process lingers: kill the whole group.
        deadline = time.monotonic() + min(grace, 5.0)
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        self.proc = None

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stop supervision and vLLM (and its engine process); idempotent."""
        self._stop.set()
        with self._lock:
            self.engine.disarm()
            self._kill_group(grace)
            self.up = False
            self._restarting = False
            with contextlib.suppress(OSError):
                self.pgid_path.unlink()
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- supervision ------------------------------------------------------------------------
    def check(self) -> bool:
        """One non-blocking supervision step; True exactly when a restart just became healthy.

        A dead vLLM is started again after an exponential backoff (1 s doubling to 60 s,
        reset once it stays up for ``STABLE_AFTER_S``); one that was up but fails ``/health``
        for ``UNHEALTHY_RESTART_S`` is killed and restarted. The caller reconciles adapters
        when this returns True (the ``on_restart`` callbacks also run then). Never waits for
        vLLM to boot: each call costs one ``/health`` probe at most.
        """
        with self._lock:
            if self._stop.is_set() or (self.proc is None and not self._restarting):
                self.up = False
                return False
            now = time.monotonic()
            self._check_engine(now)
            if self.alive():
                if self.endpoint.health(timeout=2.0):
                    was_restarting = self._restarting
                    self._mark_up()
                    if now - self._started_at > STABLE_AFTER_S:
                        self._backoff = BACKOFF_INITIAL_S
                    if was_restarting:
                        self._after_restart()
                    return was_restarting
                self.up = False
                if self._unhealthy_since is None:
                    self._unhealthy_since = now
                limit = (
                    self.cfg.serving.startup_timeout_s if self._restarting else UNHEALTHY_RESTART_S
                )
                if now - self._unhealthy_since < limit:
                    return False
                log.warning("vLLM unhealthy for %.0fs; killing it", now - self._unhealthy_since)
                self._kill_group(grace=5.0)
            self.up = False
            if self._next_restart_at == 0.0:
                code = None if self.proc is None else self.proc.returncode
                log.warning("vLLM is down (exit code %s); restarting in %.0fs", code, self._backoff)
                self.engine.disarm()
                self._kill_group(grace=5.0)  # its engine process may outlive the API server
                self._next_restart_at = now + self._backoff
                self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
                self._restarting = True
                return False
            if now < self._next_restart_at:
                return False
            self._next_restart_at = 0.0
            self.restarts += 1
            try:
                self.start()
            except VLLMError as exc:
                self.last_error = str(exc)
                log.error("vLLM restart failed: %s", exc)
            return False

    def _check_engine(self, now: float) -> None:
        """A dead engine behind a live API server (or one that took the server down with
        it) is killed with its group; the restart path below then starts vLLM again."""
        if not self.engine.armed or self._restarting:
            return  # not up since its last (re)start: nothing to watch yet
        if self.alive():
            reason = self.engine.dead(self.endpoint, str(self.cfg.resolved_base_model()))
        else:
            reason = (
                "vLLM exited after its engine died"
                if died_in_log(self.log_tail(20000, max_bytes=1 << 20), START_MARKER)
                else ""
            )
        if not reason:
            return
        log.error("vLLM engine is dead (%s); restarting vLLM", reason)
        self._engine_dead_at = now
        self.engine.disarm()
        self._kill_group(grace=5.0)
        self.up = False
        self._next_restart_at = 0.0
        self.last_error = f"engine dead: {reason}"

    def _after_restart(self) -> None:
        log.info("vLLM restarted and healthy (restart #%d)", self.restarts)
        for callback in self.on_restart:
            try:
                callback()
            except Exception:
                log.exception("on_restart callback failed")
        if self._engine_dead_at is not None:
            self._engine_recovered(time.monotonic() - self._engine_dead_at)

    def _engine_recovered(self, seconds: float) -> None:
        self._engine_dead_at = None
        self.engine_restarts += 1
        self.last_recovery_s = seconds
        log.warning(
            "vLLM engine recovered in %.1fs (engine restart #%d)", seconds, self.engine_restarts
        )
        record_event(
            self.cfg,
            "vllm.engine_restarted",
            f"vLLM engine died ({self.last_error}); restarted and reconciled in {seconds:.1f}s",
            "vllm",
            {"seconds": seconds, "reason": self.last_error, "restarts": self.engine_restarts},
        )
        for callback in self.on_engine_recovered:
            try:
                callback(seconds)
            except Exception:
                log.exception("on_engine_recovered callback failed")
