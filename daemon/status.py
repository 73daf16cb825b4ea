"""What ``evergreen status`` shows; the same dict is served as JSON on ``/status``."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from daemon.config import Config
from daemon.serving.fleet import load_replicas
from store import adapters, documents, events, stages
from store.db import open_db


def collect(cfg: Config, *, now: float | None = None) -> dict[str, Any]:
    """Read everything from the store (one short-lived connection, read only)."""
    now = time.time() if now is None else now
    db = open_db(cfg.db_path)
    try:
        oldest = documents.oldest_pending_train_at(db, cfg.track)
        last = stages.latest(db, cfg.track)
        data: dict[str, Any] = {
            "track": cfg.track,
            "state_dir": cfg.state_dir,
            "inbox_dir": cfg.inbox_dir,
            "documents": documents.status_counts(db, cfg.track),
            "quarantined_by_reason": documents.quarantine_counts(db, cfg.track),
            "pending_tokens": documents.pending_tokens(db, cfg.track),
            "staleness_s": round(now - oldest, 1) if oldest is not None else 0.0,
            "current_adapter": adapters.current(db, cfg.track),
            "replicas": load_replicas(db, cfg.track),
            "stages": stages.outcome_counts(db, cfg.track),
            "last_stage": _stage_summary(last) if last else None,
            "next_decision": _next_decision(cfg, db, now),
            "last_errors": [
                {"ts": e["ts"], "kind": e["kind"], "subject": e["subject"], "message": e["message"]}
                for e in events.recent(
                    db, kind_prefix="ingest.quarantined", track=cfg.track, limit=5
                )
                + events.recent(db, kind_prefix="stage.failed", track=cfg.track, limit=3)
                + events.recent(db, kind_prefix="swap.failed", track=cfg.track, limit=3)
                + events.recent(db, kind_prefix="score.failed", track=cfg.track, limit=3)
            ],
        }
    finally:
        db.conn.close()
    data["last_errors"].sort(key=lambda e: e["ts"], reverse=True)
    return data


def _stage_summary(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: row.get(k)
        for k in (
            "id",
            "status",
            "reason",
            "parent_version",
            "candidate_version",
            "metrics",
            "progress",
            "created_at",
            "finished_at",
        )
    }


def _next_decision(cfg: Config, db: Any, now: float) -> dict[str, Any] | None:
    """The trigger policy's explained verdict (evaluated, not acted on)."""
    from daemon.scheduling.decisions import explain_next

    # record=False: looking at the status never writes (no tick, no decision event).
    try:
        return explain_next(cfg, db, now=now, record=False)
    except Exception as exc:  # status must show the rest even if the policy cannot run
        why = f"could not evaluate the trigger policy: {type(exc).__name__}: {exc}"
        return {"fire": False, "reasons": [why], "summary": why, "checks": []}


def progress_line(progress: dict[str, Any]) -> str:
    """A running stage's progress (the stage's own ``update_progress`` dict) in one line:
    ``step 120/400 (30%) · loss 2.314 · 1,850 tok/s · ETA 2m 31s``."""
    if progress.get("phase") == "evaluate":
        return "evaluating the candidate against its parent"
    parts = []
    step, total = progress.get("step"), progress.get("total")
    if isinstance(step, int | float) and isinstance(total, int | float) and total > 0:
        parts.append(f"step {step:.0f}/{total:.0f} ({100 * step / total:.0f}%)")
    elif isinstance(step, int | float):
        parts.append(f"step {step:.0f}")
    if isinstance(progress.get("loss"), int | float):
        parts.append(f"loss {progress['loss']:.3f}")
    if isinstance(progress.get("tokens_per_s"), int | float):
        parts.append(f"{progress['tokens_per_s']:,.0f} tok/s")
    eta = progress.get("eta_s")
    if isinstance(eta, int | float):
        minutes, seconds = divmod(round(eta), 60)
        parts.append(f"ETA {minutes}m {seconds:02d}s" if minutes else f"ETA {seconds}s")
    return " · ".join(parts) or str(progress.get("phase") or "starting")


def replicas_line(rows: list[dict[str, Any]], current: str | None) -> str:
    """``3 replicas: 2 serve v0003; down: 10.0.0.7:8000`` (the ones out of line named)."""
    want = current or "base"
    in_line = sum(1 for r in rows if r.get("up") and r.get("serving") == want)
    down = [str(r["endpoint"]) for r in rows if not r.get("up")]
    behind = [
        f"{r['endpoint']} ({r.get('serving') or r.get('error') or 'unknown'})"
        for r in rows
        if r.get("up") and r.get("serving") != want
    ]
    parts = [f"{len(rows)} replica(s): {in_line} serve {want}"]
    if down:
        parts.append("down: " + ", ".join(down[:5]) + (" ..." if len(down) > 5 else ""))
    if behind:
        parts.append("behind: " + ", ".join(behind[:5]) + (" ..." if len(behind) > 5 else ""))
    return escape("; ".join(parts))


def render(data: dict[str, Any], console: Console) -> None:
    table = Table(title=f"evergreen status — track {data['track']}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    docs = data["documents"]
    table.add_row("documents", ", ".join(f"{k} {v}" for k, v in docs.items()))
    if data["quarantined_by_reason"]:
        table.add_row(
            "quarantined by reason",
            ", ".join(f"{k} {v}" for k, v in data["quarantined_by_reason"].items()),
        )
    table.add_row("pending tokens", f"{data['pending_tokens']:,}")
    table.add_row("staleness", f"{data['staleness_s']:.0f} s")
    table.add_row("current adapter", data["current_adapter"] or "(base model)")
    rows, want = data.get("replicas") or [], data["current_adapter"] or "base"
    if len(rows) > 1 or any(not r.get("up") or r.get("serving") != want for r in rows):
        table.add_row("replicas", replicas_line(rows, data["current_adapter"]))
    table.add_row("stages", ", ".join(f"{k} {v}" for k, v in data["stages"].items()))
    last = data["last_stage"]
    if last:
        table.add_row("last stage", f"#{last['id']} {last['status']} {last['reason'] or ''}")
        if last["status"] in stages.ACTIVE and last.get("progress"):
            table.add_row("progress", progress_line(last["progress"]))
    nd = data.get("next_decision")
    if nd:
        table.add_row(
            "next decision", escape(nd.get("summary") or "; ".join(nd.get("reasons", [])))
        )
        for check in nd.get("checks", []):
            mark = "[green]✓[/]" if check.get("fire") else "[yellow]✗[/]"
            text = escape(f"{check.get('policy')}: {check.get('reason', '')}")
            table.add_row("", f"{mark} {text}")
    console.print(table)
    for err in data["last_errors"]:
        console.print(f"[yellow]{err['kind']}[/] {err['message']}", highlight=False)
