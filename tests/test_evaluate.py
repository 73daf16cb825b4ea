"""Evaluation: eval-set scoring, general anchor, and candidate-vs-baseline measurement."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from daemon.training import evaluate as ev
from daemon.training.data import Example


@pytest.mark.parametrize(
    ("completion", "answer", "mode", "expected"),
    [
        (" Paris is big", "Paris", "contains", True),
        (" paris", "Paris", "exact", True),
        ("  Paris  ", "paris", "exact", True),
        (" Paris is big", "Paris", "exact", False),
        (" Lyon", "Paris", "contains", False),
        ("anything", "", "contains", False),
    ],
)
def test_match(completion: str, answer: str, mode: str, expected: bool) -> None:
    assert ev.match(completion, answer, mode) is expected


def test_load_eval_set_skips_malformed_lines(tmp_path: Path) -> None:
    p = tmp_path / "set.jsonl"
    p.write_text(
        json.dumps({"prompt": "a", "answer": "b"})
        + "\n\nnot json\n[1]\n"
        + json.dumps({"prompt": "c"})
        + "\n"
        + json.dumps({"prompt": "d", "answer": "e"})
        + "\n"
    )
    assert [it["prompt"] for it in ev.load_eval_set(p)] == ["a", "d"]


@pytest.fixture(scope="module")
def model_and_tok(tiny_seed_model: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        AutoModelForCausalLM.from_pretrained(tiny_seed_model).eval(),
        AutoTokenizer.from_pretrained(tiny_seed_model),
    )


@pytest.mark.slow
def test_eval_points_follow_the_models_own_greedy_output(model_and_tok) -> None:
    model, tok = model_and_tok
    prompts = ["The function returns", "Return the"]
    outs = ev.greedy_completions(model, tok, prompts, max_new_tokens=4, device="cpu")
    assert len(outs) == 2
    right = [{"prompt": p, "answer": o} for p, o in zip(prompts, outs, strict=True) if o.strip()]
    wrong = [{"prompt": p, "answer": "zzqqxx-never"} for p in prompts]
    assert ev.eval_set_points(model, tok, right, "contains", "cpu") == 100.0
    assert ev.eval_set_points(model, tok, wrong, "contains", "cpu") == 0.0
    assert ev.eval_set_points(model, tok, right + wrong, "contains", "cpu") == pytest.approx(
        100.0 * len(right) / (len(right) + 2)
    )
    assert math.isnan(ev.eval_set_points(model, tok, [], "contains", "cpu"))


@pytest.mark.slow
def test_losses_general_anchor_and_per_chunk(model_and_tok, tiny_seed_model: Path) -> None:
    model, tok = model_and_tok
    general = ev.general_examples(tok, tiny_seed_model / "general_holdout.txt", 128)
    assert general and all(len(e) <= 128 for e in general)
    loss, per_chunk, n = ev.example_losses(
        model, general, max_len=128, batch_tokens=512, device="cpu"
    )
    assert 0.0 < loss < 12.0 and n > 0 and per_chunk == {}
    a = tok("the same text again and again", add_special_tokens=False)["input_ids"]
    b = tok("zq xv kw pj", add_special_tokens=False)["input_ids"]
    exs = [Example(a, a, 1), Example(b, b, 2)]
    mean, per, count = ev.example_losses(model, exs, max_len=64, batch_tokens=128, device="cpu")
    assert set(per) == {1, 2}
    assert count == len(a) - 1 + len(b) - 1
    expected = (per[1] * (len(a) - 1) + per[2] * (len(b) - 1)) / count
    assert mean == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_candidate_and_baseline_measured_on_same_sets(model_and_tok) -> None:
    """With a fresh LoRA (B = 0) the candidate equals the baseline exactly; after a weight
    change they differ, and baseline_view restores the candidate afterwards."""
    import torch
    from peft import LoraConfig, get_peft_model

    base, tok = model_and_tok
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ids = tok("Return the sum of the numbers.", add_special_tokens=False)["input_ids"]
    sets = {"new_loss": [Example(ids, ids, 1)]}
    evals = {"s": [{"prompt": "Return the", "answer": "zzz"}]}
    kw = {"max_len": 64, "batch_tokens": 256, "device": "cpu", "match_mode": "contains"}
    same = ev.evaluate_both(model, tok, parent_path=None, sets=sets, evals=evals, **kw)
    assert same["candidate"]["new_loss"] == pytest.approx(same["baseline"]["new_loss"])
    assert {"new_loss", "new_ppl", "eval:s"} <= set(same["candidate"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    diff = ev.evaluate_both(model, tok, parent_path=None, sets=sets, evals=evals, **kw)
    assert diff["candidate"]["new_loss"] != pytest.approx(diff["baseline"]["new_loss"])
    assert diff["baseline"]["new_loss"] == pytest.approx(same["baseline"]["new_loss"])
    model.unload()
