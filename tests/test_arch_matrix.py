"""The architecture matrix: tiny models of six families train, are promoted, and vLLM serves
them under the stable name computing exactly what peft computes.

Per family (:func:`tests.matrix.run_family`): one short stage through the real stage
subprocess on ``target_modules = "auto"``, promotion through serving's swap, a completion
under the stable name, then parity with transformers + peft in fp32: every prompt token's
log-prob within :func:`tests.families.bound` (1e-3; Gemma 2, whose soft-capped
attention vLLM's CPU kernel computes less exactly: 3e-2) and identical greedy
continuations, for the base model (under its path, and under the stable name before any
promotion: serving's zero adapter) and for the adapter (which moves log-probs by more than 0.5, so a module vLLM dropped or a
wrong LoRA scaling would show). One vLLM server per family, booting while the stage
trains. ``benchmarks/parity.py`` runs the same on every family in :mod:`tests.families`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.training.targets import targets_for_dir
from tests.families import FAMILIES, REFUSED, architecture, bound
from tests.matrix import run_family

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

# The six the issue names (Gemma 3 and Granite run in benchmarks/parity.py): each costs a
# vLLM start (~30 s on 2 quiet cores).
MATRIX = ("llama", "qwen2", "qwen3", "gemma2", "phi3", "opt")
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("family", MATRIX)
def test_family_trains_is_served_and_matches_peft(
    family: str, tiny_seed_model: Path, tmp_path: Path
) -> None:
    res = run_family(family, tiny_seed_model, tmp_path)
    assert not res.error, res.error
    assert res.version == "v0001" and isinstance(res.stable_text, str)
    assert res.targets == sorted(targets_for_dir(str(tmp_path / "models" / family)))
    assert res.adapter_shift > 0.5, "the adapter barely changes the model: parity proves little"
    for side in res.sides:
        assert side.tokens_compared >= 40
        assert side.max_abs_diff <= bound(family), (family, side)
        assert side.greedy_mismatches == 0, side.details


def test_matrix_families_exist_and_refused_ones_are_documented() -> None:
    assert set(MATRIX) <= set(FAMILIES)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for arch in REFUSED:
        assert arch in readme, f"README does not name {arch}, which vLLM refuses"


def test_vllm_refuses_lora_exactly_where_the_readme_says(tmp_path: Path) -> None:
    """This vLLM's own registry: LoRA on every matrix family, none on the refused ones."""
    import subprocess
    import sys

    archs = dict.fromkeys(map(architecture, FAMILIES), True) | dict.fromkeys(REFUSED, False)
    code = (
        "import json, sys\n"
        "from vllm.model_executor.models.registry import ModelRegistry\n"
        "from vllm.model_executor.models.interfaces import supports_lora\n"
        "out = {}\n"
        "for a in json.loads(sys.argv[1]):\n"
        "    cls = ModelRegistry._try_load_model_cls(a)\n"
        "    out[a] = cls is not None and supports_lora(cls)\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(sorted(archs))],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == archs
