"""Hot swap against a real vLLM CPU server (tiny seed model, real PEFT adapters).

The tests share one server and one state dir, and run in file order: each builds on the
store state the previous ones left (as the daemon would), and the kill -9 test comes last
among the single-server tests because it restarts the server.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from daemon.config import Config
from daemon.serving import promotion
from daemon.serving.adapters import served_name
from daemon.serving.swap import SwapError, Swapper
from daemon.serving.vllm import ManagedVLLM, VLLMClient
from store import adapters, events
from store.db import open_db
from tests.fixtures_vllm import make_lora

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPTS = ["The", "def main", "import os\n"]


def outputs(ep: VLLMClient, model: str) -> list[str]:
    return [ep.completion(model, p, max_tokens=12) for p in PROMPTS]


def current(cfg: Config) -> str | None:
    db = open_db(cfg.db_path)
    try:
        return adapters.current(db, cfg.track)
    finally:
        db.conn.close()


def recent_events(cfg: Config, prefix: str) -> list[dict]:
    db = open_db(cfg.db_path)
    try:
        return events.recent(db, kind_prefix=prefix, limit=50)
    finally:
        db.conn.close()


@pytest.fixture(scope="module")
def swapper(serving_cfg: Config, vllm_server: ManagedVLLM) -> Iterator[Swapper]:
    sw = Swapper(serving_cfg, [vllm_server.endpoint])
    yield sw
    sw.close()


@pytest.fixture(scope="module")
def loras(serving_cfg: Config) -> dict[str, str]:
    """Three promoted-to-be versions with distinct random weights."""
    for i, version in enumerate(("v0001", "v0002", "v0003"), start=1):
        make_lora(serving_cfg, version, seed=i)
    return {"a": "v0001", "b": "v0002", "c": "v0003"}


def test_stable_name_answers_before_first_promotion(
    serving_cfg: Config, vllm_server: ManagedVLLM, swapper: Swapper
) -> None:
    ep = vllm_server.endpoint
    assert swapper.reconcile() == {ep.name: "restored"}
    assert swapper.served_version() == "base"
    base_model = str(serving_cfg.resolved_base_model())
    # The zero adapter is exactly the base model.
    assert outputs(ep, "evergreen") == outputs(ep, base_model)
    assert swapper.reconcile() == {ep.name: "ok"}
    assert "evergreen" in ep.models()


def test_swap_changes_stable_output(
    serving_cfg: Config, vllm_server: ManagedVLLM, swapper: Swapper, loras: dict[str, str]
) -> None:
    ep = vllm_server.endpoint
    before = outputs(ep, "evergreen")
    result = promotion.promote(serving_cfg, loras["a"], swapper=swapper, reason="test a")
    assert result.swap is not None and result.swap.ok
    assert current(serving_cfg) == "v0001"
    out_a = outputs(ep, "evergreen")
    assert out_a == outputs(ep, "evergreen-v0001")
    assert out_a != before
    promotion.promote(serving_cfg, loras["b"], swapper=swapper, reason="test b")
    out_b = outputs(ep, "evergreen")
    assert out_b == outputs(ep, "evergreen-v0002")
    assert out_b != out_a
    assert swapper.served_version() == "v0002"
    assert ep.models()["evergreen"] == str(serving_cfg.adapters_dir.resolve() / "v0002")
    done = recent_events(serving_cfg, "swap.done")
    assert [e["subject"] for e in done[:2]] == ["v0002", "v0001"]


def test_pinned_version_keeps_answering_the_same(
    serving_cfg: Config, vllm_server: ManagedVLLM, swapper: Swapper, loras: dict[str, str]
) -> None:
    ep = vllm_server.endpoint
    pinned = outputs(ep, "evergreen-v0001")
    promotion.promote(serving_cfg, loras["c"], swapper=swapper, reason="test c")
    assert outputs(ep, "evergreen-v0001") == pinned
    assert outputs(ep, "evergreen") == outputs(ep, "evergreen-v0003")
    assert outputs(ep, "evergreen") != pinned


def test_rollback_restores_previous_output(
    serving_cfg: Config, vllm_server: ManagedVLLM, swapper: Swapper
) -> None:
    ep = vllm_server.endpoint
    expected = outputs(ep, "evergreen-v0002")
    assert current(serving_cfg) == "v0003"
    promotion.rollback(serving_cfg, swapper=swapper)
    assert current(serving_cfg) == "v0002"
    assert outputs(ep, "evergreen") == expected
    moves = recent_events(serving_cfg, "adapter.current")
    assert moves[0]["data"]["previous"] == "v0003"
    assert moves[0]["subject"] == "v0002"


def test_cli_promote_and_rollback_swap_the_running_server(
    serving_cfg: Config, vllm_server: ManagedVLLM
) -> None:
    ep = vllm_server.endpoint
    msg = promotion.promote(serving_cfg, "v0003", "cli").message
    assert "swapped on 1 endpoint" in msg
    assert outputs(ep, "evergreen") == outputs(ep, "evergreen-v0003")
    msg = promotion.rollback(serving_cfg, "v0002").message
    assert "swapped on 1 endpoint" in msg
    assert outputs(ep, "evergreen") == outputs(ep, "evergreen-v0002")
    assert current(serving_cfg) == "v0002"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"alias": "a/b", "target": "evergreen-v0001"}, 400, "without '/'"),
        ({"alias": "evergreen"}, 400, "target"),
        ({"alias": "evergreen", "target": "nope"}, 404, "not loaded"),
        ([1, 2], 400, "object"),
        ("base", 400, "alias"),  # the base model name (a path) can never be an alias
    ],
)
def test_alias_route_rejects_bad_requests(
    serving_cfg: Config, vllm_server: ManagedVLLM, body: object, status: int, message: str
) -> None:
    if body == "base":
        body = {"alias": str(serving_cfg.resolved_base_model()), "target": "evergreen-v0001"}
    before = vllm_server.endpoint.aliases()["evergreen"]
    headers = {
        "Authorization": f"Bearer {vllm_server.api_key}",
        "X-Evergreen-Admin": vllm_server.admin_secret,  # the alias route is an admin route
    }
    resp = httpx.post(f"{vllm_server.url}/v1/evergreen/alias", json=body, headers=headers)
    assert resp.status_code == status
    assert message in resp.text
    assert vllm_server.endpoint.aliases()["evergreen"] == before


def test_plugin_routes_need_the_api_key(vllm_server: ManagedVLLM) -> None:
    body = {"alias": "evergreen", "target": "evergreen-v0001"}
    assert httpx.post(f"{vllm_server.url}/v1/evergreen/alias", json=body).status_code == 401
    assert httpx.get(f"{vllm_server.url}/v1/evergreen/aliases").status_code == 401
    wrong = {"Authorization": "Bearer wrong"}
    assert httpx.get(f"{vllm_server.url}/v1/models", headers=wrong).status_code == 401


def _truncate(cfg: Config, version: str) -> None:
    weights = cfg.adapters_dir / version / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def _wrong_shapes(cfg: Config, version: str) -> None:
    """Valid safetensors whose tensors do not fit the model: only vLLM can tell."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = cfg.adapters_dir / version / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: torch.zeros(v.shape[0], v.shape[1] + 3) for k, v in tensors.items()}, weights)


@pytest.mark.parametrize(
    "case",
    [("v0004", _truncate, "validate"), ("v0005", _wrong_shapes, "load")],
    ids=["truncated-safetensors", "wrong-shapes"],
)
def test_corrupt_candidate_leaves_current_serving(
    serving_cfg: Config, vllm_server: ManagedVLLM, swapper: Swapper, case: tuple
) -> None:
    version, corrupt, stage = case
    ep = vllm_server.endpoint
    make_lora(serving_cfg, version, seed=40)
    corrupt(serving_cfg, version)
    before = outputs(ep, "evergreen")
    was = current(serving_cfg)
    with pytest.raises(SwapError, match=f"failed at {stage}"):
        promotion.promote(serving_cfg, version, swapper=swapper, reason="corrupt")
    assert current(serving_cfg) == was
    assert outputs(ep, "evergreen") == before
    assert served_name(serving_cfg, version) not in ep.models()
    assert ep.health()
    failed = recent_events(serving_cfg, "swap.failed")[0]
    assert failed["subject"] == version
    assert failed["data"]["stage"] == stage


def _stream_until(ep_url: str, key: str, stop: threading.Event, seen: list[tuple[bool, str]]):
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "evergreen", "prompt": "The", "max_tokens": 16, "stream": True}
    with httpx.Client(base_url=ep_url, headers=headers, timeout=120) as http:
        while not stop.is_set():
            model, done = "", False
            try:
                with http.stream("POST", "/v1/completions", json=body) as resp:
                    for line in resp.iter_lines():
                        if line == "data: [DONE]":
                            done = resp.status_code == 200
                        elif line.startswith("data: "):
                            model = json.loads(line[6:]).get("model", model)
            except httpx.HTTPError as exc:
                model = repr(exc)
            seen.append((done, model))


def test_no_request_fails_during_swaps(
    serving_cfg: Config, vllm_server: ManagedVLLM, swapper: Swapper, loras: dict[str, str]
) -> None:
    start = current(serving_cfg) or loras["b"]
    stop = threading.Event()
    seen: list[tuple[bool, str]] = []
    threads = [
        threading.Thread(
            target=_stream_until, args=(vllm_server.url, vllm_server.api_key, stop, seen)
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    try:
        while len(seen) < 8:
            time.sleep(0.05)
        for version in ("v0001", "v0003", "v0002", start):
            assert version is not None
            promotion.promote(serving_cfg, version, swapper=swapper, reason="under load")
            mark = len(seen)
            while len(seen) < mark + 4:
                time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    failed = [s for s in seen if not s[0]]
    assert failed == []
    # Each response names the version that served it.
    assert {m for _, m in seen} <= {"evergreen-v0001", "evergreen-v0002", "evergreen-v0003"}
    assert {"evergreen-v0001", "evergreen-v0003"} <= {m for _, m in seen}


def test_kill_9_restarts_and_restores_current(
    serving_cfg: Config, vllm_server: ManagedVLLM, swapper: Swapper
) -> None:
    ep = vllm_server.endpoint
    expected = outputs(ep, "evergreen")
    pinned_old = outputs(ep, "evergreen-v0001")
    want = current(serving_cfg)
    assert want != "v0001"
    assert vllm_server.proc is not None
    old_pid = vllm_server.proc.pid
    restored: list[dict[str, str]] = []
    vllm_server.on_restart.append(lambda: restored.append(swapper.reconcile()))
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 300
    restarted = False
    while time.monotonic() < deadline and not restarted:
        restarted = vllm_server.check()
        time.sleep(0.5)
    vllm_server.on_restart.clear()
    assert restarted, vllm_server.log_tail()
    assert vllm_server.restarts == 1
    assert vllm_server.proc is not None and vllm_server.proc.pid != old_pid
    with pytest.raises(ProcessLookupError):
        os.killpg(old_pid, 0)  # no orphan: the old engine process is gone too
    assert restored == [{ep.name: "restored"}]
    assert swapper.served_version() == want
    assert outputs(ep, "evergreen") == expected
    assert outputs(ep, f"evergreen-{want}") == expected
    # Older pinned versions are not reloaded eagerly: vLLM's filesystem resolver finds them
    # through <state>/serving/resolve/<name> on first use.
    assert "evergreen-v0001" not in ep.models()
    assert outputs(ep, "evergreen-v0001") == pinned_old


def test_two_endpoints_swap_all_or_none(
    serving_cfg: Config, vllm_server: ManagedVLLM, vllm_server2: ManagedVLLM
) -> None:
    ep1, ep2 = vllm_server.endpoint, vllm_server2.endpoint
    sw = Swapper(serving_cfg, [ep1, ep2])
    reconciled = sw.reconcile()
    assert reconciled[ep2.name] == "restored"
    assert reconciled[ep1.name] == "ok"
    make_lora(serving_cfg, "v0006", seed=6)
    promotion.promote(serving_cfg, "v0006", swapper=sw, reason="fan-out")
    out = outputs(ep1, "evergreen")
    assert out == outputs(ep1, "evergreen-v0006")
    assert outputs(ep2, "evergreen") == out  # same weights on both servers
    # Rank 16 fits server 1 (max_lora_rank 16) but not server 2 (8): server 1 loads and
    # smoke-tests it, server 2 refuses, so neither may switch.
    make_lora(serving_cfg, "v0007", seed=7, rank=16)
    with pytest.raises(SwapError, match="failed at load"):
        promotion.promote(serving_cfg, "v0007", swapper=sw, reason="fan-out partial")
    assert current(serving_cfg) == "v0006"
    assert outputs(ep1, "evergreen") == out
    assert outputs(ep2, "evergreen") == out
    assert "evergreen-v0007" not in ep1.models()  # what this swap loaded was undone
    assert sw.served_version() == "v0006"
