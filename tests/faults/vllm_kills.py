"""SIGKILL the managed vLLM's whole process group, idle and in the middle of a swap (#12).

Shared by ``tests/test_serving_guard.py`` (on its managed server) and
``benchmarks/_faults_vllm.py`` (the full fault run). No pytest here: a benchmark imports it.

The kill is ``kill -9 -PGID``: the API server and its engine process at once, as the OOM
killer taking the group or an operator's ``kill -9`` would; nothing of vLLM is left to
notice it. Recovery is what the daemon does: :meth:`ManagedVLLM.check` at a fixed pace
until it reports a restarted, healthy vLLM (its ``on_restart`` callbacks reconcile), then
the stable name must serve the store's current version, whatever the interrupted promotion
recorded there. "Serves" is read from the server itself (the plugin's alias registry, and a
greedy completion under the stable name equal to the pinned name's), not from the
swapper's memory.

Mid-swap points (:data:`SWAP_POINTS`), each a real step of :meth:`Swapper.swap_to`:

* ``load``: from a thread, the moment the load request for the new version is sent (the
  server dies while it reads, loads or answers it);
* ``loaded``: right after the load answered, before the smoke completion and the flip;
* ``flipped``: right after the stable name was re-pointed, before the verify.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from daemon.config import Config
from daemon.serving import promotion
from daemon.serving.adapters import served_name
from daemon.serving.client import VLLMClient, VLLMError
from daemon.serving.swap import SwapError, Swapper
from daemon.serving.vllm import ManagedVLLM
from tests.faults import audit

SWAP_POINTS = ("load", "loaded", "flipped")
PROMPT = "def main"
ANSWER_WAIT_S = 30.0  # healthy and reconciled -> the stable name answers (or it never will)
LOAD_KILL_DELAY_S = 0.0  # as the load request goes out (a tiny LoRA loads in < 20 ms)


@dataclass
class KillOutcome:
    """One kill and what recovery left: ``recovered`` is the verdict."""

    where: str  # "idle" or a swap point
    recovered: bool = False
    served: str | None = None  # the version the stable name serves, from the server
    current: str | None = None  # the store's current version after recovery
    promotion: str = ""  # what the interrupted promotion said ("" when idle)
    seconds: float | None = None  # kill -> the stable name answers again
    problems: list[str] = field(default_factory=list)

    @property
    def mismatch(self) -> int:
        """1 when the stable name does not serve the store's current version after recovery."""
        return int(not self.recovered)

    def line(self) -> str:
        took = f"{self.seconds:.1f} s" if self.seconds is not None else "never"
        said = f"; promotion: {self.promotion}" if self.promotion else ""
        return (
            f"vLLM group SIGKILLed ({self.where}): recovered {self.recovered} in {took};"
            f" serves {self.served}, store current {self.current}{said}"
            + "".join(f"\n  problem: {p}" for p in self.problems)
        )


def kill_group(server: ManagedVLLM) -> int:
    """SIGKILL the server's whole process group (API server and engine); its id."""
    if server.proc is None:
        raise RuntimeError("vLLM is not running")
    pgid = server.proc.pid  # start_new_session: the group is the API server's pid
    os.killpg(pgid, signal.SIGKILL)
    return pgid


class KillingClient(VLLMClient):
    """The managed server's client that SIGKILLs the server's group at one swap point."""

    def __init__(self, server: ManagedVLLM, at: str) -> None:
        if at not in SWAP_POINTS:
            raise ValueError(f"unknown swap point {at!r} (one of {SWAP_POINTS})")
        ep = server.endpoint
        super().__init__(
            server.url,
            server.api_key,
            timeout=server.cfg.serving.request_timeout_s,
            name=ep.name,
            admin_secret=server.admin_secret,
        )
        self.server, self.at = server, at
        self.killed_at: float | None = None
        self.load_answered: bool | None = None  # at "load": did the load answer first?

    def _kill(self) -> None:
        if self.killed_at is None:
            self.killed_at = time.monotonic()
            kill_group(self.server)

    def _kill_soon(self) -> None:
        time.sleep(LOAD_KILL_DELAY_S)
        self._kill()

    def load_lora(self, name: str, path: str | Path) -> None:
        if self.at != "load" or self.killed_at is not None:
            super().load_lora(name, path)
            if self.at == "loaded":
                self._kill()
            return
        killer = threading.Thread(target=self._kill_soon)

        def on_send(_request: object) -> None:  # httpx calls it as the request goes out
            if killer.ident is None:
                killer.start()

        self._http.event_hooks["request"] = [on_send]
        try:
            super().load_lora(name, path)
            self.load_answered = True
        except VLLMError:
            self.load_answered = False
            raise
        finally:
            self._http.event_hooks["request"] = []
            if killer.ident is not None:
                killer.join()

    def set_alias(self, alias: str, target: str) -> dict[str, object]:
        answer = super().set_alias(alias, target)
        if self.at == "flipped":
            self._kill()
        return answer


def kill_idle(
    server: ManagedVLLM, swapper: Swapper, *, wait_s: float, pace_s: float
) -> KillOutcome:
    """SIGKILL an idle server's group; recover through ``check()`` every ``pace_s``."""
    out = KillOutcome("idle")
    expected = _stable_answer(server, swapper.cfg, out)
    killed = time.monotonic()
    kill_group(server)
    _recover(server, swapper.cfg, out, killed, expected, wait_s=wait_s, pace_s=pace_s)
    return out


def kill_mid_swap(
    server: ManagedVLLM,
    swapper: Swapper,
    version: str,
    at: str,
    *,
    wait_s: float,
    pace_s: float,
) -> KillOutcome:
    """Promote ``version`` and SIGKILL the server's group at swap point ``at``; recover.

    The promotion runs with its own swapper on a :class:`KillingClient` (same server, same
    store); ``swapper`` is the one the server's ``on_restart`` reconciles.
    """
    out = KillOutcome(at)
    before = audit.current_version(swapper.cfg.db_path)
    killing = KillingClient(server, at)
    own = Swapper(swapper.cfg, [killing])
    try:
        done = promotion.promote(swapper.cfg, version, f"killed at {at}", swapper=own)
        out.promotion = f"done ({done.message})"
    except SwapError as exc:
        out.promotion = f"failed ({exc})"
    finally:
        killing.close()
    if killing.killed_at is None:
        out.problems.append(f"the swap to {version} never reached {at!r}: {out.promotion}")
        return out
    if at == "load":
        out.promotion += f"; the load {'answered' if killing.load_answered else 'died'} first"
    current = audit.current_version(swapper.cfg.db_path)
    if out.promotion.startswith("done") and current != version:
        out.problems.append(f"promotion said done but the store's current is {current}")
    if out.promotion.startswith("failed") and current != before:
        out.problems.append(f"promotion failed but the store moved {before} -> {current}")
    _recover(server, swapper.cfg, out, killing.killed_at, None, wait_s=wait_s, pace_s=pace_s)
    return out


def _stable_answer(server: ManagedVLLM, cfg: Config, out: KillOutcome) -> str | None:
    try:
        return server.endpoint.completion(cfg.serving.model_name, PROMPT, max_tokens=8)
    except VLLMError as exc:
        out.problems.append(f"the stable name did not answer before the kill: {exc}")
        return None


def _recover(
    server: ManagedVLLM,
    cfg: Config,
    out: KillOutcome,
    killed: float,
    expected: str | None,
    *,
    wait_s: float,
    pace_s: float,
) -> None:
    """``check()`` until vLLM is back, then judge what it serves against the store."""
    deadline = killed + wait_s
    while not server.check():
        if time.monotonic() > deadline:
            out.problems.append(f"vLLM not back in {wait_s:.0f} s:\n{server.log_tail(30)}")
            return
        time.sleep(pace_s)
    ep, stable = server.endpoint, cfg.serving.model_name
    answer = None
    deadline = min(deadline, time.monotonic() + ANSWER_WAIT_S)
    while answer is None and time.monotonic() < deadline:
        try:
            answer = ep.completion(stable, PROMPT, max_tokens=8)
        except VLLMError:
            time.sleep(0.2)
    out.seconds = round(time.monotonic() - killed, 1)
    out.current = audit.current_version(cfg.db_path) or "base"
    try:
        target = (ep.aliases().get(stable) or {}).get("target") or ""
        prefix = stable + "-"
        out.served = target[len(prefix) :] if target.startswith(prefix) else target or None
        pinned = ep.completion(served_name(cfg, out.current), PROMPT, max_tokens=8)
    except VLLMError as exc:
        out.problems.append(f"cannot read what the server serves: {exc}")
        return
    if answer != pinned:
        out.problems.append(f"{stable} answers {answer!r}, {out.current} answers {pinned!r}")
    if expected is not None and answer != expected:
        out.problems.append(f"{stable} answered {expected!r} before the kill, {answer!r} after")
    out.recovered = out.served == out.current and not out.problems
