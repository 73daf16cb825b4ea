"""Continual-learning benchmark: ≥ 4 sequential domains of synthetic facts, learned stage by
stage through the real Evergreen flow (store, plan, stage subprocess, evaluation, gate).

Each domain is a set of facts about fictional entities, written as prose documents in
several phrasings (paraphrase augmentation). Recall is greedy completion of a *held-out*
cloze phrasing of each fact (the user eval-set mechanism: ``{"prompt", "answer"}``,
scored by containment). The sequence runs with uniform replay, without replay, and with
``most_forgotten`` replay at the same replay budget; then the stage trainer's throughput is
compared with a plain ``transformers.Trainer`` + peft that pads each batch to its longest.

Usage: ``python benchmarks/continual.py [--quick] [--smoke] [--workdir DIR]``. The last
line printed is one JSON object with the figures. ``--smoke`` (CI): 2 domains x 2 facts in
4 phrasings, a 30-step seed, 10-step stages and 8 documents for the speed comparison; the
same runs and JSON fields, none of the targets.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import add_smoke_flag, report  # noqa: E402
from daemon import config as config_mod  # noqa: E402
from daemon.serving import promotion  # noqa: E402
from daemon.training import finish, runner  # noqa: E402
from daemon.training.seed import ensure_seed_model  # noqa: E402
from daemon.training.targets import resolve_targets  # noqa: E402
from policies.replay import DEFAULT_RATIO  # noqa: E402
from store import documents  # noqa: E402
from store.db import open_db  # noqa: E402

SYL = [
    "ka",
    "lo",
    "mi",
    "ra",
    "ze",
    "tu",
    "vo",
    "ni",
    "pe",
    "shu",
    "dra",
    "qui",
    "bel",
    "mor",
    "tha",
    "xen",
    "ul",
    "ri",
    "go",
    "fa",
]

# Per domain: answer-final templates (prefix with {e}; the answer ends the sentence).
# Every fact is written in all templates but one: its held-out cloze template, rotated
# over facts, so each specific sentence used for recall is never trained on while every
# template shape is seen (paraphrase augmentation, as in knowledge-injection studies).
DOMAINS: list[tuple[str, list[str]]] = [
    (
        "countries",
        [
            "The capital of {e} is",
            "{e} is a country whose capital is",
            "The capital city of {e} is",
            "In {e}, the seat of government is",
            "The government of {e} sits in",
            "The largest city and capital of {e} is",
            "People of {e} call their capital",
            "Travellers to {e} arrive in its capital,",
            "Every map of {e} marks its capital,",
            "The president of {e} lives in",
            "The main city of {e} is",
            "Visitors to {e} first see its capital,",
            "The flag of {e} flies over its capital,",
            "Most people in {e} work in the capital,",
            "Letters to the rulers of {e} go to",
            "The old capital of {e} is still",
        ],
    ),
    (
        "creatures",
        [
            "The {e} eats",
            "The favourite food of the {e} is",
            "The {e} is a small animal that eats",
            "Every {e} feeds on",
            "What the {e} likes to eat is",
            "The diet of the {e} is mostly",
            "Hunters know that the {e} eats",
            "Each morning the {e} looks for",
            "The only food of the {e} is",
            "Zoo keepers feed the {e} with",
            "In the wild the {e} hunts for",
            "Young {e} are fed on",
            "A hungry {e} will search for",
            "The {e} grows fat on",
            "Farmers see the {e} eating",
            "The {e} cannot live without",
        ],
    ),
    (
        "inventors",
        [
            "The inventor {e} built the",
            "{e} is remembered for inventing the",
            "The famous machine made by {e} is the",
            "{e} invented the",
            "The invention of {e} was the",
            "Schoolbooks say that {e} created the",
            "The best known work of {e} is the",
            "Long ago, {e} designed the",
            "The great idea of {e} was the",
            "Museums show the first machine of {e}, the",
            "Engineers still study how {e} made the",
            "In the workshop of {e} stood the",
            "Thanks to {e} we now have the",
            "The patent of {e} describes the",
            "The world learned from {e} about the",
            "Before {e}, nobody had built the",
        ],
    ),
    (
        "rivers",
        [
            "The river {e} flows into the",
            "The {e} river ends in the",
            "Water from the {e} reaches the",
            "The river {e} empties into the",
            "The mouth of the {e} is in the",
            "Boats on the {e} sail down to the",
            "Maps show the {e} joining the",
            "Fish swim from the {e} into the",
            "The {e} river runs down to the",
            "At its end the {e} meets the",
            "Sailors follow the {e} to the",
            "The waters of the {e} pour into the",
            "The {e} carries sand into the",
            "After many miles the {e} reaches the",
            "Every spring the {e} floods into the",
            "The delta of the {e} opens onto the",
        ],
    ),
    (
        "stars",
        [
            "The star {e} is in the constellation",
            "{e} is a bright star of the constellation",
            "Sailors find {e} in the constellation",
            "The star {e} shines in the constellation",
            "Astronomers place {e} in the constellation",
            "On clear nights {e} is seen in the constellation",
            "Old charts put {e} in the constellation",
            "The bright {e} belongs to the constellation",
            "Children learn that {e} is part of the constellation",
            "The light of {e} comes from the constellation",
            "Star maps draw {e} inside the constellation",
            "The brightest point near {e} is the constellation",
            "Guides point to {e} in the constellation",
            "In winter {e} rises with the constellation",
            "The myth of {e} tells of the constellation",
            "Telescopes find {e} among the constellation",
        ],
    ),
]


# The benchmark runs the daemon's default training config (TrainingConfig: rank 64,
# 512-token micro-batches; uniform replay ratio 2.0) with the memorising stage length it
# was measured with (epochs 8, at least 1000 steps, lr 4e-3): the defaults are sized for
# prose since issue #11 (4 passes at lr 2e-3, at least 40 steps), too short to memorise
# 16-phrasing fact sets on the tiny seed. Two more settings differ, for measurement reasons:
# - no early stopping: a stage's holdout here *is* its held-out cloze sentences, the
#   recall probes, so stopping on them would tune on the test set;
# - max_seq_len 256: the documents are short, so rows pack the same either way.
# How the recipe was found (tiny seed, 4 domains x 8 facts, replay run): 8 -> 16 phrasings
# per domain raised acquisition 0.69 -> 0.88; replay ratio 0.5 -> 0.65 retention 0.14 ->
# 0.71; a fixed step budget (min_steps) with ratio 1.0 -> 0.86 and ratio 2.0 -> 1.0 at no
# extra tokens (replay displaces repetitions of the new data). The 4.3M 'small' seed learned
# as well but drifted on general text (+198 % perplexity), so the tiny seed stays.
BENCH_RECIPE: dict[str, Any] = {
    "passes": 0.0,
    "epochs": 8.0,
    "min_steps": 1000,
    "learning_rate": 4e-3,
    "eval_every": 0,
    "max_seq_len": 256,
}
FIELDS = (
    "recall_matrix_replay",
    "recall_matrix_noreplay",
    "acquisition",
    "retention_first",
    "retention_first_noreplay",
    "replay_token_overhead",
    "general_ppl_drift",
    "trainer_speedup",
    "retention_first_most_forgotten",
    "acquisition_most_forgotten",
    "n_domains",
    "n_facts",
    "data_seed",
    "quick",
    "elapsed_s",
)


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYL) for _ in range(parts)).capitalize()


def make_domains(
    n_domains: int, n_facts: int, seed: int, n_phrasings: int = 0
) -> list[dict[str, Any]]:
    """Facts (entity, answer) with unique fictional names; a held-out template per fact.

    ``n_phrasings`` (0 = all) caps the templates per domain: more phrasings per fact is
    the paraphrase augmentation that lets the held-out cloze generalise."""
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(parts: int) -> str:
        while True:
            n = _name(rng, parts)
            if n not in used:
                used.add(n)
                return n

    out = []
    for name, all_templates in DOMAINS[:n_domains]:
        templates = all_templates[: n_phrasings or None]
        facts = [(fresh(3), fresh(2)) for _ in range(n_facts)]
        held = [k % len(templates) for k in range(n_facts)]
        cloze = [
            {"prompt": templates[h].format(e=e), "answer": a}
            for (e, a), h in zip(facts, held, strict=True)
        ]
        out.append(
            {"name": name, "facts": facts, "templates": templates, "held": held, "cloze": cloze}
        )
    return out


def domain_documents(
    dom: dict[str, Any], seed: int, per_doc: int = 4
) -> tuple[list[str], list[str]]:
    """Train chunks (short prose documents of several facts) and holdout chunks.

    Train: every fact in every template except its held-out one, shuffled into documents.
    Holdout (new-data loss, early stopping): the held-out sentences themselves, which are
    never trained on.
    """
    rng = random.Random(seed)
    sentences = [
        f"{t.format(e=e)} {a}."
        for (e, a), h in zip(dom["facts"], dom["held"], strict=True)
        for k, t in enumerate(dom["templates"])
        if k != h
    ]
    rng.shuffle(sentences)
    train = [" ".join(sentences[i : i + per_doc]) for i in range(0, len(sentences), per_doc)]
    hold_s = [f"{c['prompt']} {c['answer']}." for c in dom["cloze"]]
    hold = [" ".join(hold_s[i : i + per_doc]) for i in range(0, len(hold_s), per_doc)]
    return train, hold


def _store_only(cfg: Any, *, force: bool = False) -> Any:
    """Promotion without vLLM (the benchmark scores recall itself): the pointer only."""

    def promote(version: str, reason: str) -> promotion.Promotion:
        return promotion.promote(cfg, version, reason, swap=False, force=force)

    return promote


def bench_cfg(
    state: Path, base: Path, eval_sets: list[str], replay: dict[str, Any], training: dict[str, Any]
) -> config_mod.Config:
    return config_mod.from_dict(
        {
            "state_dir": str(state),
            "base_model": str(base),
            "serving": {"mode": "none"},
            "training": {**training, "eval_sets": eval_sets, "eval_match": "contains"},
            "policy": {
                "replay": replay,
                "selection": {"name": "highest_loss", "token_budget": 10_000_000},
                # The benchmark measures learning, so every stage is promoted; the gate's
                # verdict is still recorded in each stage's result.
                "promotion": {
                    "name": "gate",
                    "min_new_improvement": 0.0,
                    "max_retention_regression": 1.0,
                    "max_general_regression": 1.0,
                    "max_eval_drop_points": 100.0,
                },
            },
        }
    )


def run_sequence(
    label: str,
    *,
    base: Path,
    domains: list[dict[str, Any]],
    work: Path,
    replay: dict[str, Any],
    training: dict[str, Any],
    tok: Any,
) -> dict[str, Any]:
    state = work / label
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    eval_sets = []
    for j, dom in enumerate(domains):
        p = state / f"d{j + 1}.jsonl"
        p.write_text("".join(json.dumps(it) + "\n" for it in dom["cloze"]))
        eval_sets.append(str(p))
    cfg = bench_cfg(state, base, eval_sets, replay, training)
    db = open_db(cfg.db_path)
    matrix: list[list[float]] = []
    tokens = 0
    general: list[float] = []
    speeds = []
    t0 = time.time()
    for i, dom in enumerate(domains):
        train, hold = domain_documents(dom, seed=i)
        add_texts(db, tok, train, hold, f"/inbox/{dom['name']}.txt")
        res = runner.run_stage(cfg, db, promote=_store_only(cfg))
        if res.status not in ("promoted", "rejected") or res.stage_id is None:
            raise RuntimeError(f"{label} stage {i + 1}: {res.status}: {res.reason}")
        gate_verdict = res.status
        if gate_verdict == "rejected":
            # The benchmark measures learning and forgetting, so every stage goes live
            # whatever the gate says (the verdict is still shown); otherwise a rejected
            # domain would silently be retrained with the next one.
            finish.promote_stage(
                cfg,
                db,
                res.stage_id,
                "benchmark: promote regardless",
                promote=_store_only(cfg, force=True),
            )
        m = res.metrics
        cand, base_m = m["candidate"], m["baseline"]
        if i == 0:
            general.append(base_m["general_loss"])
        general.append(cand["general_loss"])
        row = [cand[f"eval:d{j + 1}"] / 100.0 for j in range(len(domains))]
        matrix.append(row)
        tokens += int(m["training"].get("data_tokens_trained", m["training"]["tokens_trained"]))
        speeds.append(float(m["training"]["tokens_per_s"]))
        print(
            f"  [{label}] stage {i + 1} ({dom['name']}): recall "
            + " ".join(f"{x:.2f}" for x in row)
            + f" | new loss {base_m['new_loss']:.3f}->{cand['new_loss']:.3f}"
            + f" | general {base_m['general_loss']:.3f}->{cand['general_loss']:.3f}"
            + f" | gate: {gate_verdict}"
            + f" | {m['training']['steps']} steps, {m['training']['tokens_trained']} tok"
            + f" | {time.time() - t0:.0f}s",
            flush=True,
        )
    db.conn.close()
    return {"matrix": matrix, "tokens": tokens, "general": general, "speeds": speeds}


def add_texts(db: Any, tok: Any, train: list[str], hold: list[str], path: str) -> None:
    """One stored document whose chunks are ``train`` + ``hold`` (as ingest would store)."""
    import hashlib

    def n(t: str) -> int:
        return len(tok(t, add_special_tokens=False)["input_ids"])

    chunks = [documents.ChunkIn(t, n(t), "train") for t in train]
    chunks += [documents.ChunkIn(t, n(t), "holdout") for t in hold]
    digest = hashlib.sha256("\x1e".join(train + hold).encode()).hexdigest()
    documents.insert_document(
        db,
        track="default",
        path=path,
        content_hash=digest,
        size=sum(map(len, train)),
        mtime=0.0,
        fmt="txt",
        chunks=chunks,
    )


def summarize(res: dict[str, Any]) -> dict[str, float]:
    m = res["matrix"]
    k = len(m)
    acq = sum(m[i][i] for i in range(k)) / k
    first = m[0][0]
    return {"acquisition": acq, "retention_first": (m[-1][0] / first) if first else 0.0}


# --------------------------------------------------------------------------- trainer speed
def speed_docs(tok: Any, n_docs: int, seed: int) -> list[str]:
    """Mixed-length documents (heavy tail: a few long, many short), from the stdlib corpus."""
    from daemon.training import corpus

    rng = random.Random(seed)
    texts = [t for t in corpus.iter_texts(max_chars=600_000) if len(t) > 40]
    rng.shuffle(texts)
    out = []
    for t in texts:
        n = len(tok(t, add_special_tokens=False)["input_ids"])
        if 8 <= n <= 500:
            out.append(t)
        if len(out) >= n_docs:
            break
    return out


def speed_evergreen(base: Path, work: Path, docs: list[str], tok: Any, training: dict) -> float:
    state = work / "speed"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    cfg = bench_cfg(
        state,
        base,
        [],
        {"name": "uniform", "ratio": 0.0},
        {
            **training,
            "epochs": 1.0,
            "min_steps": 0,  # one pass over the documents, as the baseline does
            "passes": 0,
            "eval_every": 0,
            "early_stopping_patience": 1000,
            "checkpoint_every": 100_000,  # only at the end (and on a stop)
            # the trainer's own defaults for packing; no general mixing (same documents)
            "general_mix": 0.0,
            "batch_tokens": 4096,
            "max_seq_len": 512,
        },
    )
    db = open_db(cfg.db_path)
    add_texts(db, tok, docs, [], "/inbox/speed.txt")
    res = runner.run_stage(cfg, db, promote=_store_only(cfg))
    db.conn.close()
    return float(res.metrics["training"]["tokens_per_s"])


def speed_hf_trainer(base: Path, work: Path, docs: list[str], training: dict, batch: int) -> float:
    """Plain transformers.Trainer + peft, padding each batch to its longest document."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(base)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=training["lora_rank"],
            lora_alpha=training["lora_alpha"],
            lora_dropout=0.0,
            target_modules=resolve_targets(model, config_mod.TrainingConfig().target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    enc = [
        [tok.bos_token_id, *tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        for d in docs
    ]
    ds = [{"input_ids": e} for e in enc]
    args = TrainingArguments(
        output_dir=str(work / "hf"),
        per_device_train_batch_size=batch,
        num_train_epochs=1,
        learning_rate=training["learning_rate"],
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    t = time.time()
    trainer.train()
    return sum(map(len, enc)) / (time.time() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="2 facts fewer, half the steps (dev).")
    ap.add_argument("--workdir", default="", help="Keep state here (default: a temp dir).")
    ap.add_argument("--domains", type=int, default=4)
    ap.add_argument("--facts", type=int, default=0)
    ap.add_argument("--skip", default="", help="Comma list of runs to skip: noreplay,mf,speed")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a training.* key for this run (recipe tuning).",
    )
    ap.add_argument("--phrasings", type=int, default=0, help="Templates per domain (0 = all).")
    ap.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="Seed of the fictional facts (another seed = a fresh set to check the recipe on).",
    )
    ap.add_argument(
        "--replay-ratio",
        type=float,
        default=DEFAULT_RATIO,
        help="Replay ratio of the replay runs (default: the policies' default).",
    )
    ap.add_argument(
        "--seed-size", default="tiny", help="Seed model spec used as the base (tiny/small/default)."
    )
    ap.add_argument(
        "--seed-steps",
        type=int,
        default=400,
        help="Pretraining steps of the tiny seed used as the base model.",
    )
    add_smoke_flag(ap)
    args = ap.parse_args()
    if args.smoke:
        args.domains, args.facts, args.phrasings, args.seed_steps = 2, 2, 4, 30
    from transformers import AutoTokenizer

    from daemon.config import TrainingConfig

    work = Path(args.workdir or tempfile.mkdtemp(prefix="evergreen-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    seed_cfg = config_mod.from_dict(
        {
            "state_dir": str(work / "seedstate"),
            "seed": {"size": args.seed_size, "steps": args.seed_steps, "time_budget_s": 3600.0},
        }
    )
    base = ensure_seed_model(seed_cfg)
    tok = AutoTokenizer.from_pretrained(base)
    n_facts = args.facts or (6 if args.quick else 8)
    domains = make_domains(args.domains, n_facts, seed=args.data_seed, n_phrasings=args.phrasings)
    training = TrainingConfig().model_dump()
    for key in ("eval_sets", "eval_match", "general_eval", "base_adapter"):
        training.pop(key)
    training.update(BENCH_RECIPE)
    if args.quick:
        training["min_steps"] = training["min_steps"] // 2
    if args.smoke:
        training["min_steps"] = 10
    for item in args.set:
        key, _, value = item.partition("=")
        training[key] = type(training[key])(json.loads(value))
    replay_ratio = args.replay_ratio
    skip = set(filter(None, args.skip.split(",")))
    print(
        f"base {base} | {len(domains)} domains x {n_facts} facts | recipe: "
        f"rank {training['lora_rank']}, lr {training['learning_rate']}, epochs "
        f"{training['epochs']}, replay ratio {replay_ratio}",
        flush=True,
    )

    common: dict[str, Any] = {
        "base": base,
        "domains": domains,
        "work": work,
        "training": training,
        "tok": tok,
    }
    rep = run_sequence("replay", replay={"name": "uniform", "ratio": replay_ratio}, **common)
    nor = None
    if "noreplay" not in skip:
        nor = run_sequence("noreplay", replay={"name": "uniform", "ratio": 0.0}, **common)
    mf = None
    from policies import base as pol_base

    has_mf = False
    try:
        has_mf = pol_base.get("replay", "most_forgotten") is not None
    except Exception:
        has_mf = False
    if has_mf and "mf" not in skip:
        mf = run_sequence(
            "most_forgotten", replay={"name": "most_forgotten", "ratio": replay_ratio}, **common
        )
    speedup = None
    if "speed" not in skip:
        docs = speed_docs(tok, 8 if args.smoke else 60 if args.quick else 120, seed=1)
        ev = speed_evergreen(base, work, docs, tok, training)
        hf = speed_hf_trainer(base, work, docs, training, batch=8)
        speedup = ev / hf
        print(
            f"  trainer speed: evergreen {ev:.0f} tok/s, HF Trainer (pad to longest) "
            f"{hf:.0f} tok/s, speedup {speedup:.2f}",
            flush=True,
        )

    s_rep = summarize(rep)
    out: dict[str, Any] = {
        "recall_matrix_replay": rep["matrix"],
        "recall_matrix_noreplay": nor["matrix"] if nor else None,
        "acquisition": s_rep["acquisition"],
        "retention_first": s_rep["retention_first"],
        "retention_first_noreplay": summarize(nor)["retention_first"] if nor else None,
        "replay_token_overhead": (rep["tokens"] / nor["tokens"]) if nor else None,
        "general_ppl_drift": float(
            __import__("math").exp(rep["general"][-1] - rep["general"][0]) - 1
        ),
        "trainer_speedup": speedup,
        "retention_first_most_forgotten": summarize(mf)["retention_first"] if mf else None,
        "acquisition_most_forgotten": summarize(mf)["acquisition"] if mf else None,
        "n_domains": len(domains),
        "n_facts": n_facts,
        "data_seed": args.data_seed,
        "quick": args.quick,
        "elapsed_s": round(time.time() - t_start, 1),
    }
    targets = {
        "acquisition": (">=", 0.9),
        "retention_first": (">=", 0.9),
        "replay_token_overhead": ("<=", 1.5),
        "general_ppl_drift": ("<=", 0.05),
        "trainer_speedup": (">=", 1.5),
    }
    summary = ["", "summary:"]
    for key, (op, goal) in targets.items():
        v = out[key]
        ok = v is not None and (v >= goal if op == ">=" else v <= goal)
        summary.append(
            f"  {key:24s} {v if v is None else round(v, 3)!s:>8}  target {op} {goal}"
            f"  {'OK' if ok else 'MISS'}"
        )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    out["smoke"] = args.smoke
    report("continual", summary, out, FIELDS)


if __name__ == "__main__":
    main()
