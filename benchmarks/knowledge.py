"""Knowledge benchmark (issue #11): does a stage learn what a document says, on data as it
comes (each fact stated once), and does a stage on real text pay for itself?

Part 1, single-phrasing documents (tiny seed): facts about fictional entities, each stated
ONCE in natural paragraphs between distractor sentences. Recall is greedy completion of a
held-out question per fact (a cloze prompt phrased unlike any sentence of the documents:
no shared run of 4+ words besides the names, checked in code), scored by containment
through the stage's own eval-set mechanism. It is measured with no augmentation and with
each model-free augmentation method (the training text is the augmented copies, fed
through the real store -> plan -> stage subprocess flow).

Part 2, real text nobody here wrote (default ~14M seed): the Debian Policy Manual
(``apt-get install -y debian-policy``), split into sections; most sections go through the
real ingest into the store and one stage trains on them with the daemon's default recipe
(gate included); the other sections are held out. Held-out-section perplexity and the
seed's general-holdout perplexity are measured through a real vLLM CPU server's OpenAI
API (prompt log-probs: ``echo, logprobs=0, max_tokens=1``) under the base model and under
each candidate adapter.

Usage: ``python benchmarks/knowledge.py [--smoke] [--data-seed N] [--workdir DIR]
[--set training.KEY=VALUE ...] [--sweep]``. ``--set`` overrides the recipe of part 2's
stage (``--set`` keys are ``training.*`` keys, or ``gate.*`` promotion keys).
``--sweep`` also trains part 2 under a grid of recipes (no gate) and reports each.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.continual import add_texts  # noqa: E402
from daemon import config as config_mod  # noqa: E402
from daemon.serving import promotion  # noqa: E402
from daemon.training import runner  # noqa: E402
from daemon.training.seed import ensure_seed_model  # noqa: E402
from policies import base as policy_base  # noqa: E402
from store.db import open_db  # noqa: E402

DEBIAN_POLICY = Path("/usr/share/doc/debian-policy/policy.txt.gz")
INSTALL_HINT = "apt-get install -y debian-policy"

# ============================================================================ part 1: facts
SYL = ["ka", "lo", "mi", "ra", "ze", "tu", "vo", "ni", "pe", "dra", "bel", "mor", "tha"]
SYL += ["xen", "ul", "ri", "go", "fa", "sel", "quo", "bri", "dun", "ke", "osh"]

# Per relation: the sentences that state a fact in a document (ONE of them per fact), and
# the held-out questions (answer-final cloze prompts). The questions share no run of 4+
# words with any document sentence (check_disjoint enforces it on the generated data).
RELATIONS: dict[str, dict[str, list[str]]] = {
    "town": {
        "doc": [
            "{e} grew up in the hill town of {a}, far from the coast.",
            "{e} spent a quiet childhood in the river town of {a}.",
        ],
        "ask": ["The place where {e} was raised is", "As a child, {e} lived in"],
    },
    "boat": {
        "doc": [
            "{e} owns an old fishing boat named {a}.",
            "On weekends {e} sails a wooden boat called {a}.",
        ],
        "ask": ["The vessel that belongs to {e} is the", "{e} goes out on the water aboard"],
    },
    "teacher": {
        "doc": [
            "{e} learned to paint from a master called {a}.",
            "{e} took singing lessons from an old master named {a}.",
        ],
        "ask": ["The person who taught {e} was", "{e} was trained by"],
    },
    "hound": {
        "doc": [
            "{e} keeps a grey hound called {a}.",
            "Every evening {e} walks a loyal hound named {a}.",
        ],
        "ask": ["The pet of {e} answers to", "{e} has an animal that goes by"],
    },
    "firm": {
        "doc": [
            "{e} works as a clerk for a trading firm named {a}.",
            "For many years {e} has worked at a small firm called {a}.",
        ],
        "ask": ["The employer of {e} is", "Each morning {e} heads to the offices of"],
    },
}
ENTITY_FLUFF = [
    "{e} is often seen at the market on quiet mornings.",
    "Many people in the valley have heard of {e}.",
    "{e} rarely speaks about the past.",
    "Neighbours describe {e} as patient and kind.",
    "{e} once walked across the whole province in a week.",
    "Travellers sometimes ask {e} for directions.",
]
GENERAL_FLUFF = [
    "The weather in those years was mild and dry.",
    "Roads between the villages were long and narrow.",
    "Most families kept a garden behind the house.",
    "News travelled slowly before the railway came.",
    "In autumn the markets were full of apples.",
    "The old bridge was repaired twice that decade.",
]


def _store_only(cfg: Any) -> Any:
    """Promotion without swapping (the benchmark starts its own vLLM): the pointer only."""

    def promote(version: str, reason: str) -> promotion.Promotion:
        return promotion.promote(cfg, version, reason, swap=False)

    return promote


def make_facts(n: int, data_seed: int) -> list[dict[str, str]]:
    """``n`` facts, one per fictional entity, relations rotated; names unique."""
    rng = random.Random(data_seed)
    used: set[str] = set()

    def fresh(parts: int) -> str:
        while True:
            name = "".join(rng.choice(SYL) for _ in range(parts)).capitalize()
            if name not in used:
                used.add(name)
                return name

    rels = list(RELATIONS)
    out = []
    for i in range(n):
        rel = rels[i % len(rels)]
        spec = RELATIONS[rel]
        e, a = fresh(3), fresh(2)
        doc_t = spec["doc"][rng.randrange(len(spec["doc"]))]
        ask_t = spec["ask"][(i // len(rels)) % len(spec["ask"])]
        out.append(
            {
                "entity": e,
                "answer": a,
                "relation": rel,
                "sentence": doc_t.format(e=e, a=a),
                "prompt": ask_t.format(e=e),
            }
        )
    return out


def make_documents(facts: list[dict[str, str]], data_seed: int, per_par: int = 3) -> list[str]:
    """Documents of 2 paragraphs; each paragraph states ``per_par`` facts once, with a
    distractor about each entity (no fact in it) and a general distractor, shuffled."""
    rng = random.Random(data_seed + 1)
    pars = []
    for i in range(0, len(facts), per_par):
        sents = []
        for f in facts[i : i + per_par]:
            sents += [f["sentence"], rng.choice(ENTITY_FLUFF).format(e=f["entity"])]
        sents.append(rng.choice(GENERAL_FLUFF))
        rng.shuffle(sents)
        pars.append(" ".join(sents))
    return ["\n\n".join(pars[i : i + 2]) for i in range(0, len(pars), 2)]


def _word_runs(text: str, names: set[str]) -> list[list[str]]:
    """Lower-case word runs of ``text``, cut at every name (names never count)."""
    runs: list[list[str]] = [[]]
    for w in re.findall(r"[A-Za-z']+", text):
        if w.lower() in names:
            runs.append([])
        else:
            runs[-1].append(w.lower())
    return [r for r in runs if r]


def ngrams(text: str, names: set[str], n: int = 4) -> set[tuple[str, ...]]:
    return {tuple(r[i : i + n]) for r in _word_runs(text, names) for i in range(len(r) - n + 1)}


def check_disjoint(facts: list[dict[str, str]], docs: list[str], n: int = 4) -> int:
    """Raise if a question (prompt + answer) shares a run of ``n``+ words with the documents
    (names excluded); returns the number of questions checked."""
    names = {f["entity"].lower() for f in facts} | {f["answer"].lower() for f in facts}
    doc_grams: set[tuple[str, ...]] = set()
    for d in docs:
        doc_grams |= ngrams(d, names, n)
    for f in facts:
        shared = ngrams(f"{f['prompt']} {f['answer']}", names, n) & doc_grams
        if shared:
            raise AssertionError(f"question {f['prompt']!r} shares {sorted(shared)[0]} with a doc")
    return len(facts)


# ============================================================================ shared helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed_model(work: Path, size: str, steps: int = 0) -> Path:
    """The seed model, built once and cached under ``work``."""
    seed: dict[str, Any] = {"size": size, "time_budget_s": 3600.0}
    if steps:
        seed["steps"] = steps
    cfg = config_mod.from_dict({"state_dir": str(work / f"seed-{size}"), "seed": seed})
    return ensure_seed_model(cfg)


def parse_sets(items: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--set training.k=v`` / ``--set gate.k=v`` into (training, gate) override dicts."""
    training: dict[str, Any] = {}
    gate: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        target = {"training": training, "gate": gate}.get(section)
        if target is None or not name:
            raise SystemExit(f"--set {item}: expected training.KEY=VALUE or gate.KEY=VALUE")
        target[name] = json.loads(value)
    return training, gate


# ============================================================================ part 1: run
KNOWLEDGE_RECIPE: dict[str, Any] = {
    # The daemon's default recipe, except: no early stopping (the stage's holdout would be
    # the recall probes themselves) and 256-token rows (the documents are short).
    "eval_every": 0,
    "max_seq_len": 256,
}


def model_free_methods() -> list[str]:
    """Every registered augmentation method that needs no model (the daemon's registry)."""
    return [
        n
        for n in policy_base.names("augment")
        if not getattr(policy_base.get("augment", n), "uses_model", False)
    ]


def run_knowledge(
    *,
    base: Path,
    tok: Any,
    facts: list[dict[str, str]],
    docs: list[str],
    method: str,
    k: int,
    work: Path,
    training: dict[str, Any],
    data_seed: int,
) -> dict[str, Any]:
    """One stage on ``docs`` through the daemon's own flow: store the documents, augment
    them with the daemon's worker (``augment.method``/``k``: synthetic chunks with lineage),
    plan and train (synthetic text trains, never evaluates), score the questions."""
    from daemon.augment import augment_pending
    from store import documents

    label = f"{method}-k{k}"
    state = work / "knowledge" / label
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    eval_path = state / "questions.jsonl"
    eval_path.write_text(
        "".join(json.dumps({"prompt": f["prompt"], "answer": f["answer"]}) + "\n" for f in facts)
    )
    # Memorisation, beside extraction: the document's own sentence up to the answer. A
    # method can fail the questions yet teach the text better (or not at all).
    memory_path = state / "memory.jsonl"
    memory_path.write_text(
        "".join(
            json.dumps(
                {"prompt": f["sentence"].split(f["answer"])[0].strip(), "answer": f["answer"]}
            )
            + "\n"
            for f in facts
        )
    )
    cfg = config_mod.from_dict(
        {
            "state_dir": str(state),
            "base_model": str(base),
            "serving": {"mode": "none"},
            "augment": {"method": method, "k": k, "seed": data_seed},
            "training": {
                **training,
                "eval_sets": [str(eval_path), str(memory_path)],
                "eval_match": "contains",
            },
            "policy": {"promotion": {"name": "gate", "min_new_improvement": 0.0}},
        }
    )

    def ntok(t: str) -> int:
        return len(tok(t, add_special_tokens=False)["input_ids"])

    t0 = time.time()
    with open_db(cfg.db_path) as db:
        add_texts(db, tok, docs, [], f"/inbox/{label}.txt")
        report = augment_pending(cfg, db, limit=1_000_000)
        syn_texts = [str(r["text"]) for r in documents.chunks_by_ids(db, report.chunk_ids)]
        res = runner.run_stage(cfg, db, promote=_store_only(cfg))
    if res.status not in ("promoted", "rejected"):
        raise RuntimeError(f"knowledge {label}: {res.status}: {res.reason}")
    m = res.metrics
    new_tokens = sum(map(ntok, docs))
    out = {
        "method": method,
        "k": k,
        "recall": m["candidate"]["eval:questions"] / 100.0,
        "recall_base": m["baseline"]["eval:questions"] / 100.0,
        "memorised": m["candidate"]["eval:memory"] / 100.0,
        "synthetic_texts": report.kept,
        "tokens_per_new_token": (new_tokens + sum(map(ntok, syn_texts))) / max(1, new_tokens),
        "steps": m["training"]["steps"],
        "general_drift": math.exp(m["candidate"]["general_loss"] - m["baseline"]["general_loss"])
        - 1,
        "stage_s": round(time.time() - t0, 1),
    }
    print(
        f"  [knowledge] {label:16s} recall {out['recall']:.2f} (base {out['recall_base']:.2f},"
        f" own sentence {out['memorised']:.2f})"
        f" | {report.kept} synthetic texts, trained tokens x{out['tokens_per_new_token']:.1f}"
        f" | {out['steps']} steps | general drift {out['general_drift']:+.1%}"
        f" | {out['stage_s']:.0f}s",
        flush=True,
    )
    return out


# ============================================================================ part 2: corpus
HEADING = re.compile(r"^(\d+(?:\.\d+)+)\. (\S.*)$")


def debian_sections(path: Path = DEBIAN_POLICY) -> list[tuple[str, str]]:
    """(heading, text) of every numbered section (N.N. ...) of the Debian Policy Manual."""
    if not path.is_file():
        raise SystemExit(
            f"knowledge benchmark: {path} is missing; the real-text corpus is Debian's "
            f"debian-policy package: run `{INSTALL_HINT}`"
        )
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    starts = [
        i
        for i in range(len(lines) - 1)
        if HEADING.match(lines[i]) and re.fullmatch(r"[=\-*]{3,}", lines[i + 1])
    ]
    out = []
    for j, i in enumerate(starts):
        end = starts[j + 1] if j + 1 < len(starts) else len(lines)
        body = "\n".join(lines[i + 2 : end]).strip()
        body = re.sub(r"\n{3,}", "\n\n", body)
        out.append((lines[i].strip(), f"{lines[i].strip()}\n\n{body}"))
    return out


def split_corpus(
    sections: list[tuple[str, str]], tok: Any, train_tokens: int, every: int = 4, data_seed: int = 0
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Sections in manual order until ``train_tokens`` train tokens; every ``every``-th
    (of those long enough) is held out entirely (never ingested). The data seed picks
    which one of each ``every`` is held out (seed 0 tunes a recipe, seed 1 reports it)."""
    train, held = [], []
    n_train = 0
    for i, (title, text) in enumerate(s for s in sections if len(s[1]) >= 400):
        if i % every == (every // 2 + data_seed) % every:
            held.append((title, text))
            continue
        train.append((title, text))
        n_train += len(tok(text, add_special_tokens=False)["input_ids"])
        if n_train >= train_tokens:
            break
    return train, held


# ----------------------------------------------------------------------------- vLLM scoring
class Scorer:
    """A real vLLM CPU server (the daemon's ManagedVLLM) used for prompt log-probs."""

    def __init__(self, work: Path, base: Path, max_lora_rank: int) -> None:
        from daemon.serving.vllm import ManagedVLLM

        self.cfg = config_mod.from_dict(
            {
                "state_dir": str(work / "vllm-state"),
                "base_model": str(base),
                "serving": {
                    "port": free_port(),
                    "max_lora_rank": max_lora_rank,
                    "max_loras": 2,
                    "max_model_len": 1024,
                },
            }
        )
        self.server = ManagedVLLM(self.cfg)
        self.base_name = str(base)

    def __enter__(self) -> Scorer:
        import httpx

        t = time.time()
        self.server.start()
        if not self.server.wait_healthy(600):
            tail = self.server.log_tail(30)
            self.server.stop()
            raise RuntimeError(f"vLLM did not start:\n{tail}")
        self.start_s = time.time() - t
        self.http = httpx.Client(
            base_url=self.server.url,
            headers={"Authorization": f"Bearer {self.server.api_key}"},
            timeout=600,
        )
        models = self.http.get("/v1/models").json()["data"]
        self.base_name = models[0]["id"]
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.http.close()
        self.server.stop()

    def load(self, name: str, path: Path) -> str:
        self.server.endpoint.load_lora(name, path)  # the daemon's client: admin secret
        return name

    def unload(self, name: str) -> None:
        self.server.endpoint.unload_lora(name)

    def nll(self, model: str, windows: list[list[int]]) -> tuple[float, int]:
        """Summed negative log-likelihood of every token after the first of each window.

        One window per request, sequentially: with LoRA enabled, vLLM's CPU punica path
        (``add_lora_logits``) fails on prompt log-probs of 2+ requests in one batch
        ("einsum(): subscript b has size 2 ... 512"), so requests are never batched."""
        total, count = 0.0, 0
        for win in windows:
            body = {
                "model": model,
                "prompt": win,
                "max_tokens": 1,
                "echo": True,
                "logprobs": 0,
                "temperature": 0.0,
            }
            r = self.http.post("/v1/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"completions {model}: {r.status_code} {r.text[:300]}")
            lps = r.json()["choices"][0]["logprobs"]["token_logprobs"][1 : len(win)]
            total -= sum(float(x) for x in lps)
            count += len(lps)
        return total, count

    def ppl(self, model: str, windows: list[list[int]]) -> float:
        total, count = self.nll(model, windows)
        return math.exp(total / max(1, count))


def windows_of(tok: Any, texts: list[str], width: int = 512, cap: int = 0) -> list[list[int]]:
    """Token windows (BOS + up to ``width`` tokens) of each text; ``cap`` limits tokens."""
    out, n = [], 0
    bos = tok.bos_token_id
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        for j in range(0, len(ids), width):
            piece = ids[j : j + width]
            if len(piece) < 2:
                continue
            out.append(([bos] if bos is not None else []) + piece)
            n += len(piece)
            if cap and n >= cap:
                return out
    return out


# ----------------------------------------------------------------------------- part 2: stage
def real_text_stage(
    *,
    base: Path,
    train: list[tuple[str, str]],
    work: Path,
    label: str,
    training: dict[str, Any],
    gate: dict[str, Any],
) -> dict[str, Any]:
    """Ingest the train sections through the real ingest and run one stage (real gate)."""
    from daemon.augment import augment_pending
    from daemon.ingest.pipeline import ingest_paths

    state = work / "realtext" / label
    shutil.rmtree(state, ignore_errors=True)
    inbox = state / "inbox"
    inbox.mkdir(parents=True)
    for j, (title, text) in enumerate(train):
        slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:60]
        (inbox / f"{j:03d}-{slug}.txt").write_text(text + "\n")
    raw: dict[str, Any] = {
        "state_dir": str(state),
        "base_model": str(base),
        "serving": {"mode": "none"},
        "training": training,
    }
    if gate:
        raw["policy"] = {"promotion": {"name": "gate", **gate}}
    cfg = config_mod.from_dict(raw)
    summary = ingest_paths(cfg, [inbox])
    t0 = time.time()
    with open_db(cfg.db_path) as db:
        # As the daemon does after ingest: the default [augment] method (none today).
        augment_pending(cfg, db, limit=1_000_000)
        res = runner.run_stage(cfg, db, promote=_store_only(cfg))
    stage_s = time.time() - t0
    if res.status not in ("promoted", "rejected"):
        raise RuntimeError(f"real-text stage {label}: {res.status}: {res.reason}")
    m = res.metrics
    cand, basem, tr = m["candidate"], m["baseline"], m["training"]
    out = {
        "label": label,
        "status": res.status,
        "gate": res.reason,
        "adapter": str(cfg.adapters_dir / str(res.version)),
        "stage_s": round(stage_s, 1),
        "steps": tr["steps"],
        "total_steps": tr.get("total_steps"),
        "stopped_early": tr.get("stopped_early"),
        "new_tokens": int(summary.get("tokens", 0)),
        "tokens_trained": tr.get("tokens_trained"),
        "holdout_loss": [basem["new_loss"], cand["new_loss"]],
        "general_loss": [basem.get("general_loss"), cand.get("general_loss")],
        "stage_ppl_gain": 1 - math.exp(cand["new_loss"] - basem["new_loss"]),
        "stage_general_drift": math.exp(cand["general_loss"] - basem["general_loss"]) - 1,
    }
    print(
        f"  [real text] {label:18s} {out['status']:8s} | {out['steps']}/{out['total_steps']}"
        f" steps{' (early stop)' if out['stopped_early'] else ''} | {out['stage_s']:.0f}s"
        f" | chunk-holdout ppl gain {out['stage_ppl_gain']:+.1%}"
        f" | general drift {out['stage_general_drift']:+.1%} | {out['gate']}",
        flush=True,
    )
    return out


# Measured 2026-12-02 (shared 2-core host at load ~20, --threads 1, default seed,
# 15 sections = 6.3k train tokens, 5 held-out sections; vLLM perplexities):
#   earlier seed build (held-out ppl 1909, general 621), data seed 0:
#   2 passes, lr 4e-3 (26 steps): held-out -23.6%, general -5.6%, promoted
#   4 passes, lr 4e-3 (52 steps): held-out -27.4%, general +28.4%, rejected (general loss +7.6%)
#   4 passes, lr 1e-3 (52 steps): held-out -24.1%, general -11.6%, promoted
#   old default (min_steps 1000 = ~80 passes here): not finished (ETA 3897 s at 256 tok/s)
#   this seed build (held-out ppl 1060, general 468), data seed 0:
#   4 passes, lr 2e-3 (48 steps, now the default): held-out -20.1%, general -6.0%, promoted
#   (the gate's chunk holdout: -27.5%); 3 passes, lr 2e-3: chunk holdout -12.9%, promoted
# Session 6 (load 1-3, seed rebuilt: held-out ppl 1072, general 481), data seed 0, lr 2e-3,
#   held-out sections / general ppl: 4 passes -22.2% / -5.2%, 6 -27.2% / -7.0%,
#   8 -30.5% / -7.2% (now the default), 12 -32.5% / -7.1%; all promoted. Data seed 1,
#   8 passes: -42.5% / -8.7%, promoted.
# Recipes for --sweep (names, comma list; "all" = every one). The stage length is set by
# ``training.passes`` over the new data, with no ``min_steps`` floor.
SWEEP: dict[str, dict[str, Any]] = {
    "p1": {"passes": 1.0, "min_steps": 0},
    "p2": {"passes": 2.0, "min_steps": 0},
    "p3": {"passes": 3.0, "min_steps": 0},
    "p4": {"passes": 4.0, "min_steps": 0},
    "p2-lr2e-3": {"passes": 2.0, "min_steps": 0, "learning_rate": 2e-3},
    "p3-lr2e-3": {"passes": 3.0, "min_steps": 0, "learning_rate": 2e-3},
    "p4-lr1e-3": {"passes": 4.0, "min_steps": 0, "learning_rate": 1e-3},
    "p4-lr2e-3": {"passes": 4.0, "min_steps": 0, "learning_rate": 2e-3},
    "p6-lr1e-3": {"passes": 6.0, "min_steps": 0, "learning_rate": 1e-3},
    "p8-lr1e-3": {"passes": 8.0, "min_steps": 0, "learning_rate": 1e-3},
    "p6-lr2e-3": {"passes": 6.0, "min_steps": 0, "learning_rate": 2e-3},
    "p8-lr2e-3": {"passes": 8.0, "min_steps": 0, "learning_rate": 2e-3},
    "p12-lr2e-3": {"passes": 12.0, "min_steps": 0, "learning_rate": 2e-3},
    "p4-mix1": {"passes": 4.0, "min_steps": 0, "general_mix": 1.0},
    "p4-r16": {"passes": 4.0, "min_steps": 0, "lora_rank": 16, "lora_alpha": 8},
}


# ============================================================================ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="Tiny seed, few facts and sections.")
    ap.add_argument("--data-seed", type=int, default=0, help="Seed of the fictional facts.")
    ap.add_argument(
        "--workdir",
        default=str(Path.home() / ".cache" / "evergreen-bench" / "knowledge"),
        help="Work dir; seed models are cached here.",
    )
    ap.add_argument("--facts", type=int, default=0, help="Facts in part 1 (default 30).")
    ap.add_argument(
        "--methods",
        default="",
        help="Part 1 runs, METHOD:K comma list of daemon augment methods (default: every"
        " model-free registered method at k=4, permute also at k=8).",
    )
    ap.add_argument(
        "--knowledge-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a training.* key of part 1's stages (e.g. min_steps=300 on a slow host).",
    )
    ap.add_argument(
        "--train-tokens",
        type=int,
        default=6000,
        help="Part 2 train tokens (6000 = 15 sections, ~6.3k tokens: the size the default"
        " recipe was measured at; larger corpora are sized by the same passes).",
    )
    ap.add_argument("--set", action="append", default=[], metavar="training.KEY=VALUE")
    ap.add_argument(
        "--sweep", default="", help=f"Part 2 extra recipes (no gate change): {', '.join(SWEEP)}"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="OMP/MKL threads of the stage subprocesses (0 = unchanged). On a shared, "
        "oversubscribed host 1 thread trains ~20x faster than torch's default.",
    )
    ap.add_argument("--skip", default="", help="Comma list: knowledge,realtext")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from daemon.config import TrainingConfig

    if args.threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    t_start = time.time()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    out: dict[str, Any] = {"data_seed": args.data_seed, "smoke": args.smoke}
    set_training, set_gate = parse_sets(args.set)

    # ---------------------------------------------------------------- part 1
    runs: list[dict[str, Any]] = []
    if "knowledge" not in skip:
        tiny = seed_model(work, "tiny", steps=400)
        tok = AutoTokenizer.from_pretrained(tiny)
        n_facts = args.facts or (6 if args.smoke else 30)
        facts = make_facts(n_facts, args.data_seed)
        docs = make_documents(facts, args.data_seed)
        check_disjoint(facts, docs)
        training = TrainingConfig().model_dump()
        for key in ("eval_sets", "eval_match", "general_eval", "base_adapter"):
            training.pop(key)
        training.update(KNOWLEDGE_RECIPE)
        if args.smoke:
            training["min_steps"] = 60
        for item in args.knowledge_set:
            key, _, value = item.partition("=")
            training[key] = json.loads(value)
        free = model_free_methods()
        methods = args.methods or ",".join(
            ["none:1"]
            + [f"{m}:4" for m in free if m != "none"]
            + ["permute:8"] * ("permute" in free)
        )
        if args.smoke:
            methods = "none:1,permute:2"
        print(
            f"part 1: {n_facts} facts (data seed {args.data_seed}) in {len(docs)} documents,"
            f" each stated once; questions share no 4-word run with the documents; tiny seed"
            f" {tiny}; recipe: defaults + {KNOWLEDGE_RECIPE} + {args.knowledge_set}",
            flush=True,
        )
        for item in methods.split(","):
            method, _, k = item.partition(":")
            runs.append(
                run_knowledge(
                    base=tiny,
                    tok=tok,
                    facts=facts,
                    docs=docs,
                    method=method,
                    k=int(k or 1),
                    work=work,
                    training=training,
                    data_seed=args.data_seed,
                )
            )
        none = [r for r in runs if r["method"] == "none"]
        best = max(runs, key=lambda r: r["recall"])
        out.update(
            {
                "acquisition_single_none": none[0]["recall"] if none else None,
                "acquisition_single_best": best["recall"],
                "best_method": f"{best['method']}:{best['k']}",
                "augment_tokens_per_new_token": best["tokens_per_new_token"],
                "knowledge_runs": [
                    {
                        k: r[k]
                        for k in (
                            "method",
                            "k",
                            "recall",
                            "memorised",
                            "tokens_per_new_token",
                            "stage_s",
                        )
                    }
                    for r in runs
                ],
                "knowledge_not_run": dict.fromkeys(
                    sorted(set(policy_base.names("augment")) - set(free)),
                    "needs a served model (a tiny seed writes noise): see README",
                ),
            }
        )

    # ---------------------------------------------------------------- part 2
    if "realtext" not in skip:
        size = "tiny" if args.smoke else "default"
        base = seed_model(work, size, steps=400 if args.smoke else 0)
        tok = AutoTokenizer.from_pretrained(base)
        sections = debian_sections()
        train_tokens = 3000 if args.smoke else args.train_tokens
        train, held = split_corpus(sections, tok, train_tokens, data_seed=args.data_seed)
        training = dict(set_training)
        if args.smoke:
            training.setdefault("min_steps", 40)
        print(
            f"part 2: Debian Policy Manual, {len(sections)} sections; {len(train)} train"
            f" sections, {len(held)} held-out sections; {size} seed {base};"
            f" recipe: defaults + {training or '{}'}, gate + {set_gate or '{}'}",
            flush=True,
        )
        stages_run = [
            real_text_stage(
                base=base, train=train, work=work, label="recipe", training=training, gate=set_gate
            )
        ]
        names = list(SWEEP) if args.sweep == "all" else list(filter(None, args.sweep.split(",")))
        for label in [] if args.smoke else names:
            stages_run.append(
                real_text_stage(
                    base=base,
                    train=train,
                    work=work,
                    label=label,
                    training={**training, **SWEEP[label]},
                    gate=set_gate,
                )
            )
        held_w = windows_of(tok, [t for _, t in held], cap=1500 if args.smoke else 12_000)
        general_path = base / "general_holdout.txt"
        gen_w = windows_of(
            tok, [general_path.read_text(encoding="utf-8")], cap=2000 if args.smoke else 20_000
        )
        rank = max(
            int(TrainingConfig().lora_rank),
            *(int(s.get("lora_rank", 0)) for s in SWEEP.values()),
            int(training.get("lora_rank", 0)),
        )
        with Scorer(work, base, max_lora_rank=rank) as sc:
            before_h = sc.ppl(sc.base_name, held_w)
            before_g = sc.ppl(sc.base_name, gen_w)
            print(
                f"  vLLM up in {sc.start_s:.0f}s; base: held-out sections ppl {before_h:.1f}"
                f" ({sum(map(len, held_w))} tok), general ppl {before_g:.1f}",
                flush=True,
            )
            for st in stages_run:
                name = sc.load(f"cand-{st['label']}", Path(st["adapter"]))
                after_h, after_g = sc.ppl(name, held_w), sc.ppl(name, gen_w)
                sc.unload(name)
                st.update(
                    {
                        "heldout_ppl": [before_h, after_h],
                        "general_ppl": [before_g, after_g],
                        "ppl_gain": 1 - after_h / before_h,
                        "general_ppl_drift": after_g / before_g - 1,
                    }
                )
                print(
                    f"  [vLLM] {st['label']:18s} held-out sections ppl {before_h:.1f} ->"
                    f" {after_h:.1f} (gain {st['ppl_gain']:+.1%}) | general ppl"
                    f" {before_g:.1f} -> {after_g:.1f} (drift {st['general_ppl_drift']:+.1%})",
                    flush=True,
                )
        main_run = stages_run[0]
        out.update(
            {
                "real_text_ppl_gain": main_run["ppl_gain"],
                "general_ppl_drift": main_run["general_ppl_drift"],
                "real_text_stage_s": main_run["stage_s"],
                "real_text_promoted": main_run["status"] == "promoted",
                "real_text_runs": [
                    {k: v for k, v in s.items() if k != "adapter"} for s in stages_run
                ],
                "real_text_recipe": training,
                "real_text_train_sections": len(train),
                "real_text_heldout_sections": len(held),
            }
        )

    out["elapsed_s"] = round(time.time() - t_start, 1)
    targets = {
        "acquisition_single_best": (">=", 0.60),
        "real_text_ppl_gain": (">=", 0.25),
        "general_ppl_drift": ("<=", 0.05),
        "real_text_promoted": ("==", True),
    }
    print("\nsummary:")
    for key, (op, goal) in targets.items():
        v = out.get(key)
        ok = v is not None and (v >= goal if op == ">=" else v <= goal if op == "<=" else v == goal)
        shown = round(v, 3) if isinstance(v, float) else v
        print(f"  {key:28s} {shown!s:>8}  target {op} {goal}  {'OK' if ok else 'MISS'}")
    if out.get("acquisition_single_none") is not None:
        lift = out["acquisition_single_best"] - out["acquisition_single_none"]
        print(
            f"  {'augmentation lift':28s} {lift:>8.3f}  target >= 0.3  "
            f"{'OK' if lift >= 0.3 else 'MISS'}"
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
