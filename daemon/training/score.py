"""Score chunks under an adapter: ``python -m daemon.training.score --db PATH --version V``.

Writes each chunk's mean token loss under adapter ``V`` (``--version ''`` = the base
model) to ``chunk_scores``, which the policies read for ``surprise``, ``most_forgotten``
and highest-loss selection. Without ``--chunks`` it scores the pending train chunks and
the replay buffer of the track. A subprocess, so the daemon never imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from daemon.scheduling import placement
from daemon.training.lifeline import die_with_parent
from store import adapters, documents
from store.db import open_db

MAX_CHUNKS = 5000


def main(argv: list[str] | None = None) -> int:
    die_with_parent()  # a scorer of a SIGKILLed daemon stops with it
    ap = argparse.ArgumentParser(prog="python -m daemon.training.score", description=__doc__)
    ap.add_argument("--db", required=True, help="Path of the store (evergreen.db).")
    ap.add_argument("--base-model", required=True, help="Base model dir.")
    ap.add_argument("--version", default="", help="Adapter version ('' = base model).")
    ap.add_argument("--track", default="default")
    ap.add_argument("--chunks", default="", help="Comma-separated chunk ids (default: auto).")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    args = ap.parse_args(argv)
    placement.apply_from_env()  # our cores and niceness, before torch starts its threads

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from daemon.training import data as data_mod
    from daemon.training.device import pick
    from daemon.training.evaluate import example_losses

    db = open_db(args.db)
    try:
        if args.chunks:
            ids = [int(x) for x in args.chunks.split(",") if x.strip()]
        else:
            ids = [int(c["id"]) for c in documents.pending_chunks(db, args.track)]
            ids += [int(r["chunk_id"]) for r in documents.replay_rows(db, args.track)]
        ids = list(dict.fromkeys(ids))[:MAX_CHUNKS]
        dev = pick()
        tok = AutoTokenizer.from_pretrained(args.base_model)
        model: Any = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=dev.dtype)
        if args.version:
            row = adapters.get(db, args.version)
            if row is None:
                print(json.dumps({"event": "error", "message": f"no adapter {args.version}"}))
                return 1
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, row["path"])
        model.to(dev.device)
        examples = []
        for chunk in documents.chunks_by_ids(db, ids):
            try:
                examples.extend(data_mod.encode_chunk(tok, chunk, "eval", args.max_seq_len))
            except ValueError:
                continue
        with torch.no_grad():
            _, per_chunk, _ = example_losses(
                model,
                examples,
                max_len=args.max_seq_len,
                batch_tokens=args.batch_tokens,
                device=dev.device,
            )
        documents.put_scores(db, args.version or None, per_chunk)
        print(json.dumps({"event": "scored", "version": args.version, "n": len(per_chunk)}))
        return 0
    finally:
        db.conn.close()


if __name__ == "__main__":
    sys.exit(main())
