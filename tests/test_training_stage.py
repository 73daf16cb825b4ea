"""Training stages end to end: real store, real tiny model, real stage subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config
from daemon.serving import promotion
from daemon.training import foreground, runner, scoring, spawn
from daemon.training import plan as plan_mod
from daemon.training.finish import PromoteFn
from daemon.training.warm import WarmTrainer
from store import adapters, documents, stages
from store.db import open_db
from tests.fixtures_model import add_doc, make_tiny_cfg

pytestmark = pytest.mark.slow

FACTS_A = [f"The glorp number {i} lives in Vantor{i} and eats red pebbles." for i in range(8)]
FACTS_B = [f"Quimbo river {i} flows into the Sea of Darl{i} every spring." for i in range(8)]
PERMISSIVE_GATE = {
    "name": "gate",
    "min_new_improvement": 0.0,
    "max_retention_regression": 1.0,
    "max_general_regression": 1.0,
    "max_eval_drop_points": 100.0,
}


def _promote(cfg: Config) -> PromoteFn:
    """Serving's promotion, as the service injects it (serving.mode = none: pointer only)."""
    return lambda version, reason: promotion.promote(cfg, version, reason)


def _cfg(tmp_path: Path, base: Path, **training: object):
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    t = {
        "epochs": 6.0,
        "learning_rate": 0.005,
        "max_seq_len": 128,
        "batch_tokens": 256,
        "eval_every": 0,
        "checkpoint_every": 100_000,  # only at the end (and on a stop)
        **training,
    }
    return make_tiny_cfg(
        state,
        base,
        training=t,
        serving={"mode": "none"},
        policy={"promotion": PERMISSIVE_GATE, "replay": {"name": "uniform", "ratio": 0.5}},
    )


def test_stage_learns_promotes_and_replays(tmp_path: Path, tiny_seed_model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    evals = tmp_path / "facts.jsonl"
    evals.write_text(
        json.dumps({"prompt": "The glorp number 1 lives in", "answer": "Vantor1"}) + "\nnot json\n"
    )
    cfg = _cfg(tmp_path, tiny_seed_model, eval_sets=[str(evals)])
    db = open_db(cfg.db_path)
    add_doc(db, FACTS_A[:6], holdout=FACTS_A[6:])
    seen: list[dict] = []
    res = runner.run_stage(cfg, db, promote=_promote(cfg), on_progress=seen.append)
    assert res.status == "promoted", res
    m = res.metrics
    assert m["candidate"]["new_loss"] < m["baseline"]["new_loss"] - 0.05
    for side in ("candidate", "baseline"):
        assert {"new_loss", "general_loss", "eval:facts"} <= set(m[side])
        assert 0.0 <= m[side]["eval:facts"] <= 100.0
    assert any(x.get("event") == "progress" and x.get("step") for x in seen)
    assert adapters.current(db) == "v0001"

    path = cfg.adapters_dir / "v0001"
    acfg = json.loads((path / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(tiny_seed_model)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["parent_version"] is None and manifest["base_model_sha256"]
    assert manifest["data"]["new_sha256"] and manifest["metrics"]["candidate"]
    assert not [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_seed_model), path)
    assert any("lora_A" in n for n, _ in model.named_parameters())

    # trained chunks are marked with their learned loss and offered to the replay buffer
    trained = documents.chunks_by_ids(db, stages.get(db, 1)["plan"]["new_chunk_ids"])
    assert all(c["status"] == "trained" and c["learned_loss"] is not None for c in trained)
    assert len(documents.replay_rows(db, "default")) == len(trained)

    # stage 2: warm start from v0001, replay chunks really in the packed batches
    add_doc(db, FACTS_B[:6], holdout=FACTS_B[6:])
    res2 = runner.run_stage(cfg, db, promote=_promote(cfg))
    assert res2.status in ("promoted", "rejected"), res2
    row = stages.get(db, res2.stage_id)
    plan = row["plan"]
    assert plan["parent_version"] == "v0001" and plan["init_adapter"].endswith("v0001")
    assert plan["replay_chunk_ids"]
    packed = json.loads((Path(plan["stage_dir"]) / "data.json").read_text())
    trained_ids = {c for r in packed["rows_chunk_ids"] for c in r}
    assert set(plan["replay_chunk_ids"]) <= trained_ids
    assert set(plan["new_chunk_ids"]) <= trained_ids
    assert packed["replay_tokens"] > 0
    assert "retention_loss" in row["metrics"]["candidate"]
    db.conn.close()


def test_nan_loss_fails_stage_without_adapter(
    tmp_path: Path, tiny_seed_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVERGREEN_FAULT_NAN_STEP", "2")
    cfg = _cfg(tmp_path, tiny_seed_model)
    db = open_db(cfg.db_path)
    add_doc(db, FACTS_A)
    res = runner.run_stage(cfg, db, promote=_promote(cfg))
    assert res.status == "failed"
    assert "non-finite loss at step 2" in res.reason
    assert stages.get(db, res.stage_id)["status"] == "failed"
    assert not cfg.adapters_dir.exists() or not any(cfg.adapters_dir.iterdir())
    assert adapters.list_adapters(db, "default") == []
    assert documents.pending_chunks(db, "default")  # data is still pending
    db.conn.close()


def _wait_for(cond, timeout: float = 300.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached")


def test_kill9_mid_stage_then_resume(tmp_path: Path, tiny_seed_model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tmp_path, tiny_seed_model, epochs=30.0, batch_tokens=64, checkpoint_every=3)
    db = open_db(cfg.db_path)
    add_doc(db, FACTS_A)
    sid = plan_mod.write_plan(cfg, db)
    assert sid is not None
    stage_dir = cfg.stages_dir / str(sid)
    proc = subprocess.Popen(
        spawn.stage_command(cfg, sid),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=spawn.subprocess_env(),
        cwd=str(spawn.PROJECT_ROOT),
    )
    try:
        _wait_for(
            lambda: (
                (stage_dir / "checkpoint" / "state.pt").is_file()
                and (stages.get(db, sid)["progress"].get("step") or 0) >= 4
            )
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    row = stages.get(db, sid)
    assert row["status"] == "running"
    assert row["progress"]["step"] < row["progress"]["total"]
    assert not (cfg.adapters_dir / "v0001").exists()

    # `evergreen train --now` finishes the interrupted stage instead of planning another
    # one on the same chunks (which would train them twice).
    res = foreground.train_now(cfg, promote=_promote(cfg), progress=False)
    assert res.stage_id == sid and res.status == "promoted", res
    assert [r["id"] for r in stages.list_stages(db, cfg.track)] == [sid]
    assert res.metrics["training"]["resumed_from_step"] >= 3
    assert res.metrics["training"]["steps"] == res.metrics["training"]["total_steps"]
    PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_seed_model), cfg.adapters_dir / "v0001"
    )
    db.conn.close()


def test_stop_event_checkpoints_and_daemon_startup_resumes(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    cfg = _cfg(tmp_path, tiny_seed_model, epochs=30.0, batch_tokens=64, checkpoint_every=50)
    db = open_db(cfg.db_path)
    add_doc(db, FACTS_A)
    stop = threading.Event()

    def on_progress(msg: dict) -> None:
        if (msg.get("step") or 0) >= 2:
            stop.set()

    res = runner.run_stage(cfg, db, promote=_promote(cfg), on_progress=on_progress, stop_event=stop)
    assert res.status == "interrupted", res
    sid = res.stage_id
    assert stages.get(db, sid)["status"] == "running"
    assert (cfg.stages_dir / str(sid) / "checkpoint" / "state.pt").is_file()

    (out,) = runner.resume_or_fail_running(cfg, db, promote=_promote(cfg))
    assert out.stage_id == sid and out.status == "promoted", out
    assert out.metrics["training"]["resumed_from_step"] >= 2
    assert runner.resume_or_fail_running(cfg, db, promote=_promote(cfg)) == []
    db.conn.close()


def test_resume_fails_cleanly_when_base_model_is_gone(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    import shutil

    base = tmp_path / "base-copy"
    shutil.copytree(tiny_seed_model, base)
    cfg = _cfg(tmp_path, base)
    db = open_db(cfg.db_path)
    add_doc(db, FACTS_A)
    sid = plan_mod.write_plan(cfg, db)
    stages.set_status(db, sid, stages.RUNNING, pid=os.getpid())
    shutil.rmtree(base)
    (out,) = runner.resume_or_fail_running(cfg, db, promote=_promote(cfg))
    assert out.status == "failed"
    assert "gone" in stages.get(db, sid)["reason"]
    db.conn.close()


def test_scorer_writes_chunk_losses_under_base_model(tmp_path: Path, tiny_seed_model: Path) -> None:
    cfg = _cfg(tmp_path, tiny_seed_model)
    db = open_db(cfg.db_path)
    add_doc(db, FACTS_A[:3])
    add_doc(db, ["zq xv kw pj " * 5])
    ids = [int(c["id"]) for c in documents.pending_chunks(db, "default")]
    assert scoring.score_chunks(cfg, None) == 0
    got = documents.scores(db, None, ids)
    assert set(got) == set(ids)
    assert all(0.0 < v < 20.0 for v in got.values())
    assert got[ids[-1]] > min(got[i] for i in ids[:3])  # gibberish is more surprising
    db.conn.close()


def test_general_mix_adds_general_text_rows(tmp_path: Path, tiny_seed_model: Path) -> None:
    assert (tiny_seed_model / "general_train.txt").is_file()
    cfg = _cfg(tmp_path, tiny_seed_model, general_mix=1.0, epochs=2.0)
    db = open_db(cfg.db_path)
    add_doc(db, FACTS_A)
    res = runner.run_stage(cfg, db, promote=_promote(cfg))
    assert res.status in ("promoted", "rejected"), res
    plan = stages.get(db, res.stage_id)["plan"]
    assert plan["general_replay"].endswith("general_train.txt") and plan["general_mix"] == 1.0
    t = res.metrics["training"]
    # general rows are trained on top of the stage's own data, about 1:1
    assert t["tokens_trained"] > 1.5 * t["data_tokens_trained"]
    db.conn.close()


@contextlib.contextmanager
def _warm_setup(
    tmp_path: Path, base: Path, epochs: float
) -> Iterator[tuple[Any, Any, WarmTrainer]]:
    """A store with one pending document and the daemon's warm-process holder."""
    cfg = _cfg(tmp_path, base, epochs=epochs)
    db = open_db(cfg.db_path)
    add_doc(db, FACTS_A)
    warm = spawn.warm_trainer(cfg)
    try:
        yield cfg, db, warm
    finally:
        warm.close()
        db.conn.close()


def test_warm_stage_process_runs_the_stage_it_is_handed(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    with _warm_setup(tmp_path, tiny_seed_model, epochs=2.0) as (cfg, db, warm):
        warm.prewarm()
        warm_pid = warm.pid
        assert warm_pid is not None
        # It imports torch & co and then waits, running nothing until it is handed a stage.
        time.sleep(1.0)
        assert warm.pid == warm_pid
        assert stages.list_stages(db, "default") == []
        res = runner.run_stage(cfg, db, promote=_promote(cfg), warm=warm)
        assert res.status == "promoted", res
        row = stages.get(db, res.stage_id)
        assert row["pid"] == warm_pid  # the warm process ran it, not a cold one
        assert warm.pid is None  # used up; the daemon starts the next one
        log_text = (cfg.stages_dir / str(res.stage_id) / "stage.log").read_text()
        assert (cfg.adapters_dir / res.version / "adapter_model.safetensors").is_file()
        assert "Traceback" not in log_text


def test_dead_warm_process_falls_back_to_a_cold_start_and_close_stops_it(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    with _warm_setup(tmp_path, tiny_seed_model, epochs=1.0) as (cfg, db, warm):
        warm.prewarm()
        dead = warm.pid
        assert dead is not None
        os.kill(dead, signal.SIGKILL)
        _wait_for(lambda: not Path(f"/proc/{dead}").exists() or _is_zombie(dead), 30)
        res = runner.run_stage(cfg, db, promote=_promote(cfg), warm=warm)
        assert res.status in ("promoted", "rejected"), res
        assert stages.get(db, res.stage_id)["pid"] != dead
        # close() ends an idle warm process (here one still importing) within seconds
        warm.prewarm()
        live = warm.pid
        assert live is not None
        warm.close()
        assert warm.pid is None
        _wait_for(lambda: not Path(f"/proc/{live}").exists(), 10)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_min_steps_repeats_a_small_stage_data_and_max_steps_still_caps(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    cfg = _cfg(tmp_path, tiny_seed_model, epochs=1.0, min_steps=15, batch_tokens=4096)
    db = open_db(cfg.db_path)
    add_doc(db, FACTS_A)
    res = runner.run_stage(cfg, db, promote=_promote(cfg))
    t = res.metrics["training"]
    # one epoch of this tiny document is a single micro-batch; min_steps makes it 15
    assert t["steps"] == t["total_steps"] == 15
    plan = stages.get(db, res.stage_id)["plan"]
    packed = json.loads((Path(plan["stage_dir"]) / "data.json").read_text())
    assert packed["micro_batches"] == 1
    assert t["data_tokens_trained"] == 15 * (packed["new_tokens"] + packed["replay_tokens"])
    db.conn.close()
    (tmp_path / "b").mkdir()
    cfg2 = _cfg(tmp_path / "b", tiny_seed_model, epochs=1.0, min_steps=15, max_steps=4)
    db2 = open_db(cfg2.db_path)
    add_doc(db2, FACTS_A)
    assert runner.run_stage(cfg2, db2, promote=_promote(cfg2)).metrics["training"]["steps"] == 4
    db2.conn.close()


def test_warm_process_that_crashes_idle_is_not_respawned_on_every_wake(tmp_path: Path) -> None:
    from tests.fixtures_model import make_tiny_cfg

    cfg = make_tiny_cfg(tmp_path / "state", tmp_path / "no-model")
    # A broken `daemon` package first on the path: the warm process dies at once.
    fake = tmp_path / "fake" / "daemon"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("broken daemon package")\n')
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    warm = WarmTrainer(cfg, spawn.stage_command(cfg, None), env, str(fake.parent))
    try:
        warm.prewarm()
        first = warm._proc
        assert first is not None
        first.wait(timeout=60)
        assert first.returncode != 0
        warm.prewarm()  # notices the crash: no new process for a while
        assert warm.pid is None and warm._proc is None
        assert warm.take(1, tmp_path / "x.log") is None  # the stage then starts cold
        assert "broken daemon package" in (cfg.stages_dir / "warm.log").read_text()
    finally:
        warm.close()


def test_stage_log_shows_progress_a_human_can_follow(tmp_path: Path, tiny_seed_model: Path) -> None:
    # 12 steps (min_steps on one micro-batch), a holdout evaluation every 3 steps
    cfg = _cfg(
        tmp_path,
        tiny_seed_model,
        epochs=1.0,
        min_steps=12,
        batch_tokens=4096,
        eval_every=3,
        early_stopping_patience=100,
    )
    db = open_db(cfg.db_path)
    add_doc(db, FACTS_A[:6], holdout=FACTS_A[6:])
    res = runner.run_stage(cfg, db, promote=_promote(cfg))
    assert res.status in ("promoted", "rejected"), res
    log = (cfg.stages_dir / str(res.stage_id) / "stage.log").read_text()
    steps = [int(s) for s in re.findall(r"stage \d+: step (\d+)/12 loss \d+\.\d+ lr ", log)]
    # the first and last step, every evaluation step, and whatever 5 s apart in between
    assert {1, 3, 6, 9, 12} <= set(steps) and steps == sorted(set(steps)), log
    assert re.findall(r"step (\d+)/12 holdout loss", log) == ["3", "6", "9", "12"], log
    assert re.search(r"tok/s ETA \S+", log)
    assert "evaluating the candidate" in log and "evaluated: new_loss" in log
    assert f"published {res.version}" in log
    assert "Traceback" not in log
    progress = stages.get(db, res.stage_id)["progress"]
    assert progress["phase"] == "evaluate"  # the last phase the stage reported
    db.conn.close()
