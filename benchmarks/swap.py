"""Hot swap under load: failed requests, swap latency, and decode speed after swaps.

One run, on a real vLLM CPU server managed by :class:`ManagedVLLM` and the tiny seed model:

1. 8 client threads stream completions from the stable name (``evergreen``) without pause
   while the swapper promotes 10 different adapters, one after another.
2. Then decode speed under the stable name (now aliased to the last adapter) is compared
   with the same adapter dir freshly loaded under a new name (the baseline), interleaved
   in rounds so drift on the shared machine hits both alike.

The last line printed is one JSON object: requests_total, requests_failed,
swap_seconds_p50, swap_seconds_p99, post_swap_decode_ratio (stable s/token / fresh s/token),
plus context fields. Usage: ``python benchmarks/swap.py [--base-model DIR] [--port N]
[--smoke]``. The adapters have the default ``training.lora_rank`` and the server the same
``serving.max_lora_rank``, so the benchmark swaps what the daemon trains with its defaults.
``--smoke`` (CI): 3 swaps, 2 clients, 2 decode rounds on the same real server.

``--mechanism resolver`` swaps the way vLLM allows without our plugin (point
``<resolver dir>/evergreen`` at the new version, unload ``evergreen``, let the next request
re-resolve it), for comparison with the default ``alias`` mechanism.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import add_smoke_flag, report  # noqa: E402
from daemon import config as config_mod  # noqa: E402
from daemon.serving import promotion  # noqa: E402
from daemon.serving.swap import Swapper  # noqa: E402
from daemon.serving.vllm import ManagedVLLM, VLLMError  # noqa: E402
from tests.fixtures_vllm import free_port, make_lora  # noqa: E402

CLIENTS = 8
SWAPS = 10
STREAM_TOKENS = 24
DECODE_TOKENS = 96
DECODE_ROUNDS = 20
PAUSE_S = 1.0  # between swaps


def smoke_sizes() -> None:
    """--smoke: the same run, small enough for CI."""
    global CLIENTS, SWAPS, DECODE_TOKENS, DECODE_ROUNDS, PAUSE_S
    CLIENTS, SWAPS, DECODE_TOKENS, DECODE_ROUNDS, PAUSE_S = 2, 3, 16, 2, 0.2


FIELDS = (
    "requests_total",
    "requests_failed",
    "swap_seconds_p50",
    "swap_seconds_p99",
    "post_swap_decode_ratio",
    "swaps",
    "clients",
    "versions_served",
    "stable_ms_per_token",
    "fresh_ms_per_token",
    "lora_rank",
    "mechanism",
    "wall_seconds",
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[idx]


class Load:
    """CLIENTS threads streaming completions from one model name until stopped."""

    def __init__(self, url: str, key: str, model: str) -> None:
        self.url, self.key, self.model = url, key, model
        self.stop = threading.Event()
        self.total = 0
        self.failed = 0
        self.errors: Counter[str] = Counter()
        self.served_by: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _one(self, http: httpx.Client, i: int) -> None:
        body = {
            "model": self.model,
            "prompt": f"Request {i}: the",
            "max_tokens": STREAM_TOKENS,
            "temperature": 0.8,
            "stream": True,
        }
        ok, error, served, chunks = False, "", "", 0
        try:
            with http.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    error = f"HTTP {resp.status_code}: {resp.read()[:200]!r}"
                else:
                    for line in resp.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            ok = chunks > 0
                            error = "" if ok else "no tokens"
                            break
                        event = json.loads(data)
                        if "error" in event:
                            error = str(event["error"])[:200]
                            break
                        served = event.get("model", served)
                        chunks += 1
                    else:
                        error = error or "stream ended without [DONE]"
        except (httpx.HTTPError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.total += 1
            if not ok:
                self.failed += 1
                self.errors[error] += 1
            else:
                self.served_by[served] += 1

    def _worker(self, n: int) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=120) as http:
            i = 0
            while not self.stop.is_set():
                self._one(http, n * 100_000 + i)
                i += 1

    def run(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._worker, args=(n,)) for n in range(CLIENTS)]
        for t in threads:
            t.start()
        return threads


def run_load(url: str, key: str, model: str, stop: Any, out: Any) -> None:
    """Child-process body: stream until ``stop`` is set, then report the counts.

    The clients run in their own process, as real clients do: in the daemon's process their
    JSON parsing would compete with the swapper for the GIL and inflate swap times.
    """
    load = Load(url, key, model)
    threads = load.run()
    while load.total == 0 and not stop.is_set():
        time.sleep(0.05)
    out.put("flowing")
    stop.wait()
    load.stop.set()
    for t in threads:
        t.join()
    out.put((load.total, load.failed, dict(load.errors), dict(load.served_by)))


def seconds_per_token(http: httpx.Client, model: str) -> float:
    body = {
        "model": model,
        "prompt": "The",
        "max_tokens": DECODE_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    started = time.perf_counter()
    resp = http.post("/v1/completions", json=body)
    elapsed = time.perf_counter() - started
    resp.raise_for_status()
    tokens = int(resp.json()["usage"]["completion_tokens"])
    return elapsed / max(1, tokens)


def resolver_swap(cfg: config_mod.Config, server: ManagedVLLM, version: str) -> float:
    """The plugin-free swap: re-point the resolver link, unload, re-resolve on next request."""
    started = time.monotonic()
    link_dir = cfg.serving_dir / "resolve"
    link = link_dir / cfg.serving.model_name
    tmp = link_dir / ".stable.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(cfg.adapters_dir.resolve() / version, tmp)
    os.replace(tmp, link)
    ep = server.endpoint
    with contextlib.suppress(VLLMError):  # not registered yet on the first swap
        ep.unload_lora(cfg.serving.model_name)
    ep.completion(cfg.serving.model_name, "The", max_tokens=8)  # resolves the new weights
    return time.monotonic() - started


def decode_ratio(url: str, key: str, stable: str, fresh: str) -> tuple[float, float]:
    headers = {"Authorization": f"Bearer {key}"}
    stable_s: list[float] = []
    fresh_s: list[float] = []
    with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
        for model in (stable, fresh):  # warm both (first use may load weights)
            seconds_per_token(http, model)
        for r in range(DECODE_ROUNDS):
            order = (stable, fresh) if r % 2 == 0 else (fresh, stable)
            for model in order:
                (stable_s if model == stable else fresh_s).append(seconds_per_token(http, model))
    return statistics.median(stable_s), statistics.median(fresh_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="", help="HF model dir (default: tiny seed)")
    parser.add_argument("--port", type=int, default=0, help="vLLM port (default: 18100-18199)")
    parser.add_argument(
        "--mechanism",
        choices=("alias", "resolver"),
        default="alias",
        help="alias: the swapper (default); resolver: plugin-free unload + re-resolve",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp state dir")
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke:
        smoke_sizes()
    t0 = time.monotonic()
    state = Path(tempfile.mkdtemp(prefix="evergreen-bench-swap-"))
    base = args.base_model
    if not base:
        from daemon.training.seed import ensure_seed_model

        seed_cfg = config_mod.from_dict({"state_dir": str(state), "seed": {"size": "tiny"}})
        print("building the tiny seed model ...", flush=True)
        base = str(ensure_seed_model(seed_cfg))
    # The rank the daemon trains with by default, and a server that accepts it: the
    # benchmark follows the defaults instead of pinning a rank they may leave behind.
    rank = config_mod.from_dict({"state_dir": str(state)}).training.lora_rank
    cfg = config_mod.from_dict(
        {
            "state_dir": str(state),
            "base_model": base,
            "seed": {"size": "tiny"},
            "training": {"lora_rank": rank},
            "serving": {
                "port": args.port or free_port(),
                "max_lora_rank": rank,
                "max_loras": 4,
                "max_model_len": 512,
            },
        }
    )
    versions = [f"v{i:04d}" for i in range(1, SWAPS + 1)]
    print(f"writing {SWAPS} rank-{rank} adapters ...", flush=True)
    for i, version in enumerate(versions, start=1):
        make_lora(cfg, version, seed=i, rank=rank)
    server = ManagedVLLM(cfg)
    print(f"starting vLLM on {server.url} (log {server.log_path}) ...", flush=True)
    server.start()
    try:
        if not server.wait_healthy():
            print(server.log_tail(), file=sys.stderr)
            return 1
        swapper = Swapper(cfg, [server.endpoint])
        if args.mechanism == "alias":
            swapper.reconcile()
        else:
            resolver_swap(cfg, server, versions[0])
        stable = cfg.serving.model_name
        ctx = multiprocessing.get_context("spawn")
        stop, out = ctx.Event(), ctx.Queue()
        clients = ctx.Process(target=run_load, args=(server.url, server.api_key, stable, stop, out))
        clients.start()
        out.get(timeout=120)  # requests are flowing
        time.sleep(1)
        durations: list[float] = []
        for version in versions:
            steps: dict[str, float] = {}
            if args.mechanism == "alias":
                done = promotion.promote(cfg, version, "benchmark", swapper=swapper)
                assert done.swap is not None
                seconds, steps = done.swap.seconds, done.swap.stages
            else:
                seconds = resolver_swap(cfg, server, version)
            durations.append(seconds)
            print(f"  swap -> {version}: {seconds:.3f}s {steps}", flush=True)
            time.sleep(PAUSE_S)
        time.sleep(2 * PAUSE_S)
        stop.set()
        total, failed, errors_by_kind, served = out.get(timeout=300)
        clients.join()
        fresh = f"bench-fresh-{versions[-1]}"
        server.endpoint.load_lora(fresh, cfg.adapters_dir.resolve() / versions[-1])
        stable_spt, fresh_spt = decode_ratio(server.url, server.api_key, stable, fresh)
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(state, ignore_errors=True)
    ratio = stable_spt / fresh_spt
    p50, p99 = percentile(durations, 50), percentile(durations, 99)
    summary = [
        "",
        f"requests: {total} streamed by {CLIENTS} clients, {failed} failed",
        *(f"  {n} x {error}" for error, n in Counter(errors_by_kind).most_common(5)),
        f"served by: {dict(sorted(served.items()))}",
        f"swaps: {SWAPS}, p50 {p50:.3f}s, p99 {p99:.3f}s, max {max(durations):.3f}s",
        f"decode after swaps: stable {stable_spt * 1000:.2f} ms/token, fresh "
        f"{fresh_spt * 1000:.2f} ms/token, ratio {ratio:.3f}",
    ]
    result = {
        "requests_total": total,
        "requests_failed": failed,
        "swap_seconds_p50": round(p50, 4),
        "swap_seconds_p99": round(p99, 4),
        "post_swap_decode_ratio": round(ratio, 4),
        "swaps": SWAPS,
        "clients": CLIENTS,
        "versions_served": len(served),
        "stable_ms_per_token": round(stable_spt * 1000, 3),
        "fresh_ms_per_token": round(fresh_spt * 1000, 3),
        "lora_rank": rank,
        "mechanism": args.mechanism,
        "wall_seconds": round(time.monotonic() - t0, 1),
        "smoke": args.smoke,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    report("swap", summary, result, FIELDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
