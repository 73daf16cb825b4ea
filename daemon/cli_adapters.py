"""The adapter commands of the ``evergreen`` CLI: ``adapters``, ``promote``, ``rollback``.

Registered on :data:`daemon.cli.main`. ``promote`` and ``rollback`` take the state dir's
lock and do the work themselves when no daemon runs; beside a running daemon (which holds
the lock) they ask it to do it (:mod:`daemon.serving.requests`) and print its answer.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import click
from rich.table import Table

from daemon.cli import _load_config, _print_json, console, friendly_errors, main, state_dir_lock
from daemon.config import Config

DEFAULT_TIMEOUT_S = 120.0
_timeout_option = click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1.0, max=86400.0),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Beside a running daemon: seconds to wait for it to do it (not started by then:"
    " nothing is done).",
)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@friendly_errors
def adapters(ctx: click.Context, as_json: bool) -> None:
    """List adapter versions with status, parent, metrics and the current marker."""
    from store import adapters as adapters_store
    from store.db import open_db

    cfg = _load_config(ctx)
    db = open_db(cfg.db_path)
    try:
        rows = adapters_store.list_adapters(db, cfg.track)
        current = adapters_store.current(db, cfg.track)
    finally:
        db.conn.close()
    if as_json:
        _print_json({"current": current, "adapters": rows})
        return
    table = Table(title=f"adapters ({cfg.track})")
    for col in ("", "version", "status", "parent", "stage", "new loss", "retention", "general"):
        table.add_column(col)
    for row in rows:
        m = row["metrics"]
        table.add_row(
            "*" if row["version"] == current else "",
            row["version"],
            row["status"],
            row["parent_version"] or "-",
            str(row["stage_id"] or "-"),
            _fmt(m.get("new_loss")),
            _fmt(m.get("retention_loss")),
            _fmt(m.get("general_loss")),
        )
    console.print(table)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def _here_or_by_daemon(
    cfg: Config, kind: str, args: dict[str, Any], timeout_s: float, here: Callable[[], str]
) -> str:
    """``here()`` under the state dir's lock; beside a running daemon, the daemon's answer."""
    from daemon import statelock
    from daemon.serving.requests import ask_daemon

    with ExitStack() as stack:
        try:
            stack.enter_context(state_dir_lock(cfg, kind))
        except statelock.StateDirBusy as busy:
            if not busy.daemon:
                raise
            return ask_daemon(cfg, kind, args, timeout_s=timeout_s, pid=busy.pid)
        return here()
    raise AssertionError("unreachable")  # pragma: no cover (mypy: ExitStack may swallow)


@main.command()
@click.argument("version")
@click.option("--force", is_flag=True, help="Promote even a version the gate rejected.")
@_timeout_option
@click.pass_context
@friendly_errors
def promote(ctx: click.Context, version: str, force: bool, timeout_s: float) -> None:
    """Make VERSION current and swap it into vLLM (if serving is configured)."""
    from daemon.serving import promotion

    cfg = _load_config(ctx)
    reason = "manual promote (forced past the gate)" if force else "manual promote"

    def here() -> str:
        return promotion.promote(cfg, version, reason, force=force).message

    args = {"version": version, "force": force}
    message = _here_or_by_daemon(cfg, "promote", args, timeout_s, here)
    console.print(message, highlight=False, soft_wrap=True)


@main.command()
@click.argument("version", required=False)
@_timeout_option
@click.pass_context
@friendly_errors
def rollback(ctx: click.Context, version: str | None, timeout_s: float) -> None:
    """Move the current pointer back to VERSION (default: the previous promoted one)."""
    from daemon.serving import promotion

    cfg = _load_config(ctx)

    def here() -> str:
        return promotion.rollback(cfg, version).message

    message = _here_or_by_daemon(cfg, "rollback", {"version": version}, timeout_s, here)
    console.print(message, highlight=False, soft_wrap=True)
