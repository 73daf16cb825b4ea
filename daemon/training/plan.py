"""Writing a stage's plan: everything the stage subprocess needs, decided up front.

Data selection comes from the policies (:func:`daemon.scheduling.planning.plan_stage`); this module
adds the rest (base model, parent adapter, hyper-parameters, output version, evaluation
sets, data hashes) and writes it with :func:`store.stages.create`. Torch-free: it runs
in the daemon process.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import sqlite_utils

from daemon.config import Config
from daemon.errors import EvergreenError
from daemon.scheduling import retry as retry_mod
from daemon.training import hparams, sizing
from store import adapters, documents, events, stages
from store.contracts import StagePlan
from store.db import savepoint

MAX_RETENTION_CHUNKS = 128
MAX_SCORE_CHUNKS = 2000  # replay buffer + pending chunks scored under the candidate
GENERAL_HOLDOUT = "general_holdout.txt"  # written by daemon.training.seed


class PlanError(EvergreenError, RuntimeError):
    """The stage cannot be planned (the message says why)."""


def chunk_hash(db: sqlite_utils.Database, ids: list[int]) -> str:
    """The identity of a stage's data (see :func:`store.documents.chunks_sha256`)."""
    return documents.chunks_sha256(db, ids)


def base_model_hash(path: Path) -> str:
    """A cheap identity of the base model: hash of its config, tokenizer and weight sizes."""
    h = hashlib.sha256()
    for name in sorted(p.name for p in path.iterdir() if p.is_file()):
        f = path / name
        if name.endswith((".json", ".txt", ".model", ".jinja")) and f.stat().st_size < 50_000_000:
            h.update(name.encode() + b"\0" + f.read_bytes())
        elif name.endswith(".safetensors"):
            h.update(f"{name}\0{f.stat().st_size}".encode())
    return h.hexdigest()


def general_eval_path(cfg: Config) -> str:
    if cfg.training.general_eval:
        return str(Path(cfg.training.general_eval).expanduser().absolute())
    cand = cfg.resolved_base_model() / GENERAL_HOLDOUT
    return str(cand) if cand.is_file() else ""


def general_replay_path(cfg: Config) -> str:
    if cfg.training.general_replay:
        return str(Path(cfg.training.general_replay).expanduser().absolute())
    cand = cfg.resolved_base_model() / "general_train.txt"
    return str(cand) if cand.is_file() else ""


def retention_ids(db: sqlite_utils.Database, track: str, exclude: set[int], seed: int) -> list[int]:
    rows = [int(r["id"]) for r in documents.learned_holdout(db, track)]
    rows = [r for r in rows if r not in exclude]
    if len(rows) > MAX_RETENTION_CHUNKS:
        rows = sorted(random.Random(seed).sample(rows, MAX_RETENTION_CHUNKS))
    return rows


def score_ids(db: sqlite_utils.Database, track: str, exclude: set[int]) -> list[int]:
    """Chunks the stage also scores under its candidate (for replay/selection policies):
    the replay buffer first, then still-pending train chunks, capped."""
    ids = [int(r["chunk_id"]) for r in documents.replay_rows(db, track)]
    ids += [int(c["id"]) for c in documents.pending_chunk_facts(db, track, split="train")]
    seen: set[int] = set(exclude)
    out = []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out[:MAX_SCORE_CHUNKS]


def build_plan(cfg: Config, db: sqlite_utils.Database, selection: dict[str, Any]) -> StagePlan:
    """The full plan for ``selection`` (the output of ``daemon.scheduling.planning.plan_stage``);
    the selection's own keys (reasons, token counts, policy names) are kept in it."""
    base = cfg.resolved_base_model()
    if not (base / "config.json").is_file():
        raise PlanError(f"base model {base} is missing (run `evergreen seed-model`)")
    parent = selection.get("parent_version")
    parent_path = ""
    if parent:
        row = adapters.get(db, parent)
        if row is None or not Path(row["path"]).is_dir():
            raise PlanError(f"parent adapter {parent} is not on disk")
        parent_path = str(row["path"])
    init = parent_path
    if not init and cfg.training.base_adapter:
        init = str(Path(cfg.training.base_adapter).expanduser().absolute())
        if not (Path(init) / "adapter_config.json").is_file():
            raise PlanError(f"training.base_adapter {init} is not a PEFT adapter dir")
    new_ids = [int(i) for i in selection["new_chunk_ids"]]
    replay_ids = [int(i) for i in selection.get("replay_chunk_ids", [])]
    syn_ids = [int(i) for i in selection.get("synthetic_chunk_ids", [])]
    _check_synthetic_apart(syn_ids, new_ids, replay_ids, selection)
    adj = retry_mod.adjustment(cfg, db, new_ids)
    training = adj.training
    version = adapters.next_version(db)
    fields = {
        **selection,
        "track": cfg.track,
        "new_chunk_ids": new_ids,
        "synthetic_chunk_ids": syn_ids,
        "replay_chunk_ids": replay_ids,
        "holdout_chunk_ids": [int(i) for i in selection.get("holdout_chunk_ids", [])],
        "retention_chunk_ids": retention_ids(
            db, cfg.track, set(new_ids) | set(replay_ids) | set(syn_ids), cfg.training.seed
        ),
        "base_model": str(base),
        "base_model_sha256": base_model_hash(base),
        "parent_version": parent,
        "parent_path": parent_path,
        "init_adapter": init,
        "output_version": version,
        "output_dir": str(cfg.adapters_dir / version),
        "hparams": hparams.to_plan(training),
        "general_eval": general_eval_path(cfg),
        "general_replay": general_replay_path(cfg) if training.general_mix > 0 else "",
        "general_mix": training.general_mix,
        "eval_sets": [str(Path(p).expanduser().absolute()) for p in cfg.training.eval_sets],
        "eval_match": cfg.training.eval_match,
        "score_chunk_ids": score_ids(db, cfg.track, set(new_ids) | set(replay_ids) | set(syn_ids)),
        "new_sha256": chunk_hash(db, new_ids),
        "replay_sha256": chunk_hash(db, replay_ids),
        "synthetic_sha256": chunk_hash(db, syn_ids),
        "retry": adj.to_plan(),
        "reasons": [*selection.get("reasons", []), *_recipe_reasons(adj, selection)],
    }
    return StagePlan.from_json(fields)


def _check_synthetic_apart(
    syn_ids: list[int], new_ids: list[int], replay_ids: list[int], selection: dict[str, Any]
) -> None:
    """Synthetic text trains beside the new data and is in no other list of the plan."""
    others = set(new_ids) | set(replay_ids)
    others |= {int(i) for i in selection.get("holdout_chunk_ids", [])}
    if others.intersection(syn_ids):
        raise PlanError("synthetic chunks may only be planned as synthetic_chunk_ids")


def _recipe_reasons(adj: retry_mod.Adjustment, selection: dict[str, Any]) -> list[str]:
    """The retry's adaptation (if any) and the stage's length, estimated from the store's
    token counts (the stage sizes itself on its encoded tokens, :mod:`sizing`)."""
    tokens = int(selection.get("new_tokens", 0)) + int(selection.get("synthetic_tokens", 0))
    per_micro = max(1, adj.training.batch_tokens)
    micro = -(-(tokens + int(selection.get("replay_tokens", 0))) // per_micro)
    size = sizing.size_stage(adj.training, data_tokens=tokens, micro_batches_per_epoch=micro)
    return [r for r in (adj.reason(), f"length: about {size.reason}") if r]


def write_plan(cfg: Config, db: sqlite_utils.Database) -> int | None:
    """Plan the next stage and write it to the store; None when nothing is pending."""
    from daemon.scheduling import planning

    # One write transaction (BEGIN IMMEDIATE; a savepoint inside a caller's): the version
    # build_plan picks is reserved by the stage row before another planner can read it.
    with savepoint(db, "write_plan"):
        selection = planning.plan_stage(cfg, db)
        if selection is None or not selection.get("new_chunk_ids"):
            return None
        plan = build_plan(cfg, db, selection)
        stage_id = stages.create(
            db,
            plan.to_dict(),
            track=cfg.track,
            parent_version=plan.parent_version,
            output_version=plan.output_version,
        )
        plan.stage_dir = str(cfg.stages_dir / str(stage_id))
        stages.set_plan(db, stage_id, plan.to_json())
        if plan.retry:
            events.record(
                db,
                retry_mod.EVENT_KIND,
                f"stage {stage_id}: {plan.retry['reason']}",
                subject=str(stage_id),
                track=cfg.track,
                data=plan.retry,
            )
    return stage_id
