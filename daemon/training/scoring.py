"""Score new data before it trains: the daemon's side of the scorer subprocess.

The ``surprise`` trigger compares the loss of pending data with the loss of already-learned
holdout, ``highest_loss`` selection ranks pending chunks by loss, and ``most_forgotten``
replay ranks the buffer by loss under the current adapter. All read ``chunk_scores``, which
only the scorer (``python -m daemon.training.score``, a subprocess: the daemon never imports
torch) writes. :class:`Scorer` runs it when, and only for what, a configured policy reads
(``scoring_needs`` says which chunks), under the current adapter, with a bounded budget per
run so a large ingest does not hold the stage worker for long; the rest is scored on the
next run. The stage worker calls it between stages, so it never runs while a stage does.
Each run is recorded as a ``score.done`` or ``score.failed`` event.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import sqlite_utils

from daemon.config import Config
from daemon.scheduling import planning
from daemon.training.spawn import PROJECT_ROOT, subprocess_env, wait_or_stop
from store import documents, events

log = logging.getLogger(__name__)

MAX_CHUNKS_PER_RUN = 256
MAX_TOKENS_PER_RUN = 65_536
TIMEOUT_S = 1800.0


def score_command(cfg: Config, version: str | None, chunk_ids: list[int] | None) -> list[str]:
    """The scorer subprocess: chunk losses under ``version`` (None = base model)."""
    cmd = [
        sys.executable,
        "-m",
        "daemon.training.score",
        "--db",
        str(cfg.db_path),
        "--base-model",
        str(cfg.resolved_base_model()),
        "--version",
        version or "",
        "--track",
        cfg.track,
        "--max-seq-len",
        str(cfg.training.max_seq_len),
    ]
    if chunk_ids:
        cmd += ["--chunks", ",".join(map(str, chunk_ids))]
    return cmd


def score_chunks(
    cfg: Config,
    version: str | None,
    chunk_ids: list[int] | None = None,
    *,
    timeout_s: float = TIMEOUT_S,
    stop_event: threading.Event | None = None,
) -> int:
    """Run the scorer subprocess (default chunks: pending train chunks + replay buffer);
    returns its exit code (negative when it was stopped or timed out)."""
    log_path = cfg.logs_dir / "scorer.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            score_command(cfg, version, chunk_ids),
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env=subprocess_env(cfg),
            cwd=str(PROJECT_ROOT),
        )
        wait_or_stop(proc, stop_event, timeout_s, grace_s=10.0)
    return int(proc.returncode)


@dataclass(frozen=True)
class ScoreRun:
    """One scorer run: under which adapter, how many chunks/tokens, and whether more wait."""

    version: str
    chunk_ids: list[int]
    tokens: int
    rc: int
    seconds: float
    more: bool  # chunks left over for the next run (budget) or still unscored


class Scorer:
    """Scores what the configured policies will read, a bounded batch per :meth:`run`.

    A chunk the scorer could not score (it skips chunks it cannot encode) is not offered
    again under the same adapter, so an unscorable chunk cannot make every wake-up start
    a scorer; that memory is per adapter, and forgotten when the current adapter changes.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        max_chunks: int = MAX_CHUNKS_PER_RUN,
        max_tokens: int = MAX_TOKENS_PER_RUN,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.cfg = cfg
        self.max_chunks = max_chunks
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self._tried_version = ""
        self._tried: set[int] = set()

    def run(
        self, db: sqlite_utils.Database, *, stop_event: threading.Event | None = None
    ) -> ScoreRun | None:
        """Score the next batch; None when no configured policy needs a score now."""
        needs = planning.scoring_needs(self.cfg, db)
        version = str(needs.get("adapter_version") or "")
        if version != self._tried_version:
            self._tried_version, self._tried = version, set()
        wanted = [int(i) for i in needs.get("chunk_ids", []) if int(i) not in self._tried]
        if not wanted:
            return None
        ids, tokens = self._budget(db, wanted)
        if not ids:  # the chunks went away meanwhile (superseded documents)
            return None
        self._tried.update(ids)
        started = time.monotonic()
        rc = score_chunks(
            self.cfg, version or None, ids, timeout_s=self.timeout_s, stop_event=stop_event
        )
        result = ScoreRun(
            version, ids, tokens, rc, time.monotonic() - started, more=len(ids) < len(wanted)
        )
        self._record(db, result, needs.get("reasons") or [])
        return result

    def _budget(self, db: sqlite_utils.Database, wanted: list[int]) -> tuple[list[int], int]:
        """The first chunks of ``wanted`` within the chunk and token budget (at least one)."""
        ids: list[int] = []
        tokens = 0
        for chunk in documents.chunks_by_ids(db, wanted[: self.max_chunks]):
            n = int(chunk["n_tokens"])
            if ids and tokens + n > self.max_tokens:
                break
            ids.append(int(chunk["id"]))
            tokens += n
        return ids, tokens

    def _record(self, db: sqlite_utils.Database, run: ScoreRun, reasons: list[str]) -> None:
        under = run.version or "the base model"
        data = {
            "version": run.version,
            "chunks": len(run.chunk_ids),
            "tokens": run.tokens,
            "seconds": round(run.seconds, 2),
            "more": run.more,
            "reasons": reasons,
        }
        if run.rc == 0:
            msg = f"scored {len(run.chunk_ids)} chunks ({run.tokens} tokens) under {under}"
            events.record(
                db, "score.done", msg, subject=run.version, track=self.cfg.track, data=data
            )
            log.info("%s in %.1fs", msg, run.seconds)
        else:
            msg = f"scorer exited with code {run.rc} ({under}); see {self.cfg.logs_dir}/scorer.log"
            events.record(
                db, "score.failed", msg, subject=run.version, track=self.cfg.track, data=data
            )
            log.warning("%s", msg)
