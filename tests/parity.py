"""Served vs trained: what vLLM computes with an adapter against transformers + peft (fp32).

For fixed prompts (token ids, so both sides see the same tokens), the log-probability of
every prompt token after the first, as vLLM returns it (``echo`` + ``logprobs``) and as
the peft model computes it on CPU in fp32; and a greedy continuation from each side,
compared token for token (``ignore_eos``: the length is fixed). Requests go one at a
time: the vLLM CPU build must not batch prompt log-probs with a LoRA request.
Shared by ``tests/test_arch_matrix.py`` and ``benchmarks/parity.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def parse(path):\n    return open(path).read()",
    "Return the number of items in a container.",
    "In the beginning the model knew nothing at all, then",
)
GREEDY_TOKENS = 8


@dataclass
class Parity:
    """One model (base or adapter) compared on every prompt."""

    max_abs_diff: float = 0.0
    greedy_mismatches: int = 0
    tokens_compared: int = 0
    details: list[str] = field(default_factory=list)

    def merge(self, other: Parity) -> Parity:
        return Parity(
            max(self.max_abs_diff, other.max_abs_diff),
            self.greedy_mismatches + other.greedy_mismatches,
            self.tokens_compared + other.tokens_compared,
            self.details + other.details,
        )


def prompt_ids(tok: Any) -> list[list[int]]:
    """The prompts as token ids, BOS first (as the stage trains)."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return [bos + tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def load_reference(base: Path, adapter: Path | None) -> Any:
    """The base model in fp32 on CPU, with ``adapter`` applied (peft) when given."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


def hf_side(model: Any, ids: list[int], n: int = GREEDY_TOKENS) -> tuple[list[float], list[int]]:
    """(log-prob of each prompt token after the first, greedy continuation of n tokens)."""
    import torch

    with torch.no_grad():
        x = torch.tensor([ids])
        logp = model(input_ids=x).logits.float().log_softmax(-1)[0]
        prompt_lp = logp[:-1].gather(1, x[0, 1:, None])[:, 0].tolist()
        out = list(ids)
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax())
            out.append(nxt)
    return prompt_lp, out[len(ids) :]


def _post(url: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    resp = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
    if resp.status_code >= 400:
        raise RuntimeError(f"{body['model']}: HTTP {resp.status_code}: {resp.text[:300]}")
    return dict(resp.json()["choices"][0])


def vllm_side(
    url: str, key: str, model: str, ids: list[int], n: int = GREEDY_TOKENS
) -> tuple[list[float], list[int]]:
    """The same two things from a vLLM server, one request each."""
    echo = _post(
        url,
        key,
        {"model": model, "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 0},
    )
    prompt_lp = [float(v) for v in echo["logprobs"]["token_logprobs"][1 : len(ids)]]
    gen = _post(
        url,
        key,
        {
            "model": model,
            "prompt": ids,
            "max_tokens": n,
            "temperature": 0.0,
            "ignore_eos": True,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        },
    )
    tokens = [int(t.rsplit(":", 1)[-1]) for t in gen["logprobs"]["tokens"]]
    return prompt_lp, tokens


def compare(
    url: str, key: str, served_name: str, reference: Any, tok: Any, *, label: str
) -> Parity:
    """``served_name`` on the server against ``reference`` on every prompt."""
    result = Parity()
    for ids in prompt_ids(tok):
        hf_lp, hf_gen = hf_side(reference, ids)
        v_lp, v_gen = vllm_side(url, key, served_name, ids)
        diff = max(abs(a - b) for a, b in zip(hf_lp, v_lp, strict=True))
        mismatch = int(hf_gen != v_gen)
        if mismatch:
            result.details.append(f"{label}: greedy differs: peft {hf_gen} vs vLLM {v_gen}")
        result = result.merge(Parity(diff, mismatch, len(hf_lp)))
    return result


def max_shift(base: Any, adapted: Any, tok: Any) -> float:
    """How far the adapter moves the prompts' log-probs (peft side): a trivial adapter
    (all-zero B, or one a server could ignore unnoticed) would show ~0 here."""
    shift = 0.0
    for ids in prompt_ids(tok):
        a, _ = hf_side(base, ids, n=0)
        b, _ = hf_side(adapted, ids, n=0)
        shift = max(shift, *(abs(x - y) for x, y in zip(a, b, strict=True)))
    return shift
