"""One training stage, run as a subprocess: ``python -m daemon.training.stage --stage-id N``.

It reads its plan (and the chunks the plan names) from the store and nothing else, then:

setup (base model, warm start from the parent adapter or a new LoRA) -> pack new + replay
data -> train (AdamW, warmup + cosine, grad accumulation, early stopping on the holdout,
NaN/inf guard, checkpoints) -> evaluate candidate and baseline -> write the adapter dir
atomically -> register it as a candidate.

Progress goes to stdout as JSON lines (for the parent's progress bar) and to the stage
row. SIGTERM makes the stage checkpoint and exit with :data:`EXIT_STOPPED`, leaving it
``running`` so it resumes from that checkpoint when started again with the same id.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.training import checkpoint, fsutil
from daemon.training import data as data_mod
from daemon.training.data import Example
from store import adapters, documents, stages
from store.db import open_db

EXIT_OK, EXIT_FAILED, EXIT_STOPPED = 0, 1, 3
FAULT_NAN_ENV = "EVERGREEN_FAULT_NAN_STEP"  # test hook: inject a NaN loss at this step
PROGRESS_EVERY_S = 0.5


class StageFailed(Exception):
    """The stage cannot produce a valid adapter (the reason is the message)."""


class StageStopped(Exception):
    """SIGTERM: the stage checkpointed and stops; it resumes when started again."""


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout for the parent process."""
    print(json.dumps({"event": event, **fields}, default=str), flush=True)


@dataclass
class Hparams:
    """The hyper-parameters a stage uses, as recorded in its plan."""

    lora_rank: int = 64
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    learning_rate: float = 4e-3
    warmup_ratio: float = 0.05
    epochs: float = 8.0
    batch_tokens: int = 512
    grad_accum: int = 1
    max_seq_len: int = 512
    weight_decay: float = 0.0
    early_stopping_patience: int = 3
    eval_every: int = 20
    checkpoint_every: int = 20
    max_steps: int = 0
    min_steps: int = 0  # plans written before min_steps existed resume as they were planned
    seed: int = 0
    min_lr_ratio: float = 0.1

    @classmethod
    def from_plan(cls, raw: dict[str, Any]) -> Hparams:
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        if "target_modules" in known:
            known["target_modules"] = tuple(known["target_modules"])
        return cls(**known)


class Stage:
    """The training flow of one stage (setup -> train -> evaluate -> publish)."""

    def __init__(self, db: Any, stage_id: int, plan: dict[str, Any]) -> None:
        self.db = db
        self.stage_id = stage_id
        self.plan = plan
        self.hp = Hparams.from_plan(plan.get("hparams", {}))
        self.stage_dir = Path(plan["stage_dir"])
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self.stop_requested = False
        self._last_progress = 0.0

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from daemon.training.device import pick

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        self.dev = pick()
        torch.manual_seed(self.hp.seed + self.stage_id)
        base = self.plan["base_model"]
        self.tok = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=self.dev.dtype)
        model.config.use_cache = False
        model.to(self.dev.device)  # type: ignore[arg-type]
        self.model = self._with_lora(model)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    def _with_lora(self, model: Any) -> Any:
        from peft import LoraConfig, PeftModel, get_peft_model

        init = self.plan.get("init_adapter") or ""
        if init:
            return PeftModel.from_pretrained(model, init, is_trainable=True)
        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        targets = [t for t in self.hp.target_modules if t in present]
        if not targets:
            raise StageFailed(f"none of the LoRA target modules {self.hp.target_modules} exist")
        cfg = LoraConfig(
            r=self.hp.lora_rank,
            lora_alpha=self.hp.lora_alpha,
            lora_dropout=self.hp.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, cfg)

    def load_data(self) -> None:
        """Examples for training (new + replay) and for evaluation, from the plan's ids."""
        max_len = self.hp.max_seq_len

        def examples(ids: list[int], source: str) -> list[Example]:
            out: list[Example] = []
            for chunk in documents.chunks_by_ids(self.db, ids):
                try:
                    out.extend(data_mod.encode_chunk(self.tok, chunk, source, max_len))
                except ValueError as exc:  # a malformed chat record: skip it, say so
                    emit("warning", chunk_id=chunk["id"], message=str(exc))
            return out

        p = self.plan
        self.new = examples(p.get("new_chunk_ids", []), "new")
        self.replay = examples(p.get("replay_chunk_ids", []), "replay")
        if not self.new:
            raise StageFailed("the plan's new chunks produced no trainable tokens")
        self.general_ids = self._general_ids()
        self.holdout = examples(p.get("holdout_chunk_ids", []), "eval")
        self.retention = examples(p.get("retention_chunk_ids", []), "eval") + [
            Example(e.ids, e.labels, e.chunk_id, "eval") for e in self.replay
        ]
        rows = data_mod.pack(self.new + self.replay, max_len)
        self.batches = data_mod.micro_batches(rows, self.hp.batch_tokens)
        n_tok = {
            "new": sum(map(len, self.new)),
            "replay": sum(map(len, self.replay)),
            "general": int(float(self.plan.get("general_mix", 0)) * sum(map(len, self.new)))
            if self.general_ids
            else 0,
        }
        filler = sum(
            len(b) * max(r.length for r in b) - sum(r.length for r in b) for b in self.batches
        )
        self.data_stats = {
            "new_tokens": n_tok["new"],
            "replay_tokens": n_tok["replay"],
            "rows": len(rows),
            "micro_batches": len(self.batches),
            "general_tokens_per_epoch": n_tok["general"],
            "pad_fraction": filler / max(1, filler + sum(n_tok.values())),
        }
        fsutil.write_json(
            self.stage_dir / "data.json",
            {
                **self.data_stats,
                "rows_chunk_ids": [[e.chunk_id for e in r.examples] for r in rows],
                "rows_sources": [[e.source for e in r.examples] for r in rows],
            },
        )

    def _general_ids(self) -> list[int]:
        """Token stream of the general text mixed into training (empty when off)."""
        path = self.plan.get("general_replay") or ""
        if float(self.plan.get("general_mix", 0)) <= 0 or not path or not Path(path).is_file():
            return []
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _general_rows(self, rows: list[data_mod.Row], micro: int) -> list[data_mod.Row]:
        """Fresh general-text rows for one micro-batch: ``general_mix ×`` its new tokens,
        cut at the batch's longest row (no extra padding), at a position that is a pure
        function of (stage, micro-batch) so a resumed stage sees the same text."""
        ids = self.general_ids
        if not ids:
            return []
        mix = float(self.plan.get("general_mix", 0))
        new_tok = sum(len(e) for r in rows for e in r.examples if e.source == "new")
        width = max(2, min(max(r.length for r in rows), len(ids)))
        n_rows = math.ceil(mix * new_tok / width)
        out = []
        for k in range(n_rows):
            start = ((micro * 31 + k) * 7919 + self.stage_id * 104729) % max(1, len(ids) - width)
            piece = ids[start : start + width]
            out.append(data_mod.Row([Example(piece, list(piece), -1, "general")]))
        return out

    # ------------------------------------------------------------------ train
    def total_steps(self) -> int:
        micro = math.ceil(self.hp.epochs * len(self.batches))
        # A small stage (a few new facts) repeats its data up to min_steps: a handful of
        # steps teaches a model nothing, whatever the epoch count says.
        steps = max(1, math.ceil(micro / self.hp.grad_accum), self.hp.min_steps)
        return min(steps, self.hp.max_steps) if self.hp.max_steps else steps

    def _lr_lambda(self, total: int) -> Any:
        warm = max(1, int(self.hp.warmup_ratio * total))
        floor = self.hp.min_lr_ratio

        def f(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            frac = (step - warm) / max(1, total - warm)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

        return f

    def train(self) -> dict[str, Any]:  # noqa: PLR0915 - one readable loop
        import torch

        hp = self.hp
        total = self.total_steps()
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_lambda(total))
        st: dict[str, Any] = {
            "step": 0,
            "best_loss": math.inf,
            "bad_evals": 0,
            "tokens": 0,
            "stopped_early": False,
            "resumed_from": 0,
            "last_loss": math.nan,
        }
        best: dict[str, Any] | None = None
        restored = checkpoint.load(self.stage_dir)
        if restored is not None:
            weights, best, saved = restored
            checkpoint.load_trainable(self.model, weights)
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            torch.set_rng_state(saved["rng"])
            st.update(saved["progress"])
            st["resumed_from"] = st["step"]
            emit("resumed", stage_id=self.stage_id, step=st["step"])

        fault = int(os.environ.get(FAULT_NAN_ENV, "0") or 0)
        self.model.train()
        t0, tok0 = time.time(), st["tokens"]
        per_epoch = len(self.batches)
        while st["step"] < total and not st["stopped_early"]:
            step = st["step"]
            opt.zero_grad(set_to_none=True)
            group = [
                self._batch_at(step * hp.grad_accum + k, per_epoch) for k in range(hp.grad_accum)
            ]
            n_labels = sum(c.labels_count for c in group)
            loss_sum = 0.0
            for c in group:
                loss = self._loss(c) / max(1, n_labels)
                if fault and step + 1 == fault:
                    loss = loss * math.nan
                if not torch.isfinite(loss):
                    raise StageFailed(f"non-finite loss at step {step + 1}")
                loss.backward()
                loss_sum += float(loss.detach())
                st["tokens"] += c.col.n_tokens
                st["data_tokens"] = st.get("data_tokens", 0) + c.data_tokens
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            if not torch.isfinite(grad_norm):
                raise StageFailed(f"non-finite gradient norm at step {step + 1}")
            opt.step()
            sched.step()
            st["step"] = step + 1
            st["last_loss"] = loss_sum
            if hp.eval_every and self.holdout and st["step"] % hp.eval_every == 0:
                best = self._early_stopping(st, best)
            done = st["step"] >= total or st["stopped_early"]
            if (
                done
                or self.stop_requested
                or (hp.checkpoint_every and st["step"] % hp.checkpoint_every == 0)
            ):
                checkpoint.save(
                    self.stage_dir,
                    self.model,
                    best,
                    {
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "rng": torch.get_rng_state(),
                        "progress": dict(st),
                    },
                )
            self._progress(st, total, t0, tok0)
            if self.stop_requested and not done:
                raise StageStopped(f"stopped at step {st['step']}")
        if best is not None:
            checkpoint.load_trainable(self.model, best)
        elapsed = max(1e-9, time.time() - t0)
        return {
            "steps": st["step"],
            "total_steps": total,
            "train_loss": st["last_loss"],
            "best_holdout_loss": st["best_loss"] if math.isfinite(st["best_loss"]) else None,
            "stopped_early": st["stopped_early"],
            "resumed_from_step": st["resumed_from"],
            "tokens_trained": st["tokens"],
            "data_tokens_trained": st.get("data_tokens", st["tokens"]),
            "tokens_per_s": (st["tokens"] - tok0) / elapsed,
        }

    def _batch_at(self, micro: int, per_epoch: int) -> _Prepared:
        epoch, idx = divmod(micro, per_epoch)
        order = data_mod.epoch_order(per_epoch, epoch, self.hp.seed)
        rows = self.batches[order[idx]]
        col = data_mod.collate(rows + self._general_rows(rows, micro), self.pad_id)
        labels = sum(x != data_mod.IGNORE for r in col.labels for x in r)
        return _Prepared(col, labels, sum(r.length for r in rows))

    def _loss(self, c: _Prepared) -> Any:
        import torch.nn.functional as F

        t = data_mod.to_tensors(c.col, self.dev.device, self.dev.dtype)
        labels = t.pop("labels")
        logits = self.model(**t).logits.float()
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=data_mod.IGNORE,
            reduction="sum",
        )

    def _early_stopping(self, st: dict[str, Any], best: dict[str, Any] | None) -> Any:
        from daemon.training.evaluate import example_losses

        loss, _, _ = example_losses(
            self.model,
            self.holdout,
            max_len=self.hp.max_seq_len,
            batch_tokens=self.hp.batch_tokens,
            device=self.dev.device,
        )
        emit("holdout", stage_id=self.stage_id, step=st["step"], loss=loss)
        if loss < st["best_loss"] - 1e-4:
            st["best_loss"], st["bad_evals"] = loss, 0
            return checkpoint.trainable_state(self.model)
        st["bad_evals"] += 1
        if st["bad_evals"] >= self.hp.early_stopping_patience:
            st["stopped_early"] = True
        return best

    def _progress(self, st: dict[str, Any], total: int, t0: float, tok0: int) -> None:
        now = time.time()
        if now - self._last_progress < PROGRESS_EVERY_S and st["step"] < total:
            return
        self._last_progress = now
        elapsed = max(1e-9, now - t0)
        done_now = st["step"] - st["resumed_from"]
        rate = done_now / elapsed
        prog = {
            "step": st["step"],
            "total": total,
            "loss": st["last_loss"],
            "tokens_per_s": round((st["tokens"] - tok0) / elapsed, 1),
            "eta_s": round((total - st["step"]) / rate, 1) if rate > 0 else None,
            "phase": "train",
        }
        stages.update_progress(self.db, self.stage_id, prog)
        emit("progress", stage_id=self.stage_id, **prog)

    # ------------------------------------------------------------------ evaluate + publish
    def evaluate(self) -> dict[str, dict[str, float]]:
        from daemon.training import evaluate as ev

        stages.update_progress(self.db, self.stage_id, {"phase": "evaluate"})
        emit("progress", stage_id=self.stage_id, phase="evaluate")
        max_len = self.hp.max_seq_len
        new_set = self.holdout or [Example(e.ids, e.labels, e.chunk_id, "eval") for e in self.new]
        sets = {"new_loss": new_set, "retention_loss": self.retention}
        general = self.plan.get("general_eval") or ""
        if general:
            sets["general_loss"] = ev.general_examples(self.tok, Path(general), max_len)
        evals = {}
        for path in self.plan.get("eval_sets", []):
            evals[Path(path).stem] = ev.load_eval_set(Path(path))
        metrics = ev.evaluate_both(
            self.model,
            self.tok,
            parent_path=self.plan.get("parent_path") or None,
            sets=sets,
            evals=evals,
            max_len=max_len,
            batch_tokens=self.hp.batch_tokens,
            device=self.dev.device,
            match_mode=self.plan.get("eval_match", "contains"),
        )
        metrics["candidate"]["new_loss_on"] = 0.0 if self.holdout else 1.0  # 1 = train data
        # Per-chunk losses of what this stage trained, under the candidate: the runner
        # records them as learned losses on promotion, replay policies read them.
        _, per_chunk, _ = ev.example_losses(
            self.model,
            [Example(e.ids, e.labels, e.chunk_id, "eval") for e in self.new + self.replay],
            max_len=max_len,
            batch_tokens=self.hp.batch_tokens,
            device=self.dev.device,
        )
        extra = [
            Example(e.ids, e.labels, e.chunk_id, "eval")
            for chunk in documents.chunks_by_ids(self.db, self.plan.get("score_chunk_ids", []))
            for e in self._safe_encode(chunk)
        ]
        if extra:
            _, more, _ = ev.example_losses(
                self.model,
                extra,
                max_len=max_len,
                batch_tokens=self.hp.batch_tokens,
                device=self.dev.device,
            )
            per_chunk.update(more)
        self.chunk_losses = per_chunk
        return metrics

    def _safe_encode(self, chunk: dict[str, Any]) -> list[Example]:
        try:
            return data_mod.encode_chunk(self.tok, chunk, "eval", self.hp.max_seq_len)
        except ValueError:
            return []

    def publish(self, train_stats: dict[str, Any], metrics: dict[str, Any]) -> Path:
        """Write the adapter to a temp dir, fsync, rename into ``adapters/<version>``."""
        final = Path(self.plan["output_dir"])
        fsutil.remove_stale_temps(final.parent)
        if final.exists():
            if adapters.get(self.db, self.plan["output_version"]) is not None:
                raise StageFailed(f"adapter {final.name} already exists and is registered")
            shutil.rmtree(final)  # a previous attempt of this stage died after publishing
        tmp = fsutil.make_temp_dir(final)
        try:
            self.model.save_pretrained(tmp, safe_serialization=True)
            cfg_path = tmp / "adapter_config.json"
            acfg = json.loads(cfg_path.read_text())
            acfg["base_model_name_or_path"] = self.plan["base_model"]
            cfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True))
            manifest = {
                "version": self.plan["output_version"],
                "track": self.plan.get("track", "default"),
                "stage_id": self.stage_id,
                "parent_version": self.plan.get("parent_version"),
                "init_adapter": self.plan.get("init_adapter") or None,
                "base_model": self.plan["base_model"],
                "base_model_sha256": self.plan.get("base_model_sha256"),
                "data": {
                    "new_chunk_ids": self.plan.get("new_chunk_ids", []),
                    "replay_chunk_ids": self.plan.get("replay_chunk_ids", []),
                    "new_sha256": self.plan.get("new_sha256"),
                    "replay_sha256": self.plan.get("replay_sha256"),
                    **self.data_stats,
                },
                "hparams": self.plan.get("hparams", {}),
                "lora": {
                    "r": acfg.get("r"),
                    "alpha": acfg.get("lora_alpha"),
                    "target_modules": acfg.get("target_modules"),
                },
                "training": train_stats,
                "metrics": metrics,
                "created_at": time.time(),
            }
            fsutil.write_json(tmp / "manifest.json", manifest)
            fsutil.publish_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final


@dataclass
class _Prepared:
    col: data_mod.Collated
    labels_count: int
    data_tokens: int  # new + replay tokens (general-mix rows excluded)


def run(db: Any, stage_id: int) -> int:
    """The whole stage; returns the process exit code. Never leaves a half adapter."""
    row = stages.get(db, stage_id)
    if row is None:
        emit("error", message=f"no stage {stage_id}")
        return EXIT_FAILED
    if row["status"] not in (stages.PLANNED, stages.RUNNING, stages.TRAINED):
        emit("error", message=f"stage {stage_id} is {row['status']}; nothing to do")
        return EXIT_FAILED
    plan = row["plan"]
    stage = Stage(db, stage_id, plan)
    signal.signal(signal.SIGTERM, lambda *_: setattr(stage, "stop_requested", True))
    stages.set_status(db, stage_id, stages.RUNNING, pid=os.getpid())
    try:
        stage.setup()
        stage.load_data()
        train_stats = stage.train()
        stages.set_status(db, stage_id, stages.TRAINED)
        metrics = stage.evaluate()
        metrics["training"] = train_stats
        path = stage.publish(train_stats, metrics)
        version = plan["output_version"]
        adapters.register(
            db,
            version,
            str(path),
            track=plan.get("track", "default"),
            parent_version=plan.get("parent_version"),
            stage_id=stage_id,
            metrics=metrics,
        )
        documents.put_scores(db, version, stage.chunk_losses)
        stages.merge_metrics(db, stage_id, metrics)
        stages.set_status(db, stage_id, stages.EVALUATED, candidate_version=version)
        emit("done", stage_id=stage_id, status=stages.EVALUATED, version=version, metrics=metrics)
        return EXIT_OK
    except StageStopped as exc:
        stages.update_progress(db, stage_id, {"phase": "stopped", "reason": str(exc)})
        emit("stopped", stage_id=stage_id, reason=str(exc))
        return EXIT_STOPPED
    except Exception as exc:  # any failure: clean failed state, no adapter
        reason = str(exc) if isinstance(exc, StageFailed) else f"{type(exc).__name__}: {exc}"
        stages.set_status(db, stage_id, stages.FAILED, reason=reason)
        emit("failed", stage_id=stage_id, reason=reason)
        return EXIT_FAILED


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _preload() -> None:
    """Import what every stage needs, up front (the bulk of a small stage's start-up)."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import daemon.training.device  # noqa: F401


def _wait_for_stage() -> int | None:
    """Warm mode: preload, then block until the parent writes ``{"stage_id", "log"}``.

    EOF (the parent closed the pipe, or died) means no stage is coming: exit quietly.
    Stderr moves to the stage's own log once the stage is known.
    """
    _preload()
    line = sys.stdin.readline()
    if not line.strip():
        return None
    order = json.loads(line)
    log_path = order.get("log")
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
    return int(order["stage_id"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m daemon.training.stage", description=__doc__)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--stage-id", type=int)
    which.add_argument(
        "--wait",
        action="store_true",
        help="Warm mode: import torch & co now, then read the stage to run from stdin.",
    )
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", help="Path of the store (evergreen.db).")
    where.add_argument("--state-dir", help="State dir holding evergreen.db.")
    args = ap.parse_args(argv)
    if args.wait:
        args.stage_id = _wait_for_stage()
        if args.stage_id is None:
            return EXIT_OK
    db_path = Path(args.db) if args.db else Path(args.state_dir) / "evergreen.db"
    if not db_path.is_file():
        emit("error", message=f"no store at {db_path}")
        return EXIT_FAILED
    db = open_db(db_path)
    try:
        return run(db, args.stage_id)
    finally:
        db.conn.close()


if __name__ == "__main__":
    sys.exit(main())
