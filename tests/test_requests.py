"""``evergreen promote``/``rollback`` beside a running daemon: requests the daemon performs.

Real store on disk, real adapter dirs (safetensors), ``serving.mode = "none"`` so a
promotion moves the pointer after the same validation a swap does. In-process: the
queue's states, the daemon side (:func:`serve_requests`) answering with the CLI's own
error lines, and expiry (a request never runs late). Then a real daemon subprocess and
the real CLI: promote and rollback go through it and move the store's pointer; with no
daemon the CLI does the work itself and files no request.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from daemon import config as config_mod
from daemon import statelock
from daemon.config import Config
from daemon.serving.requests import RequestFailed, ask_daemon, serve_requests
from store import adapters, events
from store import requests as store_requests
from store.db import open_db
from tests.test_state_lock import cli, free_port, one_error_line, start_daemon, wait_healthy
from tests.test_state_lock import write_cfg as write_daemon_cfg

UNKNOWN = "unknown adapter version 'v0009' on track 'default'"
REJECTED = "adapter v0003 was rejected by the promotion gate (--force promotes it anyway)"


def _adapter(cfg: Config, version: str, status: str = adapters.CANDIDATE) -> None:
    path = cfg.adapters_dir / version
    path.mkdir(parents=True)
    conf = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(conf))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    weights = {
        f"{prefix}.lora_A.weight": torch.zeros(8, 8),
        f"{prefix}.lora_B.weight": torch.ones(8, 8),
    }
    save_file(weights, str(path / "adapter_model.safetensors"))
    with open_db(cfg.db_path) as db:
        adapters.register(db, version, str(path), status=status)


def _three_versions(cfg: Config) -> None:
    """v0001 and v0002 candidates, v0003 rejected by the gate; nothing current."""
    _adapter(cfg, "v0001")
    _adapter(cfg, "v0002")
    _adapter(cfg, "v0003", adapters.REJECTED)


def _current(cfg: Config) -> str | None:
    with open_db(cfg.db_path) as db:
        return adapters.current(db, cfg.track)


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return config_mod.from_dict({"state_dir": str(tmp_path / "state"), "serving": {"mode": "none"}})


# ---------------------------------------------------------------------------- in-process
def test_the_queue_claims_in_order_and_expires_what_is_late(cfg: Config) -> None:
    with open_db(cfg.db_path) as db:
        late = store_requests.submit(
            db, "promote", {"version": "v1"}, timeout_s=5, now=time.time() - 10
        )
        first = store_requests.submit(db, "rollback", {"version": None}, timeout_s=60)
        second = store_requests.submit(db, "promote", {"version": "v2"}, timeout_s=60)
        claimed = store_requests.claim_next(db)
        assert claimed is not None and claimed["id"] == first and claimed["status"] == "running"
        assert claimed["args"] == {"version": None}
        late_row = store_requests.get(db, late)
        assert late_row is not None and late_row["status"] == "expired"
        store_requests.finish(db, first, False, "nothing to roll back")
        claimed = store_requests.claim_next(db)
        assert claimed is not None and claimed["id"] == second
        assert not store_requests.expire_if_pending(db, second, "too late: it was claimed")
        store_requests.finish(db, second, True, "current adapter base -> v2")
        assert store_requests.claim_next(db) is None
        kinds = [e["kind"] for e in events.recent(db, kind_prefix="request.")]
        assert kinds == ["request.done", "request.failed", "request.expired"]


def test_a_request_a_killed_daemon_left_running_is_answered_by_the_next(cfg: Config) -> None:
    """Regression (#12, a daemon SIGKILLed mid-swap): its claimed request stayed ``running``
    for ever, and the CLI waiting on it timed out with "still performing"."""
    _three_versions(cfg)
    with open_db(cfg.db_path) as db:
        killed = store_requests.submit(db, "promote", {"version": "v0001"}, timeout_s=60)
        claimed = store_requests.claim_next(db)  # the daemon that dies performing it
        assert claimed is not None and claimed["id"] == killed
        later = store_requests.submit(db, "promote", {"version": "v0002"}, timeout_s=60)
        assert serve_requests(cfg, db, None) == 1  # the next daemon's main loop
        rows = [store_requests.get(db, i) for i in (killed, later)]
        assert [(r["status"], r["message"]) for r in rows if r] == [
            ("failed", store_requests.INTERRUPTED),
            ("done", "current adapter base -> v0002; no serving (serving.mode = none)"),
        ]
        assert store_requests.claim_next(db) is None
        kinds = [e["kind"] for e in events.recent(db, kind_prefix="request.")]
        assert sorted(kinds) == ["request.done", "request.failed"]


def test_the_daemon_side_performs_requests_with_the_cli_error_lines(cfg: Config) -> None:
    _three_versions(cfg)
    with open_db(cfg.db_path) as db:
        asked = [
            ("promote", {"version": "v0002", "force": False}),
            ("promote", {"version": "v0009", "force": False}),
            ("promote", {"version": "v0003", "force": False}),
            ("rollback", {"version": "v0001"}),
            ("retrain", {}),
        ]
        ids = [store_requests.submit(db, kind, args, timeout_s=60) for kind, args in asked]
        assert serve_requests(cfg, db, None) == 5
        rows = [store_requests.get(db, i) for i in ids]
        assert [r["status"] for r in rows if r] == ["done", "failed", "failed", "done", "failed"]
        messages = [r["message"] for r in rows if r]
        assert messages[0] == "current adapter base -> v0002; no serving (serving.mode = none)"
        assert messages[1:3] == [UNKNOWN, REJECTED]
        assert messages[3] == "current adapter v0002 -> v0001; no serving (serving.mode = none)"
        assert messages[4].startswith("unknown request 'retrain'")
        assert adapters.current(db, cfg.track) == "v0001"
        assert serve_requests(cfg, db, None) == 0


def test_a_request_nobody_takes_expires_and_never_runs_late(cfg: Config) -> None:
    _three_versions(cfg)
    with pytest.raises(RequestFailed, match=r"did not take the promote request within 0\.3 s"):
        ask_daemon(cfg, "promote", {"version": "v0002"}, timeout_s=0.3, pid=4242)
    with open_db(cfg.db_path) as db:
        assert serve_requests(cfg, db, None) == 0  # a daemon that wakes up later does nothing
        row = store_requests.get(db, 1)
        assert row is not None and row["status"] == "expired"
    assert _current(cfg) is None


def test_the_cli_gives_up_on_a_daemon_that_does_not_answer(cfg: Config, tmp_path: Path) -> None:
    """The lock held as a daemon holds it, by a process that never serves requests."""
    _three_versions(cfg)
    cfg_file = tmp_path / "evergreen.toml"
    cfg_file.write_text(f'state_dir = "{cfg.state_path}"\n[serving]\nmode = "none"\n')
    with statelock.acquire(cfg.state_path, "evergreen run"):
        line = one_error_line(cli(cfg_file, "promote", "v0002", "--timeout", "1"))
    assert line == (
        f"error: the Evergreen daemon (pid {os.getpid()}) did not take the promote request"
        " within 1 s; nothing was done (is it stuck? see `evergreen status` and its log)"
    )
    with open_db(cfg.db_path) as db:
        assert serve_requests(cfg, db, None) == 0
    assert _current(cfg) is None


# ---------------------------------------------------------------------------- real daemon
@pytest.fixture
def daemons() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_promote_and_rollback_go_through_a_running_daemon(
    tmp_path: Path, tiny_seed_model: Path, daemons: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    cfg_file = write_daemon_cfg(tmp_path, tiny_seed_model, port)
    cfg = config_mod.load(str(cfg_file))
    _three_versions(cfg)

    # no daemon: the CLI takes the lock and promotes itself, filing no request
    done = cli(cfg_file, "promote", "v0001")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "current adapter base -> v0001; no serving (serving.mode = none)"
    with open_db(cfg.db_path) as db:
        assert db.conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 0

    log = tmp_path / "daemon.log"
    daemon = start_daemon(cfg_file, log, daemons)
    wait_healthy(daemon, port, log)

    done = cli(cfg_file, "promote", "v0002")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "current adapter v0001 -> v0002; no serving (serving.mode = none)"
    assert _current(cfg) == "v0002"
    done = cli(cfg_file, "rollback")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "current adapter v0002 -> v0001; no serving (serving.mode = none)"
    assert _current(cfg) == "v0001"

    assert one_error_line(cli(cfg_file, "promote", "v0009")) == f"error: {UNKNOWN}"
    assert one_error_line(cli(cfg_file, "promote", "v0003")) == f"error: {REJECTED}"
    assert _current(cfg) == "v0001"
    done = cli(cfg_file, "promote", "v0003", "--force", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    assert _current(cfg) == "v0003"

    with open_db(cfg.db_path) as db:  # the daemon performed each one and said so
        statuses = [r[0] for r in db.conn.execute("SELECT status FROM requests ORDER BY id")]
        assert statuses == ["done", "done", "failed", "failed", "done"]
        reasons = [e["data"]["reason"] for e in events.recent(db, kind_prefix="adapter.current")]
        assert reasons[:3] == [
            "manual promote (forced past the gate)",
            "rollback to v0001",
            "manual promote",
        ]
    assert daemon.poll() is None
    assert "promote request 5: current adapter v0001 -> v0003" in log.read_text(errors="replace")
