"""What every benchmark shares: ``--smoke``, and "summary, field check, one JSON line".

A benchmark declares ``FIELDS``, the keys its full run prints, and ends with
:func:`report`. In a ``--smoke`` run (tiny sizes, the same real code path, what
``make bench-smoke`` and so ``make test`` run) the check is what makes the benchmark code
that CI runs: a default or an API that changes and breaks a benchmark fails there, not
months later. The check runs in a full run too.

Not a benchmark itself: ``make bench-smoke`` runs every ``benchmarks/*.py`` not starting
with ``_``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from typing import Any


def add_smoke_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, same real path (CI: checks the JSON fields, not the targets)",
    )


def report(
    name: str, summary: Iterable[str], result: dict[str, Any], fields: Iterable[str]
) -> None:
    """Print the human ``summary``, check ``result`` has every field, print it as JSON.

    The JSON object is the last line printed. A missing field exits with status 1 and a
    message naming the benchmark and the fields, after the JSON (so it can be inspected).
    """
    for line in summary:
        print(line)
    missing = [f for f in fields if f not in result]
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    if missing:
        print(
            f"{name}: the JSON line lacks field(s) the full run prints: {', '.join(missing)}",
            file=sys.stderr,
        )
        sys.exit(1)
