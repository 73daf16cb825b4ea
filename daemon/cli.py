"""The ``evergreen`` command line.

Every command loads the config the same way (``--config`` > $EVERGREEN_CONFIG > default
path > embedded defaults) and turns expected failures into a one-line error and exit code
1; usage errors exit 2 (click's convention). Heavy modules (torch, vLLM clients) are
imported inside commands so ``--help`` and ``status`` stay fast.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from daemon import __version__, logs
from daemon import config as config_mod
from daemon.config import Config, ConfigError
from daemon.errors import EvergreenError
from daemon.private_files import private_umask
from daemon.scheduling.placement import for_config as placement_for

F = TypeVar("F", bound=Callable[..., Any])

console = Console(stderr=False)
err_console = Console(stderr=True)


def _load_config(ctx: click.Context) -> Config:
    obj = ctx.ensure_object(dict)
    if "config" not in obj:
        overrides = {k: obj[k] for k in ("state_dir", "inbox_dir") if obj.get(k)}
        obj["config"] = config_mod.load(obj.get("config_path"), overrides=overrides)
    cfg_loaded: Config = obj["config"]
    return cfg_loaded


def _reloader(ctx: click.Context) -> Callable[[], Config]:
    """Re-read the config as this command did (same file, same overrides), for SIGHUP."""
    obj = ctx.ensure_object(dict)
    overrides = {k: obj[k] for k in ("state_dir", "inbox_dir") if obj.get(k)}
    path = obj.get("config_path")
    return lambda: config_mod.load(path, overrides=overrides)


def friendly_errors(fn: F) -> F:
    """Expected errors -> one red line and exit 1 (a traceback only with --debug)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (EvergreenError, FileNotFoundError, PermissionError) as exc:
            ctx = click.get_current_context(silent=True)
            if ctx is not None and ctx.find_root().obj and ctx.find_root().obj.get("debug"):
                raise
            label = "config error" if isinstance(exc, ConfigError) else "error"
            print_error(label, exc)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def print_error(label: str, exc: BaseException | str) -> None:
    """``label: message`` on stderr as exactly one line: rich would wrap it at 80 columns
    when stderr is not a terminal (journald, a pipe), and read ``[...]`` in it as markup."""
    text = " ".join(str(exc).split())
    err_console.print(f"[bold red]{label}:[/] {escape(text)}", highlight=False, soft_wrap=True)


# What a write command says when the daemon holds the state dir (see daemon.statelock);
# `promote` and `rollback` ask the daemon to do it instead (daemon/cli_adapters.py).
_BUSY_HINTS = {
    "train --now": "it trains when its trigger policy fires: drop files into the inbox"
    " ({inbox}) and watch `evergreen status`; stop it to train in the foreground",
    "ingest": "copy the files into its inbox ({inbox}) and it ingests them"
    " (`evergreen status` shows them)",
    "seed-model --force": "it trains and serves on this seed model: stop it to rebuild it",
}


@contextmanager
def state_dir_lock(cfg: Config, command: str) -> Iterator[None]:
    """Hold the state dir's lock while a write command runs; refused (one line, exit 1)
    when the daemon or another write command holds it."""
    from daemon import statelock

    try:
        lock = statelock.acquire(cfg.state_path, f"evergreen {command}")
    except statelock.StateDirBusy as busy:
        if not busy.daemon:
            raise busy.saying(
                f"{busy.holder()} is using {cfg.state_path}: wait for it to finish"
            ) from None
        hint = _BUSY_HINTS.get(command, "stop it first").format(inbox=cfg.inbox_dir)
        pid = f"pid {busy.pid}" if busy.pid else "pid unknown"
        raise busy.saying(
            f"the Evergreen daemon ({pid}) is running on {cfg.state_path}: {hint}"
        ) from None
    with lock:
        yield


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML config file (default: $EVERGREEN_CONFIG, then <state dir>/evergreen.toml).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Override the state directory from the config.",
)
@click.option(
    "--inbox",
    "inbox_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Override the inbox directory from the config.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(__version__, prog_name="evergreen")
@click.pass_context
def main(
    ctx: click.Context,
    config_path: str | None,
    state_dir: str | None,
    inbox_dir: str | None,
    debug: bool,
) -> None:
    """Evergreen: a continual-learning daemon for LLMs.

    It watches an inbox for documents, stores them in SQLite, trains incremental LoRA
    stages with replay when its policies say so, gates each candidate on evaluation, and
    hot-swaps promoted adapters into vLLM under one stable model name.
    """
    ctx.ensure_object(dict)
    ctx.obj.update(config_path=config_path, state_dir=state_dir, inbox_dir=inbox_dir, debug=debug)
    # One-shot commands log warnings only; `run`/`serve` reconfigure from the config.
    logs.setup("debug" if debug else "warning", "plain")
    private_umask()  # whatever this command writes into the state dir is 0600 / 0700


# --------------------------------------------------------------------------- config
@main.group("config")
def config_group() -> None:
    """Show or check configuration."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of TOML.")
@click.option("--keys", is_flag=True, help="List every key with its default and help text.")
@click.pass_context
@friendly_errors
def config_show(ctx: click.Context, as_json: bool, keys: bool) -> None:
    """Print the effective config (file + defaults), as TOML with help comments."""
    if keys:
        for path, default, help_text in config_mod.iter_help():
            click.echo(f"{path} = {config_mod.toml_value(default)}\n    {help_text}")
        return
    cfg = _load_config(ctx)
    if as_json:
        _print_json(config_mod.to_dict(cfg))
    else:
        click.echo(config_mod.to_toml(cfg), nl=False)
        click.echo(f"# on this machine, {placement_for(cfg).describe()}")


@config_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def config_check(file: str) -> None:
    """Validate FILE; exit 0 if it is a valid config, 1 with the key path if not."""
    try:
        config_mod.load(file)
    except ConfigError as exc:
        print_error("invalid", exc)
        sys.exit(1)
    console.print(f"[green]ok[/]: {file}")


# --------------------------------------------------------------------------- ingest/status
@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
@friendly_errors
def ingest(ctx: click.Context, paths: tuple[str, ...], as_json: bool) -> None:
    """Ingest files or directories once, without the daemon.

    Files already ingested (same path and stat, or same content) are skipped; bad files are
    quarantined with a reason. Exit code 0 even when files are quarantined.
    """
    from daemon.ingest.pipeline import ingest_paths

    cfg = _load_config(ctx)
    # The summary below lists quarantined files; don't log each one a second time.
    logging.getLogger("evergreen.ingest").setLevel(logging.ERROR)
    with state_dir_lock(cfg, "ingest"):
        summary = ingest_paths(cfg, [Path(p) for p in paths], progress=not as_json)
    if as_json:
        _print_json(summary)
        return
    table = Table(title="ingest")
    table.add_column("outcome")
    table.add_column("files", justify="right")
    for key, value in summary["outcomes"].items():
        table.add_row(key, str(value))
    console.print(table)
    for err in summary.get("errors", [])[:10]:
        console.print(f"[yellow]quarantined[/] {err['path']}: {err['error']}", highlight=False)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_context
@friendly_errors
def status(ctx: click.Context, as_json: bool) -> None:
    """Show documents by status, pending tokens, stages, adapters, the next decision and
    the last errors."""
    from daemon.status import collect, render

    cfg = _load_config(ctx)
    data = collect(cfg)
    if as_json:
        _print_json(data)
    else:
        render(data, console)


# --------------------------------------------------------------------------- model/training
@main.command("seed-model")
@click.option("--force", is_flag=True, help="Rebuild even if a cached build exists.")
@click.pass_context
@friendly_errors
def seed_model(ctx: click.Context, force: bool) -> None:
    """Build (once, cached) the embedded seed base model from the Python stdlib's docs."""
    from daemon.training.seed import ensure_seed_model

    cfg = _load_config(ctx)
    if force:  # a rebuild replaces what the daemon trains and serves on
        with state_dir_lock(cfg, "seed-model --force"):
            path = ensure_seed_model(cfg, force=True, progress=True)
    else:  # a cached build, or a new one published atomically: what the daemon itself runs
        path = ensure_seed_model(cfg, progress=True)
    console.print(f"seed model ready: {path}", highlight=False)


@main.command("check-model")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
def check_model(paths: tuple[str, ...], as_json: bool) -> None:
    """Check base model dirs: config, tokenizer, safetensors weights, chat template, vLLM's
    support for the architecture and LoRA on it, and the modules LoRA `auto` picks.

    Exit 0 when every check passes; 1 on a problem (each says what to do)."""
    from daemon.training.modelcheck import main as check_main

    sys.exit(check_main(list(paths), as_json=as_json))


@main.command()
@click.option(
    "--now",
    is_flag=True,
    required=True,
    help="Run a stage now, in the foreground, whatever the trigger policy says.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the stage result as JSON.")
@click.option("--no-swap", is_flag=True, help="Promote in the store only; do not touch vLLM.")
@click.pass_context
@friendly_errors
def train(ctx: click.Context, now: bool, as_json: bool, no_swap: bool) -> None:
    """Plan and run one training stage in the foreground, with a progress bar, then
    evaluate and gate it."""
    from daemon.serving import promotion
    from daemon.training.foreground import train_now

    cfg = _load_config(ctx)

    def promote(version: str, reason: str) -> promotion.Promotion:
        return promotion.promote(cfg, version, reason, swap=not no_swap)

    with state_dir_lock(cfg, "train --now"):
        result = train_now(cfg, promote=promote, progress=not as_json)
    if as_json:
        _print_json(result.to_dict())
    else:
        console.print(f"stage {result.stage_id}: {result.status} {result.reason}", highlight=False)
    if result.status == "failed":
        sys.exit(1)


# --------------------------------------------------------------------------- serving
@main.command()
@click.pass_context
@friendly_errors
def serve(ctx: click.Context) -> None:
    """Run the managed vLLM server plus the swapper only (serving without training)."""
    from daemon.service import run_service

    cfg = _load_config(ctx)
    sys.exit(run_service(cfg, training=False, reload=_reloader(ctx)))


@main.command()
@click.pass_context
@friendly_errors
def run(ctx: click.Context) -> None:
    """Run the daemon: watch, ingest, decide, train, evaluate, promote, swap, export metrics.

    Builds the seed model on first run when no base model is configured. Stops cleanly on
    SIGTERM (exit 0). Speaks sd_notify when $NOTIFY_SOCKET is set. SIGHUP re-reads
    serving.endpoints and serving.endpoints_dns from the config file.
    """
    from daemon.service import run_service

    cfg = _load_config(ctx)
    sys.exit(run_service(cfg, training=True, reload=_reloader(ctx)))


# The adapter commands (`adapters`, `promote`, `rollback`) register themselves on `main`.
from daemon import cli_adapters  # noqa: E402, F401  (after `main`: it imports it)
