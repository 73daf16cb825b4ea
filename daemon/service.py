"""``evergreen run``: one service that closes the loop.

Threads, each with its own SQLite connection:
- the **main loop** (this thread): watchdog pings, vLLM supervision and reconcile, metrics
  refresh, the systemd STATUS line, operator requests (daemon.serving.requests). A hung main loop stops the watchdog pings on purpose.
- the **watcher** (daemon.ingest): inotify events + periodic rescans -> the store; after each
  batch it pokes the stage worker so triggers are evaluated right after ingest.
- the **scheduler** (APScheduler, daemon.scheduling.schedule): pokes the stage worker every
  ``policy.interval_s``.
- the **stage worker** (daemon/worker.py): on a poke, scores new data when a policy reads
  scores, evaluates the trigger policy and, when it fires, runs one stage (plan ->
  subprocess -> eval -> gate -> promote -> swap); one worker, so one stage at a time.

The layers (daemon.ingest, daemon.training, daemon.serving) never import each other; this
module wires them: the runner gets :meth:`Service.promote` (serving's promotion with the
daemon's swapper) as its ``promote`` callable.

The daemon process never imports torch: the seed build, stages and scorers are
subprocesses, which keeps the idle daemon small (RSS, CPU).
"""

from __future__ import annotations

import errno
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import sqlite_utils

from daemon import config as config_mod
from daemon import logs, statelock
from daemon.config import Config
from daemon.errors import EvergreenError
from daemon.ingest import ensure_dirs
from daemon.ingest.watcher import InboxWatcher
from daemon.metrics import Metrics, serve_http
from daemon.notify import Notifier
from daemon.private_files import private_umask, write_private
from daemon.scheduling.schedule import start_scheduler
from daemon.serving import promotion
from daemon.serving.fleet import Resolver, resolve_addresses
from daemon.serving.promotion import Promotion
from daemon.serving.requests import serve_requests
from daemon.serving.swap import Swapper, SwapResult
from daemon.serving.vllm import ManagedVLLM
from daemon.status import collect
from daemon.training import modelcheck, seed_data
from daemon.worker import StageWorker
from store import adapters, documents, files, stages
from store.contracts import StageResult
from store.db import open_db

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from apscheduler.schedulers.background import BackgroundScheduler

log = logging.getLogger("evergreen.service")

LOOP_INTERVAL_S = 1.0  # main loop wake-up; everything else is paced by its own interval
METRICS_REFRESH_S = 5.0  # store-derived gauges (pending tokens, staleness)
HEALTHY_LOOP_AGE_S = 30.0  # /healthz fails when the main loop has not run for this long
SUPERVISE_INTERVAL_S = 1.0  # vLLM check(): one /health probe; 3 s cost ~5 s per recovery


class ServiceError(EvergreenError, RuntimeError):
    """Start-up failed in a way the user must fix (bad base model, vLLM never healthy)."""


class Service:
    """Wires the store, watcher, scheduler, stage worker, vLLM, swapper and HTTP together."""

    def __init__(
        self,
        cfg: Config,
        *,
        training: bool = True,
        notifier: Notifier | None = None,
        resolve: Resolver = resolve_addresses,
    ) -> None:
        """``resolve``: how ``serving.endpoints_dns`` names become addresses (tests fake it)."""
        self.cfg = cfg
        self.resolve = resolve
        self.training = training
        self.metrics = Metrics()
        self.notifier = notifier or Notifier()
        self.stopping = threading.Event()
        self.refresh_soon = threading.Event()
        self.last_loop = time.time()
        self.managed: ManagedVLLM | None = None
        self.swapper: Swapper | None = None
        self.watcher: InboxWatcher | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.worker: StageWorker | None = None
        self.http: WSGIServer | None = None
        self._db: sqlite_utils.Database | None = None

    # ------------------------------------------------------------------ callbacks
    def on_progress(self, progress: dict[str, Any]) -> None:
        self.metrics.on_stage_progress(progress)

    def on_stage_finished(self, db: sqlite_utils.Database, result: StageResult) -> None:
        """Metrics and a log line for a finished stage (``db``: the worker's connection)."""
        row = stages.get(db, result.stage_id) if result.stage_id is not None else None
        started, finished = (row or {}).get("started_at"), (row or {}).get("finished_at")
        self.metrics.on_stage_finished(
            result,
            duration_s=finished - started if started and finished else None,
            finished_at=finished,
        )
        self.refresh_soon.set()  # staleness/pending tokens changed: the main loop re-reads them
        log.info("stage %s %s %s", result.stage_id, result.status, result.reason)

    def on_swap(self, result: SwapResult) -> None:
        """Swapper callback (a SwapResult per attempted swap, ok or not)."""
        self.metrics.on_swap(result.seconds, result.ok, time.time())
        if result.ok:
            self.metrics.set_adapter(result.version)
            if self.swapper is not None:
                self.metrics.set_replicas(self.swapper.replica_rows(), result.version)

    def promote(self, version: str, reason: str) -> Promotion:
        """What a stage that passed the gate calls: serving swaps every endpoint (the
        daemon's swapper, so metrics see it), then moves the store pointer; raises if not."""
        return promotion.promote(self.cfg, version, reason, swapper=self.swapper)

    def healthy(self) -> bool:
        return not self.stopping.is_set() and time.time() - self.last_loop < HEALTHY_LOOP_AGE_S

    def status(self) -> dict[str, Any]:
        data = collect(self.cfg)
        data["daemon"] = {
            "stage_running": bool(self.worker and self.worker.busy.is_set()),
            "vllm": self.swapper.replica_rows() if self.swapper else [],
        }
        return data

    # ------------------------------------------------------------------ start/stop
    def _write_effective_config(self) -> Path:
        """Subprocesses (seed build, stages) get exactly our config, flags included."""
        path = self.cfg.state_path / "effective-config.toml"
        write_private(path, config_mod.to_toml(self.cfg))  # it holds the API key
        return path

    def _ensure_base_model(self, cfg_file: Path) -> None:
        """The base model exists (the seed built if none is set) and passes check-model."""
        base = self.cfg.resolved_base_model()
        if self.cfg.base_model and not (base / "config.json").exists():
            raise ServiceError(
                f"base_model {base} is not a Hugging Face model directory (no config.json)"
            )
        if not (base / "config.json").exists():
            log.info("no base model configured: building the seed model into %s", base)
            self.notifier.status("building the seed model")
            proc = subprocess.run(
                [sys.executable, "-m", "daemon", "--config", str(cfg_file), "seed-model"],
                check=False,
            )
            if proc.returncode != 0:
                raise ServiceError(f"seed model build failed (exit {proc.returncode})")
        elif not self.cfg.base_model:  # a seed built before prompts got <s>: same tokenizer
            seed_data.ensure_bos_on_prompts(base)
        self.notifier.status("checking the base model")
        modelcheck.require_usable(self.cfg, base)

    def _start_serving(self) -> None:
        mode = self.cfg.serving.mode
        if mode == "none":
            return
        if mode == "managed":
            self.managed = ManagedVLLM(
                self.cfg,
                on_restart=self._reconcile_after_restart,
                on_engine_recovered=self.metrics.on_engine_restart,
            )
            log.info("starting managed vLLM on %s:%s", self.cfg.serving.host, self.cfg.serving.port)
            self.notifier.status("starting vLLM")
            self.managed.start()
            if not self.managed.wait_healthy(self.cfg.serving.startup_timeout_s):
                raise ServiceError(
                    f"vLLM did not become healthy within {self.cfg.serving.startup_timeout_s:.0f}"
                    f" s; see {self.cfg.logs_dir / 'vllm.log'}"
                )
            self.swapper = Swapper(self.cfg, [self.managed.endpoint], on_swap=self.on_swap)
        else:
            self.swapper = Swapper.from_config(self.cfg, on_swap=self.on_swap, resolve=self.resolve)
        self.swapper.reconcile()

    def _start_metrics(self) -> None:
        mc = self.cfg.metrics
        if not mc.enabled:
            return
        try:
            self.http, _ = serve_http(
                self.metrics, mc.host, mc.port, healthy=self.healthy, status=self.status
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServiceError(
                    f"metrics port {mc.host}:{mc.port} is in use (metrics.port): another"
                    " program listens there; stop it, or set metrics.port or"
                    " metrics.enabled = false"
                ) from exc
            raise ServiceError(
                f"cannot serve metrics on {mc.host}:{mc.port} (metrics.host, metrics.port):"
                f" {exc.strerror or exc}"
            ) from exc
        log.info("metrics on http://%s:%s/metrics", mc.host, mc.port)

    def _reconcile_after_restart(self) -> None:
        """A restarted vLLM lost its adapters: serve the current version again at once."""
        if self.swapper is not None:
            self.swapper.reconcile()

    def start(self) -> None:
        cfg = self.cfg
        ensure_dirs(cfg)  # one clear line if state_dir or inbox_dir is a file
        cfg.logs_dir.mkdir(parents=True, exist_ok=True)
        self._db = open_db(cfg.db_path)  # migrates; the main loop's own connection
        cfg_file = self._write_effective_config()
        self._start_metrics()  # first: a port in use fails in a second, before vLLM starts
        if self.training or cfg.serving.mode == "managed":
            self._ensure_base_model(cfg_file)
        if self.training:  # ingest needs no vLLM: files dropped while it starts are stored
            self.watcher = InboxWatcher(
                cfg,
                on_change=lambda _summary: self._poke(),
                on_outcome=self.metrics.on_ingest_outcome,
            )
            self.watcher.start()
        self._start_serving()
        if self.training:
            self.worker = StageWorker(self)
            self.worker.start()
            self.scheduler = start_scheduler(self.worker.poke, cfg.policy.interval_s)
            self._poke()
        self._refresh_metrics()
        self.notifier.ready(self._status_line())
        log.info("evergreen ready (track %s, inbox %s)", cfg.track, cfg.inbox_dir)

    def _poke(self) -> None:
        if self.worker is not None:
            self.worker.poke()

    def stop(self, grace_s: float) -> None:
        """Stop taking work, let a running stage checkpoint, stop vLLM. Idempotent."""
        self.stopping.set()
        self.notifier.stopping()
        log.info("stopping (grace %.0f s)", grace_s)
        deadline = time.time() + grace_s
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self.watcher is not None:
            self.watcher.stop()
        if self.worker is not None:
            self.worker.stop_event.set()
            self.worker.poke()
            self.worker.join(timeout=max(1.0, deadline - time.time()))
            if self.worker.is_alive():
                log.warning("stage did not stop within the grace period")
        if self.managed is not None:
            self.managed.stop()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        if self._db is not None:
            self._db.conn.close()
            self._db = None

    # ------------------------------------------------------------------ main loop
    def _status_line(self) -> str:
        pending = int(self.metrics.pending_tokens._value.get())
        current = adapters.current(self._db, self.cfg.track) if self._db else None
        running = "training" if self.worker and self.worker.busy.is_set() else "idle"
        return f"{running}; serving {current or 'base'}; {pending} pending tokens"

    def _refresh_metrics(self) -> None:
        """Store-derived gauges; the running stage's progress comes from its row, which the
        stage process itself updates, so it shows even for a stage this daemon resumed."""
        db = self._db
        if db is None:
            return
        now = time.time()
        track = self.cfg.track
        self.metrics.pending_tokens.set(documents.pending_tokens(db, track))
        oldest = documents.oldest_pending_train_at(db, track)
        self.metrics.staleness.set(now - oldest if oldest else 0.0)
        self.metrics.inbox_unreadable_dirs.set(files.count_unreadable_dirs(db, track))
        active = stages.active(db, track)  # at most one: planned, running, trained, evaluated
        self.metrics.set_stage_progress(active[0]["progress"] if active else None)
        if self.swapper is None:
            self.metrics.set_adapter(adapters.current(db, track))

    def loop(self, should_stop: Callable[[], bool]) -> None:
        wd = self.notifier.watchdog_interval_s
        next_wd = 0.0
        next_refresh = 0.0
        next_supervise = 0.0
        next_reconcile = time.time() + self.cfg.serving.reconcile_interval_s
        last_status = ""
        while not should_stop():
            now = time.time()
            self.last_loop = now
            self.metrics.loop_heartbeat.set(now)
            if wd and now >= next_wd:
                self.notifier.watchdog()
                next_wd = now + wd
            if self.managed is not None and now >= next_supervise:
                if self.managed.check():
                    log.warning("managed vLLM was restarted; reconciling adapters")
                    next_reconcile = 0.0
                next_supervise = now + SUPERVISE_INTERVAL_S
            if self.swapper is not None and now >= next_reconcile:
                try:
                    self.swapper.reconcile()
                    self.metrics.set_adapter(self.swapper.served_version())
                except Exception as exc:
                    log.warning("reconcile failed: %s", exc)
                want = adapters.current(self._db, self.cfg.track) if self._db else None
                self.metrics.set_replicas(self.swapper.replica_rows(), want)
                next_reconcile = now + self.cfg.serving.reconcile_interval_s
            if self._db is not None and serve_requests(self.cfg, self._db, self.swapper):
                self.refresh_soon.set()  # an operator's promote/rollback moved the pointer
            if now >= next_refresh or self.refresh_soon.is_set():
                self.refresh_soon.clear()
                try:
                    self._refresh_metrics()
                    line = self._status_line()
                    if line != last_status:
                        self.notifier.status(line)
                        last_status = line
                except Exception as exc:  # a busy store must not kill the loop
                    log.warning("metrics refresh failed: %s", exc)
                next_refresh = now + METRICS_REFRESH_S
            time.sleep(min(LOOP_INTERVAL_S, wd or LOOP_INTERVAL_S))


def run_service(
    cfg: Config, *, training: bool = True, reload: Callable[[], Config] | None = None
) -> int:
    """Entry point of ``evergreen run`` / ``serve``; returns the exit code. ``reload``
    re-reads the config file on SIGHUP (the fleet's endpoints only; see daemon.serving.fleet).

    The state dir's lock comes first and is held until the end (:mod:`daemon.statelock`):
    a second daemon raises :class:`~daemon.statelock.StateDirBusy` (one line, exit 1)
    before it touches the store, a vLLM left behind, or a running stage.
    """
    command = "evergreen run" if training else "evergreen serve"
    private_umask()  # state files (lock, keys, config, store, adapters) 0600, dirs 0700
    try:
        lock = statelock.acquire(cfg.state_path, command)
    except statelock.StateDirBusy as busy:
        if busy.daemon:
            raise busy.saying(f"{busy.holder()} holds {cfg.state_path}: stop it first") from None
        raise busy.saying(
            f"{busy.holder()} holds {cfg.state_path}: wait for it to finish, or stop it first"
        ) from None
    with lock:
        return _run_locked(cfg, training=training, reload=reload)


def _run_locked(cfg: Config, *, training: bool, reload: Callable[[], Config] | None) -> int:
    logs.setup(cfg.log_level, cfg.log_format)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service = Service(cfg, training=training)

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        fleet = service.swapper.fleet if service.swapper else None
        if fleet is not None and reload is not None:
            fleet.request_reload(reload)  # applied by the next reconcile
        else:
            log.info("SIGHUP: nothing to reload (serving.endpoints apply in external mode)")

    signal.signal(signal.SIGHUP, on_hup)
    code = 0
    try:
        service.start()
        service.loop(stop.is_set)
    except EvergreenError as exc:  # expected: one line; the traceback at log level debug
        log.error("%s", " ".join(str(exc).split()), exc_info=log.isEnabledFor(logging.DEBUG))
        code = 1
    finally:
        service.stop(cfg.stop_grace_s)
    log.info("stopped")
    return code
