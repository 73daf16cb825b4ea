"""The training loop of a stage: AdamW, warmup + cosine LR, early stopping, checkpoints.

Semantics the rest of Evergreen relies on:

* length: from the data (:mod:`daemon.training.sizing`): ``passes`` over the new +
  synthetic tokens (or ``epochs`` over the packed micro-batches when ``passes = 0``), at
  least ``min_steps`` optimizer steps (a small stage repeats its data) and at most
  ``max_steps`` (0 = no cap);
* early stopping: every ``eval_every`` steps the holdout loss is measured; the best
  weights are kept and restored at the end, and ``early_stopping_patience`` evaluations
  without improvement end the stage;
* a non-finite loss or gradient norm fails the stage (no adapter is written);
* checkpoints every ``checkpoint_every`` steps, at the end and on a stop request, hold
  everything needed to resume bit-for-bit (weights, best weights, optimizer, scheduler,
  RNG, :class:`LoopState`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import TrainingConfig
from daemon.training import checkpoint, fsdp, sizing
from daemon.training import data as data_mod
from daemon.training.distributed import Ranks
from daemon.training.lora import Loaded
from daemon.training.report import Reporter, StageFailed, StageStopped, emit
from daemon.training.stage_data import Prepared, StageData

FAULT_NAN_ENV = "EVERGREEN_FAULT_NAN_STEP"  # test hook: inject a NaN loss at this step
MIN_LR_RATIO = 0.1  # the cosine schedule ends at this share of the peak LR


@dataclass
class LoopState:
    """Where training stands; saved in every checkpoint as a plain dict."""

    step: int = 0
    best_loss: float = math.inf
    bad_evals: int = 0
    tokens: int = 0
    data_tokens: int = 0
    stopped_early: bool = False
    resumed_from: int = 0
    last_loss: float = math.nan

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> LoopState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


def total_steps(hp: TrainingConfig, micro_batches_per_epoch: int, data_tokens: int) -> int:
    """Optimizer steps of the stage: :func:`daemon.training.sizing.stage_steps`."""
    return sizing.stage_steps(
        hp, data_tokens=data_tokens, micro_batches_per_epoch=micro_batches_per_epoch
    )


def lr_lambda(
    total: int, warmup_ratio: float, floor: float = MIN_LR_RATIO
) -> Callable[[int], float]:
    """LR multiplier per step: linear warmup, then cosine down to ``floor``."""
    warm = max(1, int(warmup_ratio * total))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    return f


class Trainer:
    """Runs the loop on ``loaded.model`` over ``data``; :meth:`run` returns its stats."""

    def __init__(
        self,
        loaded: Loaded,
        data: StageData,
        hp: TrainingConfig,
        *,
        stage_dir: Path,
        report: Reporter,
        stop_requested: Callable[[], bool],
        ranks: Ranks | None = None,
    ) -> None:
        import torch

        self.model = loaded.model
        self.dev = loaded.dev
        self.data = data
        self.hp = hp
        self.stage_dir = stage_dir
        self.report = report
        self.stop_requested = stop_requested
        self.ranks = ranks or Ranks()
        # under torchrun: FSDP2 shards the model in place, or DDP wraps it
        self.sharded = self.ranks.active and hp.distributed == "fsdp"
        self.fwd = (
            fsdp.shard(self.model, self.ranks) if self.sharded else self.ranks.wrap(self.model)
        )
        sized = hp.model_copy(update={"grad_accum": self.ranks.global_accum(hp.grad_accum)})
        self.total = total_steps(sized, len(data.batches), data.sized_tokens())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(self.total, hp.warmup_ratio)
        )
        self.fault_step = int(os.environ.get(FAULT_NAN_ENV, "0") or 0)
        self.best: dict[str, Any] | None = None  # best weights by holdout loss

    def run(self) -> dict[str, Any]:
        """Train to the end (or early stop); raises StageStopped on a stop request."""
        st = self.restore()
        self.report.start(st.step, st.tokens, self.total)
        t0, tok0 = time.monotonic(), st.tokens
        self.model.train()
        while st.step < self.total and not st.stopped_early:
            self.step(st)
            hp = self.hp
            if hp.eval_every and self.data.holdout and st.step % hp.eval_every == 0:
                self.early_stopping(st)
            done = st.step >= self.total or st.stopped_early
            stop = self.ranks.any(self.stop_requested())  # every rank stops at this step
            if done or stop or (hp.checkpoint_every and st.step % hp.checkpoint_every == 0):
                self.save(st)
            lr = float(self.sched.get_last_lr()[0])
            self.report.step(st.step, self.total, loss=st.last_loss, lr=lr, tokens=st.tokens)
            if stop and not done:
                raise StageStopped(f"stopped at step {st.step}")
        if self.best is not None:
            self.load_weights(self.best)
        elapsed = max(1e-9, time.monotonic() - t0)
        return self.stats(st, (st.tokens - tok0) / elapsed)

    def step(self, st: LoopState) -> None:
        """One optimizer step over the step's micro-batches (this rank's share of them),
        the loss summed per token over the whole (all ranks') batch."""
        import torch

        self.opt.zero_grad(set_to_none=True)
        group = [
            self.data.batch_at(i) for i in self.ranks.micro_indices(st.step, self.hp.grad_accum)
        ]
        n_labels, n_tokens, n_data = self.ranks.all_sum(
            [
                sum(c.labels_count for c in group),
                sum(c.col.n_tokens for c in group),
                sum(c.data_tokens for c in group),
            ]
        )
        scale = self.ranks.world / max(1.0, n_labels)  # DDP averages gradients over ranks
        loss_sum = 0.0
        for k, c in enumerate(group):
            sync = k == len(group) - 1 or not self.ranks.active  # all-reduce once a step
            with self.no_sync(sync):
                loss = self.loss(c) * scale
                if self.fault_step and st.step + 1 == self.fault_step:
                    loss = loss * math.nan
                if not torch.isfinite(loss):
                    raise StageFailed(f"non-finite loss at step {st.step + 1}")
                loss.backward()
            loss_sum += float(loss.detach()) / self.ranks.world
        grad_norm = fsdp.full(torch.nn.utils.clip_grad_norm_(self.params, 1.0))
        if not torch.isfinite(grad_norm):
            raise StageFailed(f"non-finite gradient norm at step {st.step + 1}")
        self.opt.step()
        self.sched.step()
        st.step += 1
        st.tokens += int(n_tokens)
        st.data_tokens += int(n_data)
        st.last_loss = self.ranks.all_sum([loss_sum])[0]

    def no_sync(self, sync: bool) -> Any:
        """Where a micro-batch's backward runs: gradients synced over the ranks, or kept
        on this rank to be summed with the next micro-batch's."""
        if sync:
            return contextlib.nullcontext()
        return fsdp.gradient_sync(self.model, False) if self.sharded else self.fwd.no_sync()

    def loss(self, c: Prepared) -> Any:
        """Summed token cross-entropy of one micro-batch (labels are pre-shifted)."""
        import torch.nn.functional as F

        t = data_mod.to_tensors(c.col, self.dev.device, self.dev.dtype)
        labels = t.pop("labels")
        logits = self.fwd(**t).logits.float()
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=data_mod.IGNORE,
            reduction="sum",
        )

    def early_stopping(self, st: LoopState) -> None:
        """Measure the holdout; keep the best weights; stop after ``patience`` misses."""
        from daemon.training.evaluate import example_losses

        loss, _, _ = example_losses(
            self.model,
            self.data.holdout,
            max_len=self.hp.max_seq_len,
            batch_tokens=self.hp.batch_tokens,
            device=self.dev.device,
        )
        if loss < st.best_loss - 1e-4:
            st.best_loss, st.bad_evals = loss, 0
            self.best = self.trainable()
        else:
            st.bad_evals += 1
            st.stopped_early = st.bad_evals >= self.hp.early_stopping_patience
        patience = self.hp.early_stopping_patience
        self.report.holdout(
            st.step, self.total, loss, best=st.best_loss, bad=st.bad_evals, patience=patience
        )

    def trainable(self) -> dict[str, Any]:
        """The trainable weights in full (under FSDP gathered from every rank: a collective)."""
        if self.sharded:
            return fsdp.full_trainable(self.model)
        return checkpoint.trainable_state(self.model)

    def load_weights(self, weights: dict[str, Any]) -> None:
        """Load full trainable ``weights`` into the model (into each rank's shard)."""
        if self.sharded:
            fsdp.load_full(self.model, weights)
        else:
            checkpoint.load_trainable(self.model, weights)

    def save(self, st: LoopState) -> None:
        """Checkpoint: rank 0 writes; under FSDP every rank first helps gather the weights
        and the optimizer state in full (under DDP every rank holds the same ones)."""
        import torch

        if not (self.ranks.main or self.sharded):
            return
        weights = self.trainable()
        optim = fsdp.optimizer_state(self.model, self.opt) if self.sharded else None
        if not self.ranks.main:
            return
        state = {
            "optimizer": self.opt.state_dict() if optim is None else optim,
            "scheduler": self.sched.state_dict(),
            "rng": torch.get_rng_state(),
            "progress": dataclasses.asdict(st),
        }
        checkpoint.save(self.stage_dir, weights, self.best, state)

    def restore(self) -> LoopState:
        """The state of the last checkpoint (weights and optimizer loaded), or a new one."""
        import torch

        restored = checkpoint.load(self.stage_dir)
        if restored is None:
            return LoopState()
        weights, self.best, saved = restored
        self.load_weights(weights)
        if self.sharded:
            fsdp.load_optimizer_state(self.model, self.opt, saved["optimizer"])
        else:
            self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        st = LoopState.from_checkpoint(saved["progress"])
        st.resumed_from = st.step
        if self.ranks.main:
            emit("resumed", stage_id=self.data.stage_id, step=st.step)
        return st

    def stats(self, st: LoopState, tokens_per_s: float) -> dict[str, Any]:
        """What the manifest and the stage row record about training."""
        return {
            "steps": st.step,
            "total_steps": self.total,
            "train_loss": st.last_loss,
            "best_holdout_loss": st.best_loss if math.isfinite(st.best_loss) else None,
            "stopped_early": st.stopped_early,
            "resumed_from_step": st.resumed_from,
            "tokens_trained": st.tokens,
            "data_tokens_trained": st.data_tokens,
            "tokens_per_s": tokens_per_s,
        }
