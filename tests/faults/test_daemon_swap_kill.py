"""``evergreen run`` with its managed vLLM SIGKILLed in the middle of a promotion's swap,
then restarted: the stable name serves the store's current version (issue #12).

One round, at the riskiest point: the stable name already re-pointed at the new version
and the store not yet told (``tests/faults/daemon_swap_kills.py``; the benchmark runs every
point). Two vLLM cold starts: minutes on a loaded box.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.daemon_swap_kills import run_daemon_swap_kills

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_daemon_killed_mid_swap_restarts_serving_the_store_s_current(
    tmp_path: Path, tiny_seed_model: Path
) -> None:
    (out,) = run_daemon_swap_kills(tmp_path, tiny_seed_model, ("flipped",))
    print(out.line())
    assert out.recovered, out.line()
    assert out.served == out.current
    # Whatever the killed promotion got to record, the two agree, and nothing in between.
    assert out.current in ("v0001", "v0002")
    assert out.request.startswith("failed: interrupted"), out.request
