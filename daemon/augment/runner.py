"""Augmenting pending train chunks: one bounded run, called by the service after ingest.

:func:`augment_pending` takes the oldest pending train chunks not yet augmented with the
configured method (``augment.max_chunks_per_run`` at most), makes their variants (a pure
method, or prompts sent to a server), filters them like ingest filters documents, and
stores the survivors with their lineage (:mod:`store.synthetic`). Each chunk is written
in its own savepoint, so the store's write lock is never held across a request.

Budgets bound one run: chunks, wall time (``augment.time_budget_s``, on an injectable
clock) and generated tokens (``augment.token_budget``). A run that stops early (budget,
busy or unreachable server) leaves the remaining chunks for the next run. Every run that
had work is one ``augment.run`` event whose data carries its reasons; nothing a server
does raises out of here.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlite_utils

from daemon.augment import filters
from daemon.augment.generate import GenerateError, Generator, RequestRefused, resolve
from daemon.config import Config
from policies.augment import AugmentMethod, Variant
from store import events, synthetic
from store.db import savepoint

log = logging.getLogger("evergreen.augment")

EVENT_KIND = "augment.run"
MAX_EVENT_REASONS = 50


@dataclass
class AugmentReport:
    """What one run did, and why it stopped where it did."""

    method: str
    chunks: int = 0  # source chunks marked augmented
    kept: int = 0  # synthetic chunks stored
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> texts dropped
    tokens_generated: int = 0
    stopped: str = ""  # why the run ended before its chunks did ("" = it did not)
    errors: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    chunk_ids: list[int] = field(default_factory=list)  # synthetic chunk ids stored

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items()))
        text = (
            f"augment {self.method}: {self.chunks} chunks, {self.kept} synthetic texts kept"
            f" ({dropped or 'none dropped'})"
        )
        if self.tokens_generated:
            text += f", {self.tokens_generated} tokens generated"
        return text + (f"; stopped: {self.stopped}" if self.stopped else "")


def rng_for(seed: int, text: str) -> random.Random:
    """Same seed and text, same variants (whatever the chunk's id or arrival order)."""
    digest = hashlib.sha256(f"{seed}\x1f{text}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def augment_pending(
    cfg: Config,
    db: sqlite_utils.Database,
    *,
    clock: Callable[[], float] = time.monotonic,
    limit: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> AugmentReport:
    """Augment up to ``limit`` (default ``augment.max_chunks_per_run``) pending chunks.

    ``should_stop`` is asked before each chunk (the service passes its stop event, so a
    SIGTERM waits for one request at most). Returns the report (also recorded as an
    ``augment.run`` event when there was work).
    """
    a = cfg.augment
    report = AugmentReport(a.method)
    if a.method == "none":
        return report
    rows = synthetic.unaugmented(db, cfg.track, a.method, limit=limit or a.max_chunks_per_run)
    if not rows:
        return report
    method: AugmentMethod = a.build()

    def stop_reason(elapsed: float) -> str:
        if should_stop():
            return "stopping"
        return _budget_spent(cfg, report, elapsed)

    if method.uses_model:
        _run_model(cfg, db, method, rows, report=report, clock=clock, stop_reason=stop_reason)
    else:
        _run_free(cfg, db, method, rows, report=report, clock=clock, stop_reason=stop_reason)
    log.info("%s", report.summary())
    with savepoint(db, "augment_event"):
        events.record(
            db,
            EVENT_KIND,
            report.summary(),
            track=cfg.track,
            data={
                "method": a.method,
                "chunks": report.chunks,
                "kept": report.kept,
                "dropped": report.dropped,
                "tokens_generated": report.tokens_generated,
                "stopped": report.stopped,
                "errors": report.errors[:MAX_EVENT_REASONS],
                "reasons": report.reasons[:MAX_EVENT_REASONS],
            },
        )
    return report


def _run_free(
    cfg: Config,
    db: sqlite_utils.Database,
    method: AugmentMethod,
    rows: list[dict[str, Any]],
    *,
    report: AugmentReport,
    clock: Callable[[], float],
    stop_reason: Callable[[float], str],
) -> None:
    """Model-free methods: pure and fast; the time budget or a stop ends them early."""
    a = cfg.augment
    start = clock()
    for row in rows:
        report.stopped = stop_reason(clock() - start)
        if report.stopped:
            return
        variants = (
            method.expand(row["text"], a.k, rng_for(a.seed, row["text"]))
            if row["kind"] == "text"
            else []
        )
        _store(cfg, db, row, variants, report)


def _run_model(
    cfg: Config,
    db: sqlite_utils.Database,
    method: AugmentMethod,
    rows: list[dict[str, Any]],
    *,
    report: AugmentReport,
    clock: Callable[[], float],
    stop_reason: Callable[[float], str],
) -> None:
    """Model-based methods: ask while budgets last and the server is idle."""
    try:
        target = resolve(cfg)
    except GenerateError as exc:
        report.stopped = str(exc)
        return
    start = clock()
    with Generator(cfg, target) as gen:
        for row in rows:
            report.stopped = stop_reason(clock() - start) or gen.busy()
            if report.stopped:
                return
            note = ""
            try:
                variants = _generate(cfg, gen, method, row, report)
            except RequestRefused as exc:
                variants, note = [], f"refused: {exc}"
                report.errors.append(f"chunk {row['id']}: {exc}")
            except GenerateError as exc:
                report.errors.append(f"chunk {row['id']}: {exc}")
                report.stopped = f"server error: {exc}"
                return
            _store(cfg, db, row, variants, report, note=note)


def _budget_spent(cfg: Config, report: AugmentReport, elapsed: float) -> str:
    a = cfg.augment
    if elapsed >= a.time_budget_s:
        return f"time budget of {a.time_budget_s:g}s spent"
    if report.tokens_generated >= a.token_budget:
        return f"token budget of {a.token_budget} generated tokens spent"
    return ""


def _generate(
    cfg: Config,
    gen: Generator,
    method: AugmentMethod,
    row: dict[str, Any],
    report: AugmentReport,
) -> list[Variant]:
    """Every request of one chunk; the token budget caps each request's length."""
    a = cfg.augment
    if row["kind"] != "text":
        return []
    out: list[Variant] = []
    for request in method.requests(row["text"], a.k, a.prompts):
        left = a.token_budget - report.tokens_generated
        if left <= 0:
            break
        texts, used = gen.sample(request, min(a.max_new_tokens, max(1, left // request.n)))
        report.tokens_generated += used
        for i, output in enumerate(texts):
            out.extend(
                Variant(f"{request.label}{i + 1}", t) for t in method.parse(request.label, output)
            )
    return out


def _store(
    cfg: Config,
    db: sqlite_utils.Database,
    row: dict[str, Any],
    variants: list[Variant],
    report: AugmentReport,
    *,
    note: str = "",
) -> None:
    """Filter, deduplicate and store one chunk's variants, and mark the chunk done."""
    items = []
    dropped: dict[str, int] = {}
    for variant in variants:
        item, why = filters.clean(cfg, variant, row["text"], int(row["n_tokens"]))
        if item is None:
            dropped[why] = dropped.get(why, 0) + 1
        else:
            items.append(item)
    with savepoint(db, "augment_chunk"):
        added = synthetic.add(db, int(row["id"]), cfg.augment.method, items)
        if added.duplicates:
            dropped["duplicate"] = added.duplicates
        if added.source_gone:
            dropped["source_gone"] = len(items)
        if row["kind"] != "text":
            note = note or f"{row['kind']} chunk: not augmented"
        synthetic.mark_augmented(db, int(row["id"]), cfg.augment.method, len(added.ids), note=note)
    report.chunks += 1
    report.kept += len(added.ids)
    report.chunk_ids.extend(added.ids)
    for why, n in dropped.items():
        report.dropped[why] = report.dropped.get(why, 0) + n
    detail = ", ".join(f"{n} {why}" for why, n in sorted(dropped.items()))
    report.reasons.append(
        f"chunk {row['id']}: {len(variants)} variants, {len(added.ids)} kept"
        + (f" ({detail})" if detail else "")
        + (f"; {note}" if note else "")
    )
