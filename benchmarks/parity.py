"""Served vs trained, per architecture family: does vLLM compute what peft trained?

For each tiny family (:mod:`tests.families`: Llama, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3
with fused projections, Granite, OPT), one short stage trains through the real stage
subprocess, is promoted under the stable name on a managed vLLM CPU server (fp32), and
the log-probs vLLM returns for fixed prompts, and its greedy continuations, are compared
with transformers + peft in fp32 on CPU (the baseline) on the same adapter, and on the
base model (no adapter), also as served under the stable name before any promotion
(serving's zero adapter). See :mod:`tests.matrix` for the steps.

    python benchmarks/parity.py [--families llama,phi3] [--keep] [--smoke]

``--smoke`` (CI): one family (llama), the same path. The last line is one JSON object:
``families_ok`` (trained, promoted, served, within the bound, greedy identical),
``families_tried``, ``max_abs_logprob_diff`` (over every family, base and adapter),
``greedy_mismatches``, plus ``bound``, ``per_family`` and ``refused`` (the architectures
this vLLM cannot serve LoRA on).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import add_smoke_flag, report  # noqa: E402
from daemon import config as config_mod  # noqa: E402
from daemon.training.seed import ensure_seed_model  # noqa: E402
from tests.families import BOUND, FAMILIES, REFUSED, bound  # noqa: E402
from tests.matrix import FamilyResult, run_family  # noqa: E402

FIELDS = ("families_ok", "families_tried", "max_abs_logprob_diff", "greedy_mismatches")
SMOKE_FAMILIES = ("llama",)


def family_ok(res: FamilyResult) -> bool:
    worst = max(side.max_abs_diff for side in res.sides)
    mismatches = sum(side.greedy_mismatches for side in res.sides)
    return res.ok and worst <= bound(res.family) and mismatches == 0 and res.adapter_shift > 0.01


def line(res: FamilyResult) -> str:
    if res.error:
        return f"{res.family:8s} FAILED: {res.error.splitlines()[0]}"
    secs = ", ".join(f"{k} {v:.0f}s" for k, v in res.seconds.items())
    return (
        f"{res.family:8s} {'ok ' if family_ok(res) else 'BAD'} {res.version}"
        f" | max |dlogp| base {res.base.max_abs_diff:.2e} zero {res.zero.max_abs_diff:.2e}"
        f" adapter {res.adapter.max_abs_diff:.2e}"
        f" ({sum(side.tokens_compared for side in res.sides)} tokens)"
        f" | greedy mismatches {sum(side.greedy_mismatches for side in res.sides)}"
        f" | adapter moves log-probs by up to {res.adapter_shift:.2f} | {secs}"
    )


def summarise(results: list[FamilyResult]) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    return {
        "families_ok": sum(family_ok(r) for r in results),
        "families_tried": len(results),
        "max_abs_logprob_diff": max(
            (side.max_abs_diff for r in done for side in r.sides), default=None
        ),
        "greedy_mismatches": sum(side.greedy_mismatches for r in done for side in r.sides),
        "bound": BOUND,
        "bounds": {r.family: bound(r.family) for r in results},
        "per_family": {
            r.family: {
                "ok": family_ok(r),
                "base_max_abs_diff": r.base.max_abs_diff,
                "zero_adapter_max_abs_diff": r.zero.max_abs_diff,
                "adapter_max_abs_diff": r.adapter.max_abs_diff,
                "adapter_shift": round(r.adapter_shift, 4),
                "error": r.error,
                "seconds": {k: round(v, 1) for k, v in r.seconds.items()},
            }
            for r in results
        },
        "refused": sorted(REFUSED),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    add_smoke_flag(ap)
    args = ap.parse_args(argv)
    names = args.families.split(",") if args.families else list(FAMILIES)
    if args.smoke and not args.families:
        names = list(SMOKE_FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    work = Path(tempfile.mkdtemp(prefix="evergreen-parity-"))
    try:
        seed_cfg = config_mod.from_dict({"state_dir": str(work / "seed"), "seed": {"size": "tiny"}})
        seed = ensure_seed_model(seed_cfg)
        results = []
        for name in names:
            results.append(run_family(name, seed, work))
            print(line(results[-1]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = summarise(results)
    summary = [
        f"parity: {result['families_ok']}/{result['families_tried']} families served exactly"
        f" what peft computes (bound {BOUND:g}); max |dlogp| {result['max_abs_logprob_diff']},"
        f" greedy mismatches {result['greedy_mismatches']}",
        f"refused by this vLLM: {', '.join(REFUSED)}",
    ]
    report("parity", summary, result, FIELDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
